"""Plain PyTorch additive (Bahdanau) attention for one decoder step (the math of seqfast's fused additive-attention
kernels, and their oracle).

score_s = v . tanh(qp + kp_s), softmax over the unmasked s (mask True = keep; a fully masked row gives zero weights
and context), context = sum_s w_s values_s. qp [N, A], kp [N, S, A], v [A], values [N, S, Dv], mask [N, S] bool.
"""
import torch


def _additive_weights(qp, kp, v, mask):
    scores = torch.tanh(qp[:, None, :] + kp) @ v
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1, keepdim=True)
    return torch.exp(scores - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse))


def additive_attention_forward(qp, kp, v, values, mask):
    w = _additive_weights(qp, kp, v, mask)
    return (w[:, None, :] @ values)[:, 0], w


def additive_attention_backward(grad_context, grad_weights, qp, kp, v, values, mask, weights):
    t = torch.tanh(qp[:, None, :] + kp)                                   # [N, S, A]
    dvalues = weights[:, :, None] * grad_context[:, None, :]
    dw = (values @ grad_context[:, :, None])[..., 0] + grad_weights      # [N, S]
    dscore = weights * (dw - (weights * dw).sum(-1, keepdim=True))
    dpre = dscore[:, :, None] * v * (1 - t * t)                          # [N, S, A]
    return dpre.sum(1), dpre, (dscore[:, :, None] * t).sum((0, 1)), dvalues
