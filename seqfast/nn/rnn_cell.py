"""Drop-in LSTMCell / GRUCell / RNNCell: torch's classes (constructor, parameters, init, state_dict, checks) with a
forward that runs seqfast's fused cell kernels."""
import torch

from .. import _backend, _ext, _rules, autotune as _autotune
from .. import functional as seqfast_F
from ..functional import _rnn_cell
from ..functional._rnn_cell import _native
from ..ops import rnn_cell as _ops
from ._parameters import parameters_named


def _unbatched(module_name, input, states, names):
    """torch's input-rank checks; True when input is 1-D (one sample), after which the caller unsqueezes."""
    dim = input.dim()
    if dim != 1 and dim != 2:
        raise ValueError(f"{module_name}: Expected input to be 1D or 2D, got {dim}D instead")
    for name, value in zip(names, states):
        if value is not None and value.dim() not in (1, 2):
            raise ValueError(f"{module_name}: Expected {name} to be 1D or 2D, got {value.dim()}D instead")
    return dim == 1


_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # the functional cells' argument order


def _zeros(module, input):
    return torch.zeros(input.size(0), module.hidden_size, dtype=input.dtype, device=input.device)


_GATES = {"lstm_cell": 4, "gru_cell": 3, "rnn_cell": 1}
_OPS = {"lstm_cell": _ops.lstm_cell, "gru_cell": _ops.gru_cell, "rnn_cell": _ops.rnn_cell}


def _python_allows_call():
    """What the C++ step (seqfast._C.CellCall) cannot see: a forced backend, autotune, torch.compile tracing."""
    return _backend.forced_backend() is None and not _autotune._enabled and not torch.compiler.is_compiling()


def _fast_step(module, family, input, hx):
    """One step through the module's C++ call (seqfast._C.CellCall: grad mode and requires_grad, autocast, the
    tensors, the parameters, the rule table and torch's shape errors checked in C++): the kernel where autograd records
    nothing, torch's op where it records the step and the rule table prefers torch's op for training; None where the
    Python path decides. A seq2seq decoder calls a cell per generated token, and at batch 1 the Python between forward
    and the kernel cost about a third of the step. The call is built on the first step and again when it went stale
    (a replaced parameter, a dtype change, a new rule table)."""
    if hx is None or not _python_allows_call():
        return None
    call = module.__dict__.get("_seqfast_call")
    if call:
        result = call(input, hx)
        if result is not None or not call.stale():
            return result
    if not isinstance(input, torch.Tensor):
        return None
    # None: never built; False: none could be built for this parameter set and input dtype / device (a parametrized
    # weight, a CUDA input): not tried again on every step
    key = (tuple(map(id, module._parameters.values())), input.dtype, input.device)
    if call is False and module.__dict__.get("_seqfast_call_key") == key:
        return None
    call = _build_call(module, family, input)
    module.__dict__["_seqfast_call"] = call or False
    module.__dict__["_seqfast_call_key"] = key
    return None if call is None else call(input, hx)


def _build_call(module, family, input):
    """The module's seqfast._C.CellCall for inputs of ``input``'s kind, or None where only the Python path serves (no
    extension, a parametrized weight, an input of another dtype, another device)."""
    params = module._parameters
    if not isinstance(input, torch.Tensor) or any(name not in params for name in _WEIGHTS):
        return None
    w_ih, w_hh, b_ih, b_hh = (params[name] for name in _WEIGHTS)
    dtype, op = input.dtype, _OPS[family]
    if w_ih is None or w_ih.dtype != dtype or _ext.module() is None or not _native():
        return None
    if op.runs_cpp(input):
        torch_op, float32 = False, 0
    elif op.runs_torch_op(input) and input.is_cpu:
        # no C++ kernel for this dtype: seqfast.functional runs torch's cell op, and so does the call, except for the
        # bfloat16 steps the functional computes in float32: on upcast copies (seqfast._rules.upcast_bfloat16), left
        # to it, and below those rows on float32 activations with the weights read in place
        # (seqfast._rules.bf16_weights_in_place), which the call runs itself; both up to the rules' float32 bounds
        torch_op = True
        float32 = (_rules.float32_bfloat16_max_batch(family, module.hidden_size) if dtype is torch.bfloat16
                   and not torch.compiler.is_compiling() else 0)
    else:
        return None
    return _ext.module().CellCall(
        _GATES[family], getattr(module, "nonlinearity", "tanh") == "relu", params, list(params.values()), w_ih, w_hh,
        b_ih, b_hh, _rules.torch_batches(family, dtype, False, module.hidden_size),
        _rules.torch_batches(family, dtype, True, module.hidden_size), torch_op,
        _rnn_cell.bf16_upcast_min_rows() if float32 else 0, bool(float32) and _rnn_cell.bf16_weight_kernels(),
        float32, _rules.fused_bf16_cells_past_float32())


