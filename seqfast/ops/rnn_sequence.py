"""One recurrent layer in one direction over a whole sequence: seqfast::lstm_layer, seqfast::lstm_proj_layer (an
LSTM with proj_size: C++ only, float32 / float64), seqfast::gru_layer, seqfast::rnn_layer. The input projection of
every step is one GEMM; the time loop runs inside the kernel layer (C++ on CPU, Triton on CUDA); the backward walks
time in reverse there and forms weight gradients with one GEMM over all steps.

Layout (PackedSequence's, time-major): x [N, I], step t in rows [off_t, off_t + bs_t), batch_sizes [T] int64 on the
CPU, non-increasing; padded input is bs_t = B for every t. See seqfast.reference.rnn_sequence for the exact
semantics.
"""
import torch

from ..reference import rnn_sequence as reference
from .fused_op import FusedOp, Kernels, any_requires_grad, defined_grad, keep_for_backward, kept_tensors, needed

_P = "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh"


def _triton():
    from ..kernels import rnn_sequence  # imports triton: on first use only
    return rnn_sequence


def _rows(x, h0, width=None, dtype=None):
    return h0.new_empty((x.shape[0], h0.shape[1] if width is None else width), dtype=dtype)


def _workspace_dtype(x, kind):
    """dtype of a workspace output. The cell state `cs` is kept at least in float32 (both kernels); gate
    workspaces too on CPU for bfloat16 (the C++ kernel runs its gate math in float32), in the input dtype on CUDA."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return wide if kind == "cs" or x.device.type == "cpu" else x.dtype


# ---------------------------------------------------------------- LSTM
def _lstm_fake(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    return (_rows(x, h0), torch.empty_like(h0), torch.empty_like(c0),
            _rows(x, h0, w_ih.shape[0], _workspace_dtype(x, "gates")), _rows(x, c0, dtype=_workspace_dtype(x, "cs")))


def _lstm_bwd_fake(g_out, g_hn, g_cn, x, batch_sizes, h0, c0, w_ih, w_hh, out, gates, cs, reverse):
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_ih),
            torch.empty_like(w_hh), w_ih.new_empty(w_ih.shape[0]))


def _through_states(batch_sizes, h0):
    """Whether a layer's backward sends a gradient through a state, so reads W_hh's values: a second step, or h0
    wanting one (at one step from a state without gradients torch's per-step graph keeps no W_hh)."""
    return batch_sizes.shape[0] > 1 or h0.requires_grad


# What each layer's backward reads, as torch's own layers save it (seqfast.ops.fused_op.keep_for_backward): x for
# W_ih's gradient, h0 for W_hh's (and, for the GRU, its update gate's: a copy where W_hh is frozen, since torch's
# cell keeps h - n there, not h), c0 wherever the gates need a gradient, W_ih for x's gradient, W_hh wherever a
# gradient goes through a state (_through_states); the outputs and the workspaces always.
def _lstm_save(ctx, inputs, output):
    x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse = inputs
    out, hn, cn, gates, cs = output
    keep_for_backward(ctx, (x, batch_sizes, h0, c0, w_ih, w_hh, out, gates, cs),
                      (w_ih.requires_grad, True, w_hh.requires_grad, any_requires_grad(x, h0, w_ih, w_hh, b_ih, b_hh),
                       x.requires_grad, _through_states(batch_sizes, h0), True, True, True))
    ctx.bias, ctx.reverse = (b_ih is not None, b_hh is not None), reverse


def _lstm_grad(ctx, grads, run_backward):
    x, batch_sizes, h0, c0, w_ih, w_hh, out, gates, cs = kept_tensors(ctx)
    dx, dh0, dc0, dw_ih, dw_hh, db = run_backward(
        defined_grad(grads[0], out), defined_grad(grads[1], h0), defined_grad(grads[2], c0), x, batch_sizes, h0, c0,
        w_ih, w_hh, out, gates, cs, ctx.reverse, needs=needed(ctx, 0, 4, 5))
    return (dx, None, dh0, dc0, dw_ih, dw_hh, db if ctx.bias[0] else None, db if ctx.bias[1] else None, None)


lstm_layer = FusedOp(
    "lstm_layer", cpp_check="rnn_kernels_supported",
    reference=Kernels(reference.lstm_layer_forward, reference.lstm_layer_backward),
    cpp=lambda C: Kernels(C.lstm_layer_forward, C.lstm_layer_backward, C.lstm_layer_inference, skips_grads=True),
    triton=lambda: Kernels(_triton().lstm_layer_forward, _triton().lstm_layer_backward),
    schema=f"(Tensor x, Tensor batch_sizes, Tensor h0, Tensor c0, {_P}, bool reverse) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    backward_schema="(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor x, Tensor batch_sizes, Tensor h0, "
                    "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor out, Tensor gates, Tensor cs, bool reverse) "
                    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_lstm_fake, backward_fake=_lstm_bwd_fake, save=_lstm_save, grad=_lstm_grad,
    num_outputs_differentiable=3)


# ---------------------------------------------------------------- LSTM with a projection (proj_size)
def _lstm_proj_fake(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    return (_rows(x, h0), torch.empty_like(h0), torch.empty_like(c0), _rows(x, c0, w_ih.shape[0]), _rows(x, c0),
            _rows(x, c0))


def _lstm_proj_bwd_fake(g_out, g_hn, g_cn, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cs, hs, reverse):
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_ih),
            torch.empty_like(w_hh), w_ih.new_empty(w_ih.shape[0]), torch.empty_like(w_hr))


# As _lstm_save, and W_hr (always: the projection's input gradient) and the unprojected h (W_hr's gradient).
def _lstm_proj_save(ctx, inputs, output):
    x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse = inputs
    out, hn, cn, gates, cs, hs = output
    keep_for_backward(ctx, (x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cs, hs),
                      (w_ih.requires_grad, True, w_hh.requires_grad,
                       any_requires_grad(x, h0, w_ih, w_hh, b_ih, b_hh, w_hr), x.requires_grad,
                       _through_states(batch_sizes, h0), True, True, True, True, True))
    ctx.bias, ctx.reverse = (b_ih is not None, b_hh is not None), reverse


def _lstm_proj_grad(ctx, grads, run_backward):
    x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cs, hs = kept_tensors(ctx)
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = run_backward(
        defined_grad(grads[0], out), defined_grad(grads[1], h0), defined_grad(grads[2], c0), x, batch_sizes, h0, c0,
        w_ih, w_hh, w_hr, out, gates, cs, hs, ctx.reverse, needs=needed(ctx, 0, 4, 5, 8))
    return (dx, None, dh0, dc0, dw_ih, dw_hh, db if ctx.bias[0] else None, db if ctx.bias[1] else None, dw_hr, None)


lstm_proj_layer = FusedOp(
    "lstm_proj_layer", cpp_check="rnn_kernels_supported",
    reference=Kernels(reference.lstm_proj_layer_forward, reference.lstm_proj_layer_backward),
    cpp=lambda C: Kernels(C.lstm_proj_layer_forward, C.lstm_proj_layer_backward, skips_grads=True),
    triton=None,  # CUDA: torch's op (cuDNN)
    schema=f"(Tensor x, Tensor batch_sizes, Tensor h0, Tensor c0, {_P}, Tensor w_hr, bool reverse) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    backward_schema="(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor x, Tensor batch_sizes, Tensor h0, "
                    "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor w_hr, Tensor out, Tensor gates, Tensor cs, "
                    "Tensor hs, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_lstm_proj_fake, backward_fake=_lstm_proj_bwd_fake, save=_lstm_proj_save, grad=_lstm_proj_grad,
    num_outputs_differentiable=3, dtypes={"cpp": (torch.float32, torch.float64), "triton": ()})


# ---------------------------------------------------------------- GRU
def _gru_fake(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse):
    return _rows(x, h0), torch.empty_like(h0), _rows(x, h0, 4 * h0.shape[1], _workspace_dtype(x, "gates"))


def _gru_bwd_fake(g_out, g_hn, x, batch_sizes, h0, w_ih, w_hh, out, ws, reverse):
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(w_ih), torch.empty_like(w_hh),
            w_ih.new_empty(w_ih.shape[0]), w_hh.new_empty(w_hh.shape[0]))


def _gru_save(ctx, inputs, output):
    x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse = inputs
    out, hn, ws = output
    keep_for_backward(ctx, (x, batch_sizes, h0 if w_hh.requires_grad else h0.clone(), w_ih, w_hh, out, ws),
                      (w_ih.requires_grad, True, True, x.requires_grad, _through_states(batch_sizes, h0), True, True))
    ctx.bias, ctx.reverse = (b_ih is not None, b_hh is not None), reverse


def _gru_grad(ctx, grads, run_backward):
    x, batch_sizes, h0, w_ih, w_hh, out, ws = kept_tensors(ctx)
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = run_backward(
        defined_grad(grads[0], out), defined_grad(grads[1], h0), x, batch_sizes, h0, w_ih, w_hh, out, ws, ctx.reverse,
        needs=needed(ctx, 0, 3, 4))
    return dx, None, dh0, dw_ih, dw_hh, db_ih if ctx.bias[0] else None, db_hh if ctx.bias[1] else None, None


gru_layer = FusedOp(
    "gru_layer", cpp_check="rnn_kernels_supported",
    reference=Kernels(reference.gru_layer_forward, reference.gru_layer_backward),
    cpp=lambda C: Kernels(C.gru_layer_forward, C.gru_layer_backward, skips_grads=True),
    triton=lambda: Kernels(_triton().gru_layer_forward, _triton().gru_layer_backward),
    schema=f"(Tensor x, Tensor batch_sizes, Tensor h0, {_P}, bool reverse) -> (Tensor, Tensor, Tensor)",
    backward_schema="(Tensor grad_out, Tensor grad_hn, Tensor x, Tensor batch_sizes, Tensor h0, Tensor w_ih, "
                    "Tensor w_hh, Tensor out, Tensor ws, bool reverse) "
                    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_gru_fake, backward_fake=_gru_bwd_fake, save=_gru_save, grad=_gru_grad,
    num_outputs_differentiable=2, cpu_autocast=False)


# ---------------------------------------------------------------- Elman RNN
def _rnn_fake(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, relu, reverse):
    return _rows(x, h0), torch.empty_like(h0)


def _rnn_bwd_fake(g_out, g_hn, x, batch_sizes, h0, w_ih, w_hh, out, relu, reverse):
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(w_ih), torch.empty_like(w_hh),
            w_ih.new_empty(w_ih.shape[0]))


