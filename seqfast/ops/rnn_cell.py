"""Fused single-step LSTM, GRU and RNN cells: seqfast::lstm_cell, seqfast::gru_cell, seqfast::rnn_cell.

Forward kernels compute the gate GEMMs with bias, activations and state update fused; backward kernels compute all
gate derivatives in one pass, then the input/hidden/weight GEMMs. Shapes: x [B, I], states [B, H], w_ih [G*H, I],
w_hh [G*H, H] (G = 4 LSTM, 3 GRU, 1 RNN).
"""
import torch

from ..reference import rnn_cell as reference
from .fused_op import FusedOp, Kernels, any_requires_grad, defined_grad, keep_for_backward, kept_tensors, needed

# the C++ cell kernels are float32/float64 (bfloat16 cells run the reference on CPU)
_DTYPES = {"cpp": (torch.float32, torch.float64)}

_W = "Tensor x, Tensor hx"
_P = "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh"


def _triton():
    from ..kernels import rnn_cell  # imports triton: on first use only
    return rnn_cell


def _dense(kernel):
    """A Triton cell launcher fed contiguous tensors (its convention). The C++ entries make their own arguments
    contiguous and the reference takes any strides, so the functional layer passes tensors as they come: a decoder
    step then pays for no contiguity checks on the CPU path."""
    def launch(*args):
        return kernel(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args))
    launch.__name__ = launch.__qualname__ = kernel.__name__
    return launch


def _like(t):
    # contiguous, as every backend returns its outputs (inputs may come strided: fakes must not copy their strides)
    return t.new_empty(t.shape)


def _empty_like_rows(x, hx, cols):
    return hx.new_empty((x.shape[0], cols))


# ---------------------------------------------------------------- LSTM
def _lstm_fake(x, hx, cx, w_ih, w_hh, b_ih, b_hh):
    return _like(hx), _like(cx), _empty_like_rows(x, hx, w_ih.shape[0])


def _lstm_bwd_fake(ghy, gcy, x, hx, cx, w_ih, w_hh, gates, cy):
    return (_like(x), _like(hx), _like(cx), _like(w_ih),
            _like(w_hh), w_ih.new_empty(w_ih.shape[0]))


# What each cell's backward reads, as torch's cell saves it (seqfast.ops.fused_op.keep_for_backward; the C++ nodes of
# csrc/rnn/rnn_cell_autograd.cpp keep the same): x for W_ih's gradient, hx for W_hh's, W_ih for x's, W_hh for hx's,
# the LSTM's cx wherever the gates need a gradient and a copy of its cy (torch keeps tanh(cy), not the cy it returns),
# the GRU's hx always (a copy where W_hh is frozen: torch keeps hx - n there).
def _lstm_save(ctx, inputs, output):
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = inputs
    hy, cy, gates = output
    keep_for_backward(ctx, (x, hx, cx, w_ih, w_hh, gates, cy.clone()),
                      (w_ih.requires_grad, w_hh.requires_grad, any_requires_grad(x, hx, w_ih, w_hh, b_ih, b_hh),
                       x.requires_grad, hx.requires_grad, True, True))
    ctx.bias = (b_ih is not None, b_hh is not None)


def _lstm_grad(ctx, grads, run_backward):
    x, hx, cx, w_ih, w_hh, gates, cy = kept_tensors(ctx)
    ghy, gcy = defined_grad(grads[0], hx), defined_grad(grads[1], cx)
    dx, dhx, dcx, dw_ih, dw_hh, db = run_backward(ghy, gcy, x, hx, cx, w_ih, w_hh, gates, cy,
                                                  needs=needed(ctx, 0, 1, 3, 4))
    return dx, dhx, dcx, dw_ih, dw_hh, db if ctx.bias[0] else None, db if ctx.bias[1] else None


lstm_cell = FusedOp(
    "lstm_cell", cpp_check="rnn_kernels_supported",
    reference=Kernels(reference.lstm_cell_forward, reference.lstm_cell_backward),
    cpp=lambda C: Kernels(C.lstm_cell_forward, C.lstm_cell_backward, skips_grads=True),
    triton=lambda: Kernels(_dense(_triton().lstm_cell_forward), _dense(_triton().lstm_cell_backward)),
    schema=f"(Tensor x, Tensor hx, Tensor cx, {_P}) -> (Tensor, Tensor, Tensor)",
    backward_schema="(Tensor grad_hy, Tensor grad_cy, Tensor x, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, "
                    "Tensor gates, Tensor cy) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_lstm_fake, backward_fake=_lstm_bwd_fake, save=_lstm_save, grad=_lstm_grad,
    num_outputs_differentiable=2, cpu_autocast=False, dtypes=_DTYPES)


