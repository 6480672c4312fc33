"""Fused additive (Bahdanau) attention for one decoder step: seqfast::additive_attention (score, masked softmax and
weighted sum in one pass, without materialising tanh(qp + kp)).

Layout: qp [N, A] (W q), kp [N, S, A] (U k), v [A], values [N, S, Dv], mask [N, S] bool (True = attend) or None.
Returns (context [N, Dv], weights [N, S]). Semantics: seqfast/reference/additive_attention.py.
"""
import torch

from ..reference import additive_attention as reference
from .fused_op import FusedOp, Kernels, defined_grad


def _triton():
    from ..kernels import additive_attention  # imports triton: on first use only
    return additive_attention


def _add_fake(qp, kp, v, values, mask):
    return values.new_empty((values.shape[0], values.shape[2])), values.new_empty(values.shape[:2])


def _add_bwd_fake(grad_context, grad_weights, qp, kp, v, values, mask, weights):
    return torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(v), torch.empty_like(values)


def _add_save(ctx, inputs, output):
    qp, kp, v, values, mask = inputs
    ctx.save_for_backward(qp, kp, v, values, mask, output[1])


def _add_grad(ctx, grads, run_backward):
    qp, kp, v, values, mask, weights = ctx.saved_tensors
    gc = values.new_zeros(values.shape[0], values.shape[2]) if grads[0] is None else grads[0].contiguous()
    dqp, dkp, dv, dvalues = run_backward(gc, defined_grad(grads[1], weights), qp, kp, v, values, mask, weights)
    return dqp, dkp, dv, dvalues, None


additive_attention = FusedOp(
    "additive_attention",
    reference=Kernels(reference.additive_attention_forward, reference.additive_attention_backward),
    cpp=lambda C: Kernels(C.additive_attention_forward, C.additive_attention_backward),
    triton=lambda: Kernels(_triton().additive_attention_forward, _triton().additive_attention_backward),
    schema="(Tensor qp, Tensor kp, Tensor v, Tensor values, Tensor? mask) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_context, Tensor grad_weights, Tensor qp, Tensor kp, Tensor v, Tensor values, "
                    "Tensor? mask, Tensor weights) -> (Tensor, Tensor, Tensor, Tensor)",
    fake=_add_fake, backward_fake=_add_bwd_fake, save=_add_save, grad=_add_grad,
    num_outputs_differentiable=2, dtypes={"cpp": (torch.float32, torch.float64, torch.bfloat16)})