def _rnn_save(ctx, inputs, output):
    x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, relu, reverse = inputs
    keep_for_backward(ctx, (x, batch_sizes, h0, w_ih, w_hh, output[0]),
                      (w_ih.requires_grad, True, w_hh.requires_grad, x.requires_grad, _through_states(batch_sizes, h0),
                       True))
    ctx.bias, ctx.relu, ctx.reverse = (b_ih is not None, b_hh is not None), relu, reverse


def _rnn_grad(ctx, grads, run_backward):
    x, batch_sizes, h0, w_ih, w_hh, out = kept_tensors(ctx)
    dx, dh0, dw_ih, dw_hh, db = run_backward(
        defined_grad(grads[0], out), defined_grad(grads[1], h0), x, batch_sizes, h0, w_ih, w_hh, out, ctx.relu,
        ctx.reverse, needs=needed(ctx, 0, 3, 4))
    return dx, None, dh0, dw_ih, dw_hh, db if ctx.bias[0] else None, db if ctx.bias[1] else None, None, None


rnn_layer = FusedOp(
    "rnn_layer", cpp_check="rnn_kernels_supported",
    reference=Kernels(reference.rnn_layer_forward, reference.rnn_layer_backward),
    cpp=lambda C: Kernels(C.rnn_layer_forward, C.rnn_layer_backward, skips_grads=True),
    triton=lambda: Kernels(_triton().rnn_layer_forward, _triton().rnn_layer_backward),
    schema=f"(Tensor x, Tensor batch_sizes, Tensor h0, {_P}, bool relu, bool reverse) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_out, Tensor grad_hn, Tensor x, Tensor batch_sizes, Tensor h0, Tensor w_ih, "
                    "Tensor w_hh, Tensor out, bool relu, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    fake=_rnn_fake, backward_fake=_rnn_bwd_fake, save=_rnn_save, grad=_rnn_grad,
    num_outputs_differentiable=2)
