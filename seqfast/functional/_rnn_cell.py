"""Functional LSTM / GRU / RNN cells (one time step), with the checks and error messages of torch's _VF.*_cell.

Cells take batched 2-D input ([B, I]) and states ([B, H]); the nn modules add unbatched input and default states.
Every tensor reaches the kernels in the shape they read (strides as they come: each backend's entry makes its
arguments dense, e.g. a bias expanded with stride 0 through torch.func.functional_call); anything else (a weight or
bias of another shape, which torch either rejects or broadcasts) is handed to torch's own cell op, so the caller gets
torch's exact result or error.
"""
import torch

from .. import _backend, _ext, _rules, autotune as _autotune
from ..ops import rnn_cell as _ops

_NAMES = {4: "lstm_cell", 3: "gru_cell", 1: "rnn_cell"}
# torch's own cell ops, looked up once (torch._VF resolves every attribute through a Python __getattr__)
_TORCH_LSTM_CELL, _TORCH_GRU_CELL = torch._VF.lstm_cell, torch._VF.gru_cell
_TORCH_RNN_CELL = {"tanh": torch._VF.rnn_tanh_cell, "relu": torch._VF.rnn_relu_cell}
_native_check = None  # seqfast._C.check_cell_args once looked up; False without the extension


def _native():
    """seqfast._C.check_cell_args, or False without the extension (looked up once)."""
    global _native_check
    if _native_check is None:
        module = _ext.module()
        _native_check = getattr(module, "check_cell_args", False) if module is not None else False
    return _native_check


_no_grad_kernels = {}  # (op name, forced backend, dtype, device) -> the C++ forward, or False


def _no_grad_kernel(op, input):
    """The C++ forward that a no-grad step on ``input``'s kind of tensor calls straight after the native checks, or
    None where the regular path decides: grad mode on (autograd records the op), autocast, torch.compile tracing,
    a torch.func transform (vmap's batched tensors have no data pointer), another backend for this dtype / device,
    no extension, or a rule of the performance floor that may prefer torch's op for this cell in inference. A seq2seq
    decoder calls a cell per generated token: this path skips the dispatch layers between the functional and the
    kernel (the same checks run, in C++)."""
    if (torch.is_grad_enabled() or torch._C._is_any_autocast_enabled() or torch.compiler.is_compiling()
            or torch._C._functorch.peek_interpreter_stack() is not None):  # a torch.func transform's wrapped tensors
        return None
    key = (op.name, _backend.forced_backend(), input.dtype, input.device)
    kernel = _no_grad_kernels.get(key)
    if kernel is None:
        kernel = _no_grad_kernels[key] = (op.runs_cpp(input) and bool(_native()) and op._resolve(input, 2)) or False
    if kernel is False or _rules.covers(op.name, input.dtype, False):
        return None
    return kernel


def _rows(input):
    """The batch of a cell step (0 for an input that is not 2-D: the regular path raises torch's error)."""
    return input.shape[0] if input.dim() == 2 else 0


def _floats(*tensors):
    """float32 copies for a bfloat16 step computed in float32 (seqfast._rules.upcast_bfloat16); None stays None."""
    return [None if t is None else t.float() for t in tensors]


def bf16_weight_kernels():
    """seqfast._C.bf16_cell_weights_supported(): the C++ cell kernels take bfloat16 weights (asked once)."""
    global _bf16_weight_kernels
    if _bf16_weight_kernels is None:
        module = _ext.module()
        _bf16_weight_kernels = bool(module is not None and getattr(module, "bf16_cell_weights_supported", bool)())
    return _bf16_weight_kernels


_bf16_weight_kernels = None


def bf16_upcast_min_rows():
    """The fewest rows (batch, or steps x batch) of a bfloat16 call that takes the float32 upcast path on a CPU
    without native bfloat16: past seqfast._rules.BF16_IN_PLACE_MAX_ROWS where the C++ cell kernels read bfloat16
    weights in place (the smaller calls run those), else seqfast._rules.UPCAST_BF16_MIN_ROWS. The modules' C++ calls
    leave the calls from there on to the Python path."""
    return _rules.BF16_IN_PLACE_MAX_ROWS + 1 if bf16_weight_kernels() else _rules.UPCAST_BF16_MIN_ROWS


