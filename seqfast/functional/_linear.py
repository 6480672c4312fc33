"""torch.nn.functional.linear for the projections inside seqfast's attention modules (MultiheadAttention's in / out
projections, the Luong and Bahdanau score layers): seqfast._C.linear (csrc/linear/linear_call.h) runs float32 /
float64 CPU products, forward and backward, on the own GEMM, which on AMD CPUs ran them 2.1-2.4x faster than the
torch wheel's BLAS; everything else (other dtypes or devices, 1-D input, autocast, forward-mode AD, torch.compile
tracing, a forced backend other than "cpp", bad shapes) runs torch's F.linear, with its results and errors."""
import torch
import torch.nn.functional as torch_F

from .. import _backend, _ext

_call = None  # seqfast._C.linear, or False without the extension (looked up once)


def linear(input, weight, bias=None):
    """torch.nn.functional.linear(input, weight, bias), on seqfast's GEMM where it runs the call."""
    # is_compiling first: a trace then never reads or sets _call (a global the trace set would fail its guard and
    # compile the frame again)
    if not torch.compiler.is_compiling() and _backend.forced_backend() in (None, "cpp"):
        global _call
        if _call is None:
            module = _ext.module()
            _call = getattr(module, "linear", False) if module is not None else False
        if _call:
            out = _call(input, weight, bias)
            if out is not None:
                return out
    return torch_F.linear(input, weight, bias)
