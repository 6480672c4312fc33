"""Attention modules on seqfast's fused attention ops.

* :class:`MultiheadAttention`: drop-in torch.nn.MultiheadAttention (same constructor, parameters, init, state_dict,
  checks and errors). With ``need_weights=False`` (what torch.nn.Transformer*Layer passes) the attention itself runs
  seqfast's fused scaled-dot-product attention; with ``need_weights=True`` the weights must be materialised anyway,
  so it runs the same plain math as torch.
* :class:`LuongAttention` (dot / general score) and :class:`BahdanauAttention` (additive score): one decoder step of
  the classic seq2seq attentions, returning ``(context, weights)``, fused (seqfast::sdpa with query length 1, and
  seqfast::additive_attention).
"""
import math

import torch

from .. import _backend, _rules
from .. import functional as seqfast_F
from ..functional._attention import canonical_mask
from ._linear import Linear
from ._recording import recorded

__all__ = ["MultiheadAttention", "LuongAttention", "BahdanauAttention"]


# ----------------------------------------------------------------------------------------------------------------
# MultiheadAttention
# ----------------------------------------------------------------------------------------------------------------
class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in :class:`torch.nn.MultiheadAttention` whose attention runs seqfast's fused SDPA.

    Same constructor, parameters, initialisation and state_dict as torch's (they load into each other), and the same
    forward semantics and errors: batch_first, unbatched input, kdim/vdim, add_bias_kv, add_zero_attn, bool
    (True = masked out) and float ``attn_mask`` (2-D or 3-D ``(N * num_heads, L, S)``) and ``key_padding_mask``,
    ``is_causal`` as a hint that requires ``attn_mask`` (as torch), dropout on the weights in training.

    With ``need_weights=False`` the attention is fused (seqfast.functional.scaled_dot_product_attention). With
    ``need_weights=True`` (torch's default) the weights must be materialised and are computed with torch's plain
    math; pass ``need_weights=False`` for speed (torch.nn.Transformer*Layer do).

    Differences from torch: torch's native inference fast path (eval mode, no grad) and NestedTensor input are not
    used; rows whose every key is masked give 0 on the fused path (torch's math gives NaN, as does ``need_weights``).
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if self._torch_runs_attention(query, key, value, is_causal) or _empty(query, key, value):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        is_batched = query.dim() == 3
        key_padding_mask = canonical_mask(key_padding_mask, "key_padding_mask",
                                          None if attn_mask is None else attn_mask.dtype, "attn_mask", query.dtype)
        attn_mask = canonical_mask(attn_mask, "attn_mask", None, "", query.dtype, check_other=False)
        if query.is_nested or key.is_nested or value.is_nested:
            raise AssertionError("seqfast MultiheadAttention does not support NestedTensor input")
        if self.batch_first and is_batched:
            # keep the identities (q is k is v) that select the one-GEMM in-projection
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        out, weights = seqfast_F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, self.bias_k,
            self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=separate, q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    def _torch_runs_attention(self, query, key, value, is_causal):
        """Whether the rule table gives this call's attention to torch's SDPA (seqfast._rules.prefer_torch): the module
        would then only compose torch's ops, and torch's own forward does the same or better (its fused inference
        path: a self-attention at batch 1 over 16 tokens, embed 256, ran 189-234 us in torch's module against
        248-294 us composed). Not with a forced backend, off the CPU, for bfloat16 (seqfast may run it on float32
        copies: seqfast._rules.sdpa_upcasts_bfloat16) or while torch.compile traces."""
        if (_backend.forced_backend() is not None or not isinstance(query, torch.Tensor)
                or not isinstance(key, torch.Tensor) or query.is_nested or key.is_nested or not query.is_cpu
                or query.dtype is torch.bfloat16 or query.dim() not in (2, 3) or key.dim() != query.dim()
                or torch.compiler.is_compiling()):
            return False
        seq = 1 if query.dim() == 3 and self.batch_first else 0
        training = recorded(self, query, key, value) or recorded(self.out_proj)
        return _rules.prefer_torch_when("sdpa", query, query.shape[seq], key.shape[seq], training, is_causal,
                                        self.embed_dim // self.num_heads)


def _empty(*tensors):
    """An empty batch or sequence: torch's module forward returns its empty output (the fused path's views of zero
    elements cannot infer their sizes)."""
    return any(isinstance(t, torch.Tensor) and t.numel() == 0 for t in tensors)


# ----------------------------------------------------------------------------------------------------------------
# Seq2seq (decoder-step) attention
# ----------------------------------------------------------------------------------------------------------------
def _check_decoder_step(name, query, keys, values, mask, query_size, key_size):
    """Shapes of one decoder step; returns the inputs batched (and whether they were)."""
    batched = query.dim() == 2
    if query.dim() not in (1, 2):
        raise ValueError(f"{name}: expected query to be 1-D or 2-D, got {query.dim()}-D")
    want = 3 if batched else 2
    for what, t in (("keys", keys), ("values", values)):
        if t is not None and t.dim() != want:
            raise ValueError(f"{name}: expected {what} to be {want}-D for a {query.dim()}-D query, got {t.dim()}-D")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"{name}: expected mask to be a bool tensor (True = attend), got {mask.dtype}")
        if mask.dim() != want - 1:
            raise ValueError(f"{name}: expected mask to be {want - 1}-D, got {mask.dim()}-D")
    if not batched:
        query = query.unsqueeze(0)
        keys, values, mask = (None if t is None else t.unsqueeze(0) for t in (keys, values, mask))
    if query.shape[-1] != query_size:
        raise ValueError(f"{name}: expected query of size {query_size}, got {query.shape[-1]}")
    B = query.shape[0]
    if keys is not None:
        if keys.shape[0] != B:
            raise ValueError(f"{name}: query batch {B} does not match keys batch {keys.shape[0]}")
        if key_size is not None and keys.shape[-1] != key_size:
            raise ValueError(f"{name}: expected keys of size {key_size}, got {keys.shape[-1]}")
    if values is not None and values.shape[0] != B:
        raise ValueError(f"{name}: query batch {B} does not match values batch {values.shape[0]}")
    if values is not None and keys is not None and values.shape[:2] != keys.shape[:2]:
        raise ValueError(f"{name}: values {tuple(values.shape)} must match keys {tuple(keys.shape)} in batch and "
                         "source length")
    if mask is not None:
        # broadcast as documented ([1, S], [B, 1], ...): the kernels read a dense [B, S] mask
        S = (keys if keys is not None else values).shape[1]
        if any(m not in (1, n) for m, n in zip(mask.shape, (B, S))):
            raise ValueError(f"{name}: mask of shape {tuple(mask.shape)} does not broadcast to [batch, source "
                             f"length] = [{B}, {S}]")
        mask = mask.expand(B, S)
    return query, keys, values, mask, batched


class LuongAttention(torch.nn.Module):
    r"""Luong (multiplicative) attention for one decoder step.

    ``score="dot"``: :math:`s_j = k_j \cdot q`; ``score="general"``: :math:`s_j = k_j \cdot (W q)` with
    ``W = nn.Linear(query_size, key_size, bias)``. Weights are the softmax of the scores over the unmasked source
    positions; context :math:`= \sum_j w_j v_j`. Without gradients the step runs as torch's ops do (two batched
    GEMVs around a softmax); in training the context comes from seqfast's fused SDPA (query length 1, scale 1, the
    mask as a key-padding bias) and the weights from its log-sum-exp (see seqfast.functional.dot_attention for the
    timings behind the choice); gradients flow to every input and parameter.

    Args:
        query_size: size of the decoder state.
        key_size: size of the keys (encoder outputs); defaults to ``query_size`` (required equal for "dot").
        score: ``"dot"`` or ``"general"``.
        bias: whether ``W`` has a bias ("general" only).

    Forward: ``query [B, Dq]``, ``keys [B, S, Dk]``, ``mask`` bool (True = attend) broadcastable to ``[B, S]``
    (``[1, S]``, ``[B, 1]``) or None, ``values
    [B, S, Dv]`` (default: ``keys``) -> ``(context [B, Dv], weights [B, S])``. Unbatched inputs (``query [Dq]``,
    ``keys [S, Dk]``, ...) are accepted. A source row with every position masked gives zero context and weights.
    """

    def __init__(self, query_size, key_size=None, score="dot", bias=False, device=None, dtype=None):
        super().__init__()
        if score not in ("dot", "general"):
            raise ValueError(f"LuongAttention: score must be 'dot' or 'general', got {score!r}")
        key_size = query_size if key_size is None else key_size
        if score == "dot" and key_size != query_size:
            raise ValueError(f"LuongAttention: the 'dot' score needs key_size == query_size, got {key_size} and "
                             f"{query_size} (use score='general')")
        if score == "dot" and bias:
            raise ValueError("LuongAttention: bias applies to the 'general' score only")
        self.query_size, self.key_size, self.score = query_size, key_size, score
        self.W = Linear(query_size, key_size, bias=bias, device=device, dtype=dtype) \
            if score == "general" else None

    def extra_repr(self):
        return f"query_size={self.query_size}, key_size={self.key_size}, score={self.score!r}"

    def forward(self, query, keys, mask=None, values=None):
        query, keys, values, mask, batched = _check_decoder_step("LuongAttention", query, keys, values, mask,
                                                                 self.query_size, self.key_size)
        values = keys if values is None else values
        q = self.W(query) if self.W is not None else query
        context, weights = seqfast_F.dot_attention(q, keys, values, mask)
        return (context, weights) if batched else (context.squeeze(0), weights.squeeze(0))


class BahdanauAttention(torch.nn.Module):
    r"""Bahdanau (additive) attention for one decoder step, fused (seqfast::additive_attention).

    :math:`s_j = v \cdot \tanh(W q + U k_j)` with ``W = nn.Linear(query_size, attn_size, bias=False)``,
    ``U = nn.Linear(key_size, attn_size)`` and ``v`` a parameter of size ``attn_size``; weights are the softmax of
    the scores over the unmasked source positions, context :math:`= \sum_j w_j v_j`. Score, masked softmax and the
    weighted sum run in one pass without materialising ``tanh(Wq + Uk)``.

    ``U k`` does not change during decoding: compute it once with :meth:`precompute_keys` and pass it as
    ``projected_keys=`` at every step (``keys`` is then only the default ``values`` and may be None if ``values``
    is given).

    Forward: ``query [B, Dq]``, ``keys [B, S, Dk]``, ``mask`` bool (True = attend) broadcastable to ``[B, S]``
    (``[1, S]``, ``[B, 1]``) or None, ``values
    [B, S, Dv]`` (default: ``keys``), ``projected_keys [B, S, attn_size]`` or None -> ``(context [B, Dv],
    weights [B, S])``. Unbatched inputs are accepted. A row with every position masked gives zero context and
    weights.
    """

    def __init__(self, query_size, key_size, attn_size, device=None, dtype=None):
        super().__init__()
        self.query_size, self.key_size, self.attn_size = query_size, key_size, attn_size
        self.W = Linear(query_size, attn_size, bias=False, device=device, dtype=dtype)
        self.U = Linear(key_size, attn_size, bias=True, device=device, dtype=dtype)
        self.v = torch.nn.Parameter(torch.empty(attn_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        self.W.reset_parameters()
        self.U.reset_parameters()
        bound = 1.0 / math.sqrt(self.attn_size) if self.attn_size > 0 else 0.0
        torch.nn.init.uniform_(self.v, -bound, bound)

    def extra_repr(self):
        return f"query_size={self.query_size}, key_size={self.key_size}, attn_size={self.attn_size}"

    def precompute_keys(self, keys):
        """``U keys`` ([..., S, attn_size]), to pass as ``projected_keys=`` at every decoder step."""
        return self.U(keys)

    def forward(self, query, keys, mask=None, values=None, projected_keys=None):
        if keys is None and (projected_keys is None or values is None):
            raise ValueError("BahdanauAttention: keys may be None only when projected_keys and values are given")
        query, keys, values, mask, batched = _check_decoder_step("BahdanauAttention", query, keys, values, mask,
                                                                 self.query_size, self.key_size)
        values = keys if values is None else values
        if projected_keys is None:
            kp = self.U(keys)
        else:
            kp = projected_keys if batched else projected_keys.unsqueeze(0)
            if kp.dim() != 3 or kp.shape[0] != query.shape[0] or kp.shape[1] != values.shape[1] \
                    or kp.shape[2] != self.attn_size:
                raise ValueError(f"BahdanauAttention: projected_keys of shape {tuple(projected_keys.shape)} does "
                                 f"not match [batch, source length, attn_size={self.attn_size}]")
        qp = self.W(query)
        context, weights = seqfast_F.additive_attention(qp, kp, self.v, values, mask)
        return (context, weights) if batched else (context.squeeze(0), weights.squeeze(0))