def _bf16_weights(gates, input, h, c, w_ih, w_hh, b_ih, b_hh):
    """Whether this bfloat16 step runs the float32 C++ kernels with its bfloat16 weights read in place
    (seqfast._rules.bf16_weights_in_place): the extension has those kernels, and torch's checks pass with the weights
    and biases in the layout the kernels read."""
    rows = _rows(input)
    return (bf16_weight_kernels()
            and _rules.bf16_weights_in_place((input, h, c, w_ih, w_hh, b_ih, b_hh), rows, _NAMES[gates], rows,
                                             _hidden(w_hh))
            and _check(gates, input, h, c, w_ih, w_hh, b_ih, b_hh))


def _hidden(w_hh):
    """The hidden size of a cell's recurrent weight (0 for a weight that is not 2-D: torch's op then raises)."""
    return w_hh.shape[1] if w_hh.dim() == 2 else 0


def _upcast(family, input, tensors, w_hh):
    """seqfast._rules.upcast_bfloat16 for a cell step of ``family`` (its seven tensors, None where absent)."""
    rows = _rows(input)
    return _rules.upcast_bfloat16(tensors, rows, family, rows, _hidden(w_hh))


def _tuned(name, input, w_ih, w_hh, torch_call, seqfast_call):
    """A no-grad step with autotuning on (seqfast.autotune): the path measured fastest for this shape class."""
    key = (name, input.dtype, _autotune.size_class(input.shape[0]), _autotune.size_class(w_hh.shape[1]),
           _autotune.size_class(w_ih.shape[1]), torch.get_num_threads())
    return _autotune.run(key, torch_call, seqfast_call)


def _check(gates, input, h, c, w_ih, w_hh, b_ih, b_hh):
    """:func:`_check_cell` for a cell with ``gates`` gates (``c``: the LSTM's cell state, else None), run by its C++
    twin where the extension loaded (seqfast._C.check_cell_args: the same checks in the same order with the same
    shape messages, at a fraction of the Python's cost on a batch-1 decoder step; it reports a dtype / device mismatch
    and the error is raised here). Not while torch.compile traces: Dynamo cannot see into it."""
    native = _native()
    if native and not torch.compiler.is_compiling():  # Dynamo traces the Python twin
        verdict = native(gates, input, h, c, w_ih, w_hh, b_ih, b_hh, torch._C._is_any_autocast_enabled())
        if verdict == 2:  # a dtype or device differs from the input's: the named error, worded in Python
            _raise_mismatch(_NAMES[gates], input, (h,) if c is None else (h, c), w_ih, w_hh, b_ih, b_hh)
        return verdict == 1
    return _check_cell(_NAMES[gates], gates, input, (h,) if c is None else (h, c), w_ih, w_hh, b_ih, b_hh)