class _CellCallState:
    """The C++ step names this module's parameters (and cannot be copied): a copy or a pickle builds its own."""

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_seqfast_call", None)
        state.pop("_seqfast_call_key", None)
        return state


class LSTMCell(_CellCallState, torch.nn.LSTMCell):
    __doc__ = torch.nn.LSTMCell.__doc__

    def forward(self, input, hx=None):
        result = _fast_step(self, "lstm_cell", input, hx)
        if result is not None:
            return result
        if input.dim() == 2 and hx is not None and len(hx) == 2 and hx[0].dim() == 2 and hx[1].dim() == 2:
            # a batched step with its states given: nothing to adapt
            return seqfast_F.lstm_cell(input, hx, *parameters_named(self, _WEIGHTS))
        states = (None, None) if hx is None else hx
        single = _unbatched("LSTMCell", input, states, ("hx[0]", "hx[1]", "hx[2]"))
        if single:
            input = input.unsqueeze(0)
            if hx is not None:
                # as torch's LSTMCell: hx[0] and hx[1] only (a 1-tuple raises IndexError, a third entry is not used)
                hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if hx is None:
            zeros = _zeros(self, input)
            hx = (zeros, zeros)
        hy, cy = seqfast_F.lstm_cell(input, hx, *parameters_named(self, _WEIGHTS))
        return (hy.squeeze(0), cy.squeeze(0)) if single else (hy, cy)


class GRUCell(_CellCallState, torch.nn.GRUCell):
    __doc__ = torch.nn.GRUCell.__doc__

    def forward(self, input, hx=None):
        result = _fast_step(self, "gru_cell", input, hx)
        if result is not None:
            return result
        if input.dim() == 2 and hx is not None and hx.dim() == 2:  # a batched step with a state: nothing to adapt
            return seqfast_F.gru_cell(input, hx, *parameters_named(self, _WEIGHTS))
        single = _unbatched("GRUCell", input, (hx,), ("hidden",))
        if single:
            input = input.unsqueeze(0)
            hx = None if hx is None else hx.unsqueeze(0)
        hy = seqfast_F.gru_cell(input, _zeros(self, input) if hx is None else hx, *parameters_named(self, _WEIGHTS))
        return hy.squeeze(0) if single else hy


class RNNCell(_CellCallState, torch.nn.RNNCell):
    __doc__ = torch.nn.RNNCell.__doc__

    def forward(self, input, hx=None):
        result = _fast_step(self, "rnn_cell", input, hx)
        if result is not None:
            return result
        if input.dim() == 2 and hx is not None and hx.dim() == 2:  # a batched step with a state: nothing to adapt
            return seqfast_F.rnn_cell(input, hx, *parameters_named(self, _WEIGHTS), self.nonlinearity)
        single = _unbatched("RNNCell", input, (hx,), ("hidden",))
        if single:
            input = input.unsqueeze(0)
            hx = None if hx is None else hx.unsqueeze(0)
        hy = seqfast_F.rnn_cell(input, _zeros(self, input) if hx is None else hx, *parameters_named(self, _WEIGHTS),
                                self.nonlinearity)
        return hy.squeeze(0) if single else hy
