"""Fused attention: seqfast::sdpa (online-softmax forward keeping the log-sum-exp, flash backward, causal block
skipping, in-kernel GQA, split-KV for query length 1) and seqfast::additive_attention (one Bahdanau decoder step:
score, masked softmax and weighted sum in one pass).

sdpa layout: q [N, Hq, L, D], k [N, Hk, S, D], v [N, Hk, S, Dv], bias: additive float mask already broadcast (a view
of shape [N, Hq, L, S]) or None. Returns (out [N, Hq, L, Dv], lse [N, Hq, L]); lse is float64 for float64 inputs,
float32 otherwise.
"""
import torch

from ._fused import FusedOp


def _sdpa_fake(q, k, v, bias, is_causal, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=lse_dtype)


def _sdpa_bwd_fake(grad_out, q, k, v, out, lse, bias, is_causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sdpa_save(ctx, inputs, output):
    q, k, v, bias, is_causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], bias)
    ctx.is_causal, ctx.scale = is_causal, scale


def _sdpa_grad(ctx, grads, run_backward):
    q, k, v, out, lse, bias = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grads[0] is None else grads[0].contiguous()
    dq, dk, dv = run_backward(grad_out, q, k, v, out, lse, bias, ctx.is_causal, ctx.scale)
    return dq, dk, dv, None, None, None


sdpa = FusedOp(
    "sdpa", triton_module="attention",
    schema="(Tensor q, Tensor k, Tensor v, Tensor? bias, bool is_causal, float scale) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias, "
                    "bool is_causal, float scale) -> (Tensor, Tensor, Tensor)",
    fake=_sdpa_fake, backward_fake=_sdpa_bwd_fake, save=_sdpa_save, grad=_sdpa_grad,
    num_outputs_differentiable=1, dtypes={"cpp": (torch.float32, torch.float64, torch.bfloat16)})


def _add_fake(qp, kp, v, values, mask):
    return values.new_empty((values.shape[0], values.shape[2])), values.new_empty(values.shape[:2])


def _add_bwd_fake(grad_context, grad_weights, qp, kp, v, values, mask, weights):
    return torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(v), torch.empty_like(values)


def _add_save(ctx, inputs, output):
    qp, kp, v, values, mask = inputs
    ctx.save_for_backward(qp, kp, v, values, mask, output[1])


def _add_grad(ctx, grads, run_backward):
    qp, kp, v, values, mask, weights = ctx.saved_tensors
    gc = torch.zeros(values.shape[0], values.shape[2], dtype=values.dtype, device=values.device) \
        if grads[0] is None else grads[0].contiguous()
    gw = torch.zeros_like(weights) if grads[1] is None else grads[1].contiguous()
    dqp, dkp, dv, dvalues = run_backward(gc, gw, qp, kp, v, values, mask, weights)
    return dqp, dkp, dv, dvalues, None


additive_attention = FusedOp(
    "additive_attention", triton_module="additive_attention",
    schema="(Tensor qp, Tensor kp, Tensor v, Tensor values, Tensor? mask) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_context, Tensor grad_weights, Tensor qp, Tensor kp, Tensor v, Tensor values, "
                    "Tensor? mask, Tensor weights) -> (Tensor, Tensor, Tensor, Tensor)",
    fake=_add_fake, backward_fake=_add_bwd_fake, save=_add_save, grad=_add_grad,
    num_outputs_differentiable=2, dtypes={"cpp": (torch.float32, torch.float64, torch.bfloat16)})