def _check_cell(name, gates, input, states, w_ih, w_hh, b_ih, b_hh):
    """torch's checks (and messages) of the input and states; returns False where the weights or biases are not in
    the layout the kernels read (the caller then runs torch's op, which raises or broadcasts as torch does).
    Kept lean: it runs on every step of a decoder loop (each size is read once, devices only on a mismatch)."""
    shape = input.shape
    batch, input_size = shape[0], shape[1]
    wi, wh = w_ih.shape, w_hh.shape
    if input_size != wi[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {input_size} expected {wi[1]}")
    hidden = wh[1]
    for i, h in enumerate(states):
        shape = h.shape
        if batch != shape[0]:
            raise RuntimeError(f"Input batch size {batch} doesn't match hidden{i} batch size {shape[0]}")
        if shape[1] != hidden:
            raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {shape[1]}, expected {hidden}")
        if len(shape) != 2:
            raise RuntimeError(f"{name}: expected hidden{i} to be 2-D, got {len(shape)}-D")
    rows = gates * hidden
    if len(wi) != 2 or len(wh) != 2 or wi[0] != rows or wh[0] != rows:
        return False
    for b in (b_ih, b_hh):
        if b is not None and b.shape != (rows,):
            return False
    # one cheap pass (dtypes are singletons; is_cpu needs no device object); the named errors only when it fails
    dtype, on_cpu = input.dtype, input.is_cpu
    for t in (w_ih, w_hh, *states, b_ih, b_hh):
        if t is not None and (t.dtype is not dtype or t.is_cpu is not on_cpu
                              or (not on_cpu and t.device != input.device)):
            if not torch._C._is_any_autocast_enabled():  # under autocast the op casts itself
                _raise_mismatch(name, input, states, w_ih, w_hh, b_ih, b_hh)
            break
    return True


def _raise_mismatch(name, input, states, w_ih, w_hh, b_ih, b_hh):
    """The named dtype / device error for the first tensor that differs from the input."""
    dtype, device = input.dtype, input.device
    named = [(w_ih, "weight_ih"), (w_hh, "weight_hh")] + [(h, f"hidden{i}") for i, h in enumerate(states)]
    named += [(b, what) for b, what in ((b_ih, "bias_ih"), (b_hh, "bias_hh")) if b is not None]
    for t, what in named:
        if t.dtype != dtype:
            raise RuntimeError(f"{name}: expected {what} to have dtype {dtype} (the input's), got {t.dtype}")
        if t.device != device:
            raise RuntimeError(f"{name}: expected {what} on device {device} (the input's), got {t.device}")


def _torch_faster(family, input, h, c, w_ih, w_hh, b_ih, b_hh):
    """The performance floor (seqfast._rules): torch's own cell where it beats seqfast's kernel on this CPU. Spelled
    out for the cells' seven tensors: it runs on every step, and after a backward pass every line runs on cold
    caches."""
    training = torch.is_grad_enabled() and (
        w_hh.requires_grad or w_ih.requires_grad or input.requires_grad or h.requires_grad
        or (c is not None and c.requires_grad) or (b_ih is not None and b_ih.requires_grad)
        or (b_hh is not None and b_hh.requires_grad))
    if not _rules.covers(family, input.dtype, training):
        return False  # decided before reading any shape (a no-grad decoder step's usual case)
    return _rules.prefer_torch_when(family, input, input.shape[0], w_hh.shape[1], training)


# Each cell asks first whether torch's op runs the call (no seqfast kernel for its dtype / device, or the performance
# floor's rules): torch's op then checks its own arguments. seqfast's checks run only before a seqfast kernel.


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One LSTM step, as torch._VF.lstm_cell: ``hx`` is ``(h, c)``; returns ``(h', c')``."""
    if not isinstance(hx, (tuple, list)):  # (a tensor stacking h and c would unpack as two states here)
        raise TypeError(f"lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not {type(hx).__name__}")
    if len(hx) != 2:
        raise RuntimeError("lstm_cell expects two hidden states")
    h, c = hx
    if c.dtype != input.dtype and isinstance(c, torch.Tensor) and c.is_floating_point():
        # torch's cell promotes a cell state of another floating dtype (its pointwise part mixes them): its op
        return _TORCH_LSTM_CELL(input, (h, c), w_ih, w_hh, b_ih, b_hh)
    if input.dtype is torch.bfloat16:
        if _bf16_weights(4, input, h, c, w_ih, w_hh, b_ih, b_hh):
            hy, cy, _ = _ops.lstm_cell(input.float(), h.float(), c.float(), w_ih, w_hh, b_ih, b_hh)
            return hy.to(torch.bfloat16), cy.to(torch.bfloat16)
        if _upcast("lstm_cell", input, (input, h, c, w_ih, w_hh, b_ih, b_hh), w_hh):
            hy, cy = lstm_cell(input.float(), (h.float(), c.float()), *_floats(w_ih, w_hh, b_ih, b_hh))
            return hy.to(torch.bfloat16), cy.to(torch.bfloat16)
    kernel = _no_grad_kernel(_ops.lstm_cell, input)
    if kernel is not None and _native_check(4, input, h, c, w_ih, w_hh, b_ih, b_hh, False) == 1:
        if _autotune._enabled:
            return _tuned("lstm_cell", input, w_ih, w_hh,
                          lambda: _TORCH_LSTM_CELL(input, (h, c), w_ih, w_hh, b_ih, b_hh),
                          lambda: kernel(input, h, c, w_ih, w_hh, b_ih, b_hh)[:2])
        hy, cy, _ = kernel(input, h, c, w_ih, w_hh, b_ih, b_hh)
        return hy, cy
    if (_ops.lstm_cell.runs_torch_op(input) or _torch_faster("lstm_cell", input, h, c, w_ih, w_hh, b_ih, b_hh)
            or not _check(4, input, h, c, w_ih, w_hh, b_ih, b_hh)):
        return _TORCH_LSTM_CELL(input, (h, c), w_ih, w_hh, b_ih, b_hh)
    hy, cy, _ = _ops.lstm_cell(input, h, c, w_ih, w_hh, b_ih, b_hh)
    return hy, cy


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One GRU step, as torch._VF.gru_cell; returns ``h'``."""
    if input.dtype is torch.bfloat16:
        if _bf16_weights(3, input, hx, None, w_ih, w_hh, b_ih, b_hh):
            return _ops.gru_cell(input.float(), hx.float(), w_ih, w_hh, b_ih, b_hh)[0].to(torch.bfloat16)
        if _upcast("gru_cell", input, (input, hx, w_ih, w_hh, b_ih, b_hh), w_hh):
            return gru_cell(input.float(), hx.float(), *_floats(w_ih, w_hh, b_ih, b_hh)).to(torch.bfloat16)
    kernel = _no_grad_kernel(_ops.gru_cell, input)
    if kernel is not None and _native_check(3, input, hx, None, w_ih, w_hh, b_ih, b_hh, False) == 1:
        if _autotune._enabled:
            return _tuned("gru_cell", input, w_ih, w_hh, lambda: _TORCH_GRU_CELL(input, hx, w_ih, w_hh, b_ih, b_hh),
                          lambda: kernel(input, hx, w_ih, w_hh, b_ih, b_hh)[0])
        return kernel(input, hx, w_ih, w_hh, b_ih, b_hh)[0]
    if (_ops.gru_cell.runs_torch_op(input) or _torch_faster("gru_cell", input, hx, None, w_ih, w_hh, b_ih, b_hh)
            or not _check(3, input, hx, None, w_ih, w_hh, b_ih, b_hh)):
        return _TORCH_GRU_CELL(input, hx, w_ih, w_hh, b_ih, b_hh)
    hy, _ = _ops.gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)
    return hy


