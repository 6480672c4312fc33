"""Functional LSTM / GRU / RNN cells (one time step), with the checks and error messages of torch's _VF.*_cell.

Cells take batched 2-D input ([B, I]) and states ([B, H]); the nn modules add unbatched input and default states.
Every tensor reaches the kernels contiguous and of the shape they read; anything else (a weight or bias of another
shape, which torch either rejects or broadcasts) is handed to torch's own cell op, so the caller gets torch's exact
result or error.
"""
import torch

from .. import _rules
from ..ops import rnn_cell as _ops


def _check_cell(name, gates, input, states, w_ih, w_hh, b_ih, b_hh):
    """torch's checks (and messages) of the input and states; returns False where the weights or biases are not in
    the layout the kernels read (the caller then runs torch's op, which raises or broadcasts as torch does).
    Kept lean: it runs on every step of a decoder loop."""
    batch, input_size = input.shape[0], input.shape[1]
    if input_size != w_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {input_size} expected {w_ih.shape[1]}")
    hidden, dtype, device = w_hh.shape[1], input.dtype, input.device
    for i, h in enumerate(states):
        shape = h.shape
        if batch != shape[0]:
            raise RuntimeError(f"Input batch size {batch} doesn't match hidden{i} batch size {shape[0]}")
        if shape[1] != hidden:
            raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {shape[1]}, expected {hidden}")
        if len(shape) != 2:
            raise RuntimeError(f"{name}: expected hidden{i} to be 2-D, got {len(shape)}-D")
    rows = gates * hidden
    if w_ih.dim() != 2 or w_hh.dim() != 2 or w_ih.shape[0] != rows or w_hh.shape[0] != rows:
        return False
    for b in (b_ih, b_hh):
        if b is not None and (b.dim() != 1 or b.shape[0] != rows):
            return False
    # one cheap pass (dtypes are singletons; is_cpu needs no device object); the named errors only when it fails
    on_cpu = input.is_cpu
    tensors = (w_ih, w_hh, *states, b_ih, b_hh)
    if any(t is not None and (t.dtype is not dtype or t.is_cpu is not on_cpu or (not on_cpu and t.device != device))
           for t in tensors) and not torch._C._is_any_autocast_enabled():  # under autocast the op casts itself
        named = [(w_ih, "weight_ih"), (w_hh, "weight_hh")] + [(h, f"hidden{i}") for i, h in enumerate(states)]
        named += [(b, what) for b, what in ((b_ih, "bias_ih"), (b_hh, "bias_hh")) if b is not None]
        for t, what in named:
            if t.dtype != dtype:
                raise RuntimeError(f"{name}: expected {what} to have dtype {dtype} (the input's), got {t.dtype}")
            if t.device != device:
                raise RuntimeError(f"{name}: expected {what} on device {device} (the input's), got {t.device}")
    return True


def _torch_faster(family, input, states, w_ih, w_hh, b_ih, b_hh):
    """The performance floor (seqfast._rules): torch's own cell where it beats seqfast's kernel on this CPU."""
    return _rules.prefer_torch(family, input, input.shape[0], w_hh.shape[1], (input, *states, w_ih, w_hh, b_ih, b_hh))


def _dense(b):
    # biases can arrive strided or expanded (stride 0), e.g. through torch.func.functional_call
    return None if b is None else b.contiguous()


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One LSTM step, as torch._VF.lstm_cell: ``hx`` is ``(h, c)``; returns ``(h', c')``."""
    if len(hx) != 2:
        raise RuntimeError("lstm_cell expects two hidden states")
    h, c = hx
    if (not _check_cell("lstm_cell", 4, input, (h, c), w_ih, w_hh, b_ih, b_hh) or _ops.lstm_cell.runs_torch_op(input)
            or _torch_faster("lstm_cell", input, (h, c), w_ih, w_hh, b_ih, b_hh)):
        return torch._VF.lstm_cell(input, (h, c), w_ih, w_hh, b_ih, b_hh)
    hy, cy, _ = _ops.lstm_cell(input.contiguous(), h.contiguous(), c.contiguous(), w_ih.contiguous(),
                               w_hh.contiguous(), _dense(b_ih), _dense(b_hh))
    return hy, cy


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One GRU step, as torch._VF.gru_cell; returns ``h'``."""
    if (not _check_cell("gru_cell", 3, input, (hx,), w_ih, w_hh, b_ih, b_hh) or _ops.gru_cell.runs_torch_op(input)
            or _torch_faster("gru_cell", input, (hx,), w_ih, w_hh, b_ih, b_hh)):
        return torch._VF.gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)
    hy, _ = _ops.gru_cell(input.contiguous(), hx.contiguous(), w_ih.contiguous(), w_hh.contiguous(), _dense(b_ih),
                          _dense(b_hh))
    return hy


def rnn_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """One Elman RNN step (``nonlinearity`` "tanh" or "relu"), as torch._VF.rnn_tanh_cell / rnn_relu_cell."""
    if nonlinearity not in ("tanh", "relu"):
        raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}")
    if (not _check_cell("rnn_cell", 1, input, (hx,), w_ih, w_hh, b_ih, b_hh) or _ops.rnn_cell.runs_torch_op(input)
            or _torch_faster("rnn_cell", input, (hx,), w_ih, w_hh, b_ih, b_hh)):
        native = torch._VF.rnn_relu_cell if nonlinearity == "relu" else torch._VF.rnn_tanh_cell
        return native(input, hx, w_ih, w_hh, b_ih, b_hh)
    return _ops.rnn_cell(input.contiguous(), hx.contiguous(), w_ih.contiguous(), w_hh.contiguous(), _dense(b_ih),
                         _dense(b_hh), nonlinearity == "relu")
