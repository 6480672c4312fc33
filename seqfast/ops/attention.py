"""Fused scaled-dot-product attention: seqfast::sdpa (online-softmax forward keeping the log-sum-exp, flash
backward, causal block skipping, in-kernel GQA, split-KV for query length 1).

sdpa layout: q [N, Hq, L, D], k [N, Hk, S, D], v [N, Hk, S, Dv], bias: additive float mask already broadcast (a view
of shape [N, Hq, L, S]) or None. Returns (out [N, Hq, L, Dv], lse [N, Hq, L]); lse is float64 for float64 inputs,
float32 otherwise. Fully masked rows and NaN: see the contract in seqfast/reference/attention.py.
"""
import torch

from ..reference import attention as reference
from .fused_op import FusedOp, Kernels, defined_grad


def _triton():
    from ..kernels import attention  # imports triton: on first use only
    return attention


def _sdpa_fake(q, k, v, bias, is_causal, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=lse_dtype)


def _sdpa_bwd_fake(grad_out, q, k, v, out, lse, bias, is_causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sdpa_save(ctx, inputs, output):
    q, k, v, bias, is_causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], bias)
    ctx.is_causal, ctx.scale = is_causal, scale
    ctx.kv_same = k is v  # a Luong step's keys as its values (seqfast.functional.dot_attention)


def _sdpa_grad(ctx, grads, run_backward):
    # k and v one tensor: the C++ backward (given the flag: Kernels.skips_grads) returns dK + dV as dk and None for
    # dv, so that autograd does not add two key-sized gradients into a third (the others ignore the flag)
    q, k, v, out, lse, bias = ctx.saved_tensors
    dq, dk, dv = run_backward(defined_grad(grads[0], out), q, k, v, out, lse, bias, ctx.is_causal, ctx.scale,
                              needs=(ctx.kv_same,))
    return dq, dk, dv, None, None, None


sdpa = FusedOp(
    "sdpa",
    reference=Kernels(reference.sdpa_forward, reference.sdpa_backward),
    cpp=lambda C: Kernels(C.sdpa_forward, C.sdpa_backward, skips_grads=True),
    triton=lambda: Kernels(_triton().sdpa_forward, _triton().sdpa_backward),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? bias, bool is_causal, float scale) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias, "
                    "bool is_causal, float scale) -> (Tensor, Tensor, Tensor)",
    fake=_sdpa_fake, backward_fake=_sdpa_bwd_fake, save=_sdpa_save, grad=_sdpa_grad,
    num_outputs_differentiable=1, dtypes={"cpp": (torch.float32, torch.float64, torch.bfloat16)})
