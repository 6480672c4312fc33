"""Plain PyTorch scaled-dot-product attention (the math of seqfast's fused attention kernels, and their oracle).

Layout: q [N, Hq, L, D], k [N, Hk, S, D], v [N, Hk, S, Dv] with Hq % Hk == 0 (query head h reads kv head
h // (Hq // Hk)); bias: additive float mask broadcastable to [N, Hq, L, S] or None; is_causal: query i sees keys
j <= i (top-left aligned, as torch).

The contract every backend (this module, seqfast._C, seqfast.kernels.attention) follows for special rows:
- a row whose every key is masked (-inf bias or causal) gives output 0 and gradient 0, and its lse is -inf
  (torch's math gives NaN there; its fused kernels give 0, which seqfast follows);
- NaN or Inf in q, k, v or a float mask propagates to the output (NaN), as in torch; it is never turned into 0.
"""
import torch


def _expand_kv(t, hq):
    return t.repeat_interleave(hq // t.shape[1], dim=1) if t.shape[1] != hq else t


def _acc(t):
    """Accumulation dtype: float32 for half/bfloat16/float32 inputs, float64 for float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _scores(q, k, bias, is_causal, scale):
    acc = _acc(q)
    s = (q.to(acc) @ _expand_kv(k, q.shape[1]).to(acc).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(acc)
    if is_causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return s


def _lse(s):
    """logsumexp over the keys; -inf for a row with every key masked, computed on finite stand-ins there: torch's
    logsumexp of an all -inf row has a NaN gradient, which a backward with create_graph=True (it differentiates this
    module) would carry into dq and dk even though the row's output is 0."""
    dead = torch.isneginf(s).all(-1, keepdim=True)
    return torch.logsumexp(s.masked_fill(dead, 0.0), -1).masked_fill(dead.squeeze(-1), float("-inf"))


def _probs(s, lse):
    # fully masked rows: lse = -inf; exp(-inf - 0) = 0 instead of NaN
    return torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)[..., None])


def sdpa_forward(q, k, v, bias, is_causal, scale):
    s = _scores(q, k, bias, is_causal, scale)
    lse = _lse(s)
    acc = _acc(q)
    out = _probs(s, lse) @ _expand_kv(v, q.shape[1]).to(acc)
    return out.to(q.dtype), lse


def _sum_groups(t, hk):
    n, hq = t.shape[:2]
    return t.view(n, hk, hq // hk, *t.shape[2:]).sum(2) if hq != hk else t


def sdpa_backward(grad_out, q, k, v, out, lse, bias, is_causal, scale):
    acc = _acc(q)
    p = _probs(_scores(q, k, bias, is_causal, scale), lse)
    g = grad_out.to(acc)
    dv = p.transpose(-1, -2) @ g
    dp = g @ _expand_kv(v, q.shape[1]).to(acc).transpose(-1, -2)
    ds = p * (dp - (g * out.to(acc)).sum(-1, keepdim=True))
    dq = (ds @ _expand_kv(k, q.shape[1]).to(acc)) * scale
    dk = (ds.transpose(-1, -2) @ q.to(acc)) * scale
    hk = k.shape[1]
    return dq.to(q.dtype), _sum_groups(dk, hk).to(k.dtype), _sum_groups(dv, hk).to(v.dtype)


def sdpa_dropout(q, k, v, bias, is_causal, scale, dropout_p):
    """Attention with dropout on the weights (differentiated by autograd, so backward reuses the forward's mask)."""
    s = _scores(q, k, bias, is_causal, scale)
    lse = _lse(s)
    p = torch.nn.functional.dropout(_probs(s, lse), dropout_p, True)
    acc = _acc(q)
    return (p @ _expand_kv(v, q.shape[1]).to(acc)).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
