"""Which kernel family runs an op: chosen by the tensors' device, overridable for tests and debugging.

    cpu  -> "cpp"     (seqfast._C)
    cuda -> "triton"  (seqfast.kernels)
    where seqfast has no kernel for a case (device, dtype, CPU ISA, a missing extension, a feature such as
    attention dropout) -> "torch": torch's own op (torch._VF.lstm, torch.lstm_cell,
    F.scaled_dot_product_attention, ...), never a Python time loop.

Override with the environment variable SEQFAST_BACKEND=reference|cpp|triton|torch (read at import) or, scoped,
``with seqfast.use_backend("triton"): ...``. "reference" runs seqfast's plain PyTorch oracle (seqfast.reference);
"torch" runs torch's own ops wherever torch has one. Forcing "triton" on CPU tensors runs Triton's interpreter, which
needs TRITON_INTERPRET=1 set before triton is first imported (the test suite does this).
"""
import contextlib
import os
import threading

import torch
import torch.autograd.forward_ad as _forward_ad

BACKENDS = ("reference", "cpp", "triton", "torch")

# dtypes each compiled backend implements; anything else runs the reference (identical results, plain PyTorch).
_DTYPES = {
    "cpp": (torch.float32, torch.float64, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


def _check(name):
    if name is not None and name not in BACKENDS:
        raise ValueError(f"seqfast backend must be one of {BACKENDS} or None, got {name!r}")
    return name


class _State(threading.local):
    forced = _check(os.environ.get("SEQFAST_BACKEND") or None)  # per thread; the class attribute is the default


_state = _State()


def forced_backend():
    """The backend forced by use_backend() or SEQFAST_BACKEND, or None for selection by device. Inside a forward-mode
    AD level (torch.autograd.forward_ad.dual_level, torch.func.jvp) with nothing forced: "torch". seqfast's kernels
    carry no tangents (their autograd ops have no jvp, and a no-grad kernel would drop a tangent silently), while
    torch's ops carry them or raise torch's own error."""
    forced = _state.forced
    if forced is None and _forward_ad._current_level >= 0:
        return "torch"
    return forced


@contextlib.contextmanager
def use_backend(name):
    """Run every seqfast op inside the block on backend ``name`` ("reference", "cpp", "triton", "torch"; None = by
    device)."""
    _check(name)
    previous = forced_backend()
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous


def select(device, dtype, dtypes=None):
    """The seqfast kernel family ("reference", "cpp" or "triton") that runs an op whose tensors live on ``device``
    with floating dtype ``dtype``; ``dtypes`` ({backend: dtypes}) narrows what an op's kernels cover. "reference"
    here means no kernel covers the case: see :func:`use_torch_op` for when torch's own op runs instead."""
    forced = forced_backend()
    if forced is None or forced == "torch":
        if device.type == "cuda":
            forced = "triton"
        elif device.type == "cpu":
            forced = "cpp"
        else:
            return "reference"
    if forced == "reference":
        return "reference"
    if forced == "cpp" and device.type != "cpu":
        raise RuntimeError(f"seqfast backend 'cpp' runs CPU tensors only, got tensors on {device}")
    if forced == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("seqfast backend 'triton' on CPU tensors needs Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing triton")
    if dtype not in (dtypes or _DTYPES).get(forced, _DTYPES[forced]):
        return "reference"
    if forced == "cpp":
        from . import _ext
        if not _ext.available():
            return "reference"
    return forced


def use_torch_op(kernel_backend):
    """Whether a call should run torch's own op instead of a seqfast kernel: "torch" is forced, or nothing is forced
    and seqfast has no kernel for the case (``kernel_backend``, from :func:`select`, is "reference")."""
    forced = forced_backend()
    return forced == "torch" or (forced is None and kernel_backend == "reference")


def use_torch_for_feature():
    """Whether a feature no seqfast kernel implements (attention dropout, a mask that needs a gradient) runs torch's
    own op: always, unless the reference is forced (then seqfast's plain PyTorch oracle)."""
    return forced_backend() != "reference"