def rnn_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """One Elman RNN step (``nonlinearity`` "tanh" or "relu"), as torch._VF.rnn_tanh_cell / rnn_relu_cell."""
    if nonlinearity not in ("tanh", "relu"):
        raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}")
    if input.dtype is torch.bfloat16:
        if _bf16_weights(1, input, hx, None, w_ih, w_hh, b_ih, b_hh):
            hy = _ops.rnn_cell(input.float(), hx.float(), w_ih, w_hh, b_ih, b_hh, nonlinearity == "relu")
            return hy.to(torch.bfloat16)
        if _upcast("rnn_cell", input, (input, hx, w_ih, w_hh, b_ih, b_hh), w_hh):
            return rnn_cell(input.float(), hx.float(), *_floats(w_ih, w_hh, b_ih, b_hh), nonlinearity).to(torch.bfloat16)
    kernel = _no_grad_kernel(_ops.rnn_cell, input)
    if kernel is not None and _native_check(1, input, hx, None, w_ih, w_hh, b_ih, b_hh, False) == 1:
        if _autotune._enabled:
            return _tuned(f"rnn_cell_{nonlinearity}", input, w_ih, w_hh,
                          lambda: _TORCH_RNN_CELL[nonlinearity](input, hx, w_ih, w_hh, b_ih, b_hh),
                          lambda: kernel(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity == "relu"))
        return kernel(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity == "relu")
    if (_ops.rnn_cell.runs_torch_op(input) or _torch_faster("rnn_cell", input, hx, None, w_ih, w_hh, b_ih, b_hh)
            or not _check(1, input, hx, None, w_ih, w_hh, b_ih, b_hh)):
        return _TORCH_RNN_CELL[nonlinearity](input, hx, w_ih, w_hh, b_ih, b_hh)
    return _ops.rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity == "relu")