# ---------------------------------------------------------------- GRU
def _gru_fake(x, hx, w_ih, w_hh, b_ih, b_hh):
    return _like(hx), _empty_like_rows(x, hx, 4 * hx.shape[1])


def _gru_bwd_fake(ghy, x, hx, w_ih, w_hh, ws):
    return (_like(x), _like(hx), _like(w_ih), _like(w_hh),
            w_ih.new_empty(w_ih.shape[0]), w_hh.new_empty(w_hh.shape[0]))


def _gru_save(ctx, inputs, output):
    x, hx, w_ih, w_hh, b_ih, b_hh = inputs
    keep_for_backward(ctx, (x, hx if w_hh.requires_grad else hx.clone(), w_ih, w_hh, output[1]),
                      (w_ih.requires_grad, True, x.requires_grad, hx.requires_grad, True))
    ctx.bias = (b_ih is not None, b_hh is not None)


def _gru_grad(ctx, grads, run_backward):
    x, hx, w_ih, w_hh, ws = kept_tensors(ctx)
    dx, dhx, dw_ih, dw_hh, db_ih, db_hh = run_backward(defined_grad(grads[0], hx), x, hx, w_ih, w_hh, ws,
                                                       needs=needed(ctx, 0, 1, 2, 3))
    return dx, dhx, dw_ih, dw_hh, db_ih if ctx.bias[0] else None, db_hh if ctx.bias[1] else None


gru_cell = FusedOp(
    "gru_cell", cpp_check="rnn_kernels_supported",
    reference=Kernels(reference.gru_cell_forward, reference.gru_cell_backward),
    cpp=lambda C: Kernels(C.gru_cell_forward, C.gru_cell_backward, skips_grads=True),
    triton=lambda: Kernels(_dense(_triton().gru_cell_forward), _dense(_triton().gru_cell_backward)),
    schema=f"({_W}, {_P}) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_hy, Tensor x, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor ws) "
                    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_gru_fake, backward_fake=_gru_bwd_fake, save=_gru_save, grad=_gru_grad,
    num_outputs_differentiable=1, cpu_autocast=False, dtypes=_DTYPES)


# ---------------------------------------------------------------- Elman RNN (tanh / relu)
def _rnn_fake(x, hx, w_ih, w_hh, b_ih, b_hh, relu):
    return _like(hx)


def _rnn_bwd_fake(ghy, x, hx, w_ih, w_hh, hy, relu):
    return (_like(x), _like(hx), _like(w_ih), _like(w_hh),
            w_ih.new_empty(w_ih.shape[0]))


def _rnn_save(ctx, inputs, output):
    x, hx, w_ih, w_hh, b_ih, b_hh, relu = inputs
    keep_for_backward(ctx, (x, hx, w_ih, w_hh, output),
                      (w_ih.requires_grad, w_hh.requires_grad, x.requires_grad, hx.requires_grad, True))
    ctx.bias = (b_ih is not None, b_hh is not None)
    ctx.relu = relu


def _rnn_grad(ctx, grads, run_backward):
    x, hx, w_ih, w_hh, hy = kept_tensors(ctx)
    dx, dhx, dw_ih, dw_hh, db = run_backward(defined_grad(grads[0], hx), x, hx, w_ih, w_hh, hy, ctx.relu,
                                             needs=needed(ctx, 0, 1, 2, 3))
    return dx, dhx, dw_ih, dw_hh, db if ctx.bias[0] else None, db if ctx.bias[1] else None, None


rnn_cell = FusedOp(
    "rnn_cell", cpp_check="rnn_kernels_supported",
    reference=Kernels(reference.rnn_cell_forward, reference.rnn_cell_backward),
    cpp=lambda C: Kernels(C.rnn_cell_forward, C.rnn_cell_backward, skips_grads=True),
    triton=lambda: Kernels(_dense(_triton().rnn_cell_forward), _dense(_triton().rnn_cell_backward)),
    schema=f"({_W}, {_P}, bool relu) -> Tensor",
    backward_schema="(Tensor grad_hy, Tensor x, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor hy, bool relu) "
                    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_rnn_fake, backward_fake=_rnn_bwd_fake, save=_rnn_save, grad=_rnn_grad,
    num_outputs_differentiable=1, dtypes=_DTYPES)

