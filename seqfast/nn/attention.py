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
import warnings

import torch
import torch.nn.functional as torch_F

from .. import functional as F
from ..ops import attention as _attn

__all__ = ["MultiheadAttention", "LuongAttention", "BahdanauAttention"]


# ----------------------------------------------------------------------------------------------------------------
# MultiheadAttention
# ----------------------------------------------------------------------------------------------------------------
def _none_or_dtype(input):
    if input is None:
        return None
    if isinstance(input, torch.Tensor):
        return input.dtype
    raise RuntimeError("input to _none_or_dtype() must be None or torch.Tensor")


def _canonical_mask(mask, mask_name, other_type, other_name, target_type, check_other=True):
    """torch's mask canonicalisation: a bool mask (True = masked out) becomes an additive float mask (-inf)."""
    if mask is None:
        return None
    is_float = torch.is_floating_point(mask)
    if mask.dtype != torch.bool and not is_float:
        raise AssertionError(f"only bool and floating types of {mask_name} are supported")
    if check_other and other_type is not None and mask.dtype != other_type:
        warnings.warn(f"Support for mismatched {mask_name} and {other_name} is deprecated. Use same type for both "
                      "instead.", stacklevel=3)
    if not is_float:
        mask = torch.zeros_like(mask, dtype=target_type).masked_fill_(mask, float("-inf"))
    return mask


def _mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads):
    """torch's _mha_shape_check (same messages); returns whether the input is batched."""
    if query.dim() == 3:
        if key.dim() != 3 or value.dim() != 3:
            raise AssertionError("For batched (3-D) `query`, expected `key` and `value` to be 3-D but found "
                                 f"{key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 2:
            raise AssertionError("For batched (3-D) `query`, expected `key_padding_mask` to be `None` or 2-D but "
                                 f"found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError("For batched (3-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D but "
                                 f"found {attn_mask.dim()}-D tensor instead")
        return True
    if query.dim() == 2:
        if key.dim() != 2 or value.dim() != 2:
            raise AssertionError("For unbatched (2-D) `query`, expected `key` and `value` to be 2-D but found "
                                 f"{key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != 1:
            raise AssertionError("For unbatched (2-D) `query`, expected `key_padding_mask` to be `None` or 1-D but "
                                 f"found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise AssertionError("For unbatched (2-D) `query`, expected `attn_mask` to be `None`, 2-D or 3-D "
                                     f"but found {attn_mask.dim()}-D tensor instead")
            if attn_mask.dim() == 3:
                expected = (num_heads, query.shape[0], key.shape[0])
                if attn_mask.shape != expected:
                    raise AssertionError(f"Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}")
        return False
    raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query "
                         "tensor")


def _in_projection_packed(q, k, v, w, b):
    """q, k, v projections with the packed in_proj_weight; one GEMM for self-attention, two for shared k/v."""
    E = q.size(-1)
    if k is v:
        if q is k:
            proj = torch_F.linear(q, w, b).unflatten(-1, (3, E))
            return proj[..., 0, :], proj[..., 1, :], proj[..., 2, :]
        w_q, w_kv = w.split([E, E * 2])
        b_q, b_kv = (None, None) if b is None else b.split([E, E * 2])
        kv = torch_F.linear(k, w_kv, b_kv).unflatten(-1, (2, E))
        return torch_F.linear(q, w_q, b_q), kv[..., 0, :], kv[..., 1, :]
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return torch_F.linear(q, w_q, b_q), torch_F.linear(k, w_k, b_k), torch_F.linear(v, w_v, b_v)


def _in_projection(q, k, v, w_q, w_k, w_v, b_q, b_k, b_v):
    Eq, Ek, Ev = q.size(-1), k.size(-1), v.size(-1)
    for name, t, shape in (("query weights", w_q, (Eq, Eq)), ("key weights", w_k, (Eq, Ek)),
                           ("value weights", w_v, (Eq, Ev))):
        if t.shape != shape:
            raise AssertionError(f"expecting {name} shape of {shape}, but got {t.shape}")
    for name, t in (("query bias", b_q), ("key bias", b_k), ("value bias", b_v)):
        if t is not None and t.shape != (Eq,):
            raise AssertionError(f"expecting {name} shape of {(Eq,)}, but got {t.shape}")
    return torch_F.linear(q, w_q, b_q), torch_F.linear(k, w_k, b_k), torch_F.linear(v, w_v, b_v)


def multi_head_attention_forward(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                                 bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
                                 training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                                 use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                                 v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                                 is_causal=False):
    """torch.nn.functional.multi_head_attention_forward (same signature, sequence-first layout, semantics, checks
    and exception types), with the attention of the ``need_weights=False`` path fused.

    Masks: bool True = masked out (MHA's convention, the opposite of SDPA's), or additive float.
    """
    is_batched = _mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]

    key_padding_mask = _canonical_mask(key_padding_mask, "key_padding_mask", _none_or_dtype(attn_mask),
                                       "attn_mask", query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        # as torch: trust the hint and let the attention kernel build the causal mask (no mask tensor read)
        attn_mask = None
    else:
        attn_mask = _canonical_mask(attn_mask, "attn_mask", None, "", query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal

    if embed_dim != embed_dim_to_check:
        raise AssertionError(f"was expecting embedding dimension of {embed_dim_to_check}, but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    separate = use_separate_proj_weight
    if separate:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
    elif key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")

    if not separate:
        if in_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
        q, k, v = _in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    else:
        for name, t in (("q", q_proj_weight), ("k", k_proj_weight), ("v", v_proj_weight)):
            if t is None:
                raise AssertionError(f"use_separate_proj_weight is True but {name}_proj_weight is None")
        b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = _in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, b_q, b_k, b_v)

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(bsz * num_heads, tgt_len, src_len)}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    if bias_k is not None and bias_v is not None:
        if static_k is not None:
            raise AssertionError("bias cannot be added to static key.")
        if static_v is not None:
            raise AssertionError("bias cannot be added to static value.")
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = torch_F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = torch_F.pad(key_padding_mask, (0, 1))
    elif bias_k is not None:
        raise AssertionError("bias_k is set but bias_v is None")
    elif bias_v is not None:
        raise AssertionError("bias_v is set but bias_k is None")

    heads_first = not need_weights and static_k is None and static_v is None and not add_zero_attn
    if heads_first:
        # fused path: [len, B, E] -> [B, H, len, head_dim] as views; the attention op makes the one contiguous copy
        q, k, v = (t.unflatten(-1, (num_heads, head_dim)).permute(1, 2, 0, 3) for t in (q, k, v))
        src_len = k.size(2)
    else:
        # torch's layout: [len, B, E] -> [B * H, len, head_dim]
        q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = _to_head_batches(k, static_k, "static_k", bsz * num_heads, head_dim)
        v = _to_head_batches(v, static_v, "static_v", bsz * num_heads, head_dim)
        if add_zero_attn:
            zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=1)
            v = torch.cat([v, zeros.to(v.dtype)], dim=1)
            if attn_mask is not None:
                attn_mask = torch_F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = torch_F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)

    if key_padding_mask is not None:
        if key_padding_mask.shape[0] != bsz:
            raise AssertionError(f"Expected key_padded_mask.shape[0] to be {bsz}, but got "
                                 f"{key_padding_mask.shape[0]}")
        if key_padding_mask.shape[1] != src_len:
            raise AssertionError(f"Expected key_padded_mask.shape[1] to be {src_len}, but got "
                                 f"{key_padding_mask.shape[1]}")
        kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(
            bsz * num_heads, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm

    if not training:
        dropout_p = 0.0

    if need_weights:
        # the weights are an output: materialise them with torch's own math (same rounding, same dropout draws)
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = torch.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = torch_F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = torch_F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, -1)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            out, weights = out.squeeze(1), weights.squeeze(0)
        return out, weights

    # fused path: [B, H, len, head_dim] into seqfast's SDPA; the mask stays a broadcast view
    if attn_mask is not None:
        if attn_mask.size(0) == 1:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    if not heads_first:
        q = q.reshape(bsz, num_heads, tgt_len, head_dim)
        k = k.reshape(bsz, num_heads, src_len, head_dim)
        v = v.reshape(bsz, num_heads, src_len, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = torch_F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, -1)
    if not is_batched:
        out = out.squeeze(1)
    return out, None


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
        is_batched = query.dim() == 3
        key_padding_mask = _canonical_mask(key_padding_mask, "key_padding_mask", _none_or_dtype(attn_mask),
                                           "attn_mask", query.dtype)
        attn_mask = _canonical_mask(attn_mask, "attn_mask", None, "", query.dtype, check_other=False)
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
        out, weights = multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, self.bias_k,
            self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=separate, q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights


# ----------------------------------------------------------------------------------------------------------------
# Seq2seq (decoder-step) attention
# ----------------------------------------------------------------------------------------------------------------
class _WeightsFromLse(torch.autograd.Function):
    """softmax(scores) given the row log-sum-exp the fused attention already computed: w = exp(s - lse), with the
    full softmax gradient ds = w * (dw - <w, dw>) (lse depends on s). A row with every score -inf (lse = +-inf
    depending on the backend) gives w = 0 and ds = 0."""

    @staticmethod
    def forward(scores, lse):
        lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        return torch.exp(scores - lse.to(scores.dtype)[:, None])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_w):
        (w,) = ctx.saved_tensors
        return w * (grad_w - (w * grad_w).sum(-1, keepdim=True)), None


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
    if values is not None and keys is not None and values.shape[:2] != keys.shape[:2]:
        raise ValueError(f"{name}: values {tuple(values.shape)} must match keys {tuple(keys.shape)} in batch and "
                         "source length")
    return query, keys, values, mask, batched


class LuongAttention(torch.nn.Module):
    r"""Luong (multiplicative) attention for one decoder step.

    ``score="dot"``: :math:`s_j = k_j \cdot q`; ``score="general"``: :math:`s_j = k_j \cdot (W q)` with
    ``W = nn.Linear(query_size, key_size, bias)``. Weights are the softmax of the scores over the unmasked source
    positions; context :math:`= \sum_j w_j v_j`. The context comes from seqfast's fused SDPA (query length 1,
    scale 1, the mask as a key-padding bias), the weights from the same op's log-sum-exp (``exp(s - lse)``);
    gradients flow to every input and parameter.

    Args:
        query_size: size of the decoder state.
        key_size: size of the keys (encoder outputs); defaults to ``query_size`` (required equal for "dot").
        score: ``"dot"`` or ``"general"``.
        bias: whether ``W`` has a bias ("general" only).

    Forward: ``query [B, Dq]``, ``keys [B, S, Dk]``, ``mask [B, S]`` bool (True = attend) or None, ``values
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
        self.W = torch.nn.Linear(query_size, key_size, bias=bias, device=device, dtype=dtype) \
            if score == "general" else None

    def extra_repr(self):
        return f"query_size={self.query_size}, key_size={self.key_size}, score={self.score!r}"

    def forward(self, query, keys, mask=None, values=None):
        query, keys, values, mask, batched = _check_decoder_step("LuongAttention", query, keys, values, mask,
                                                                 self.query_size, self.key_size)
        values = keys if values is None else values
        q = self.W(query) if self.W is not None else query
        context, weights = _dot_attention(q, keys, values, mask)
        return (context, weights) if batched else (context.squeeze(0), weights.squeeze(0))


def _dot_attention(q, keys, values, mask):
    """context and weights of softmax(keys . q) over the unmasked keys; q [B, D], keys [B, S, D], values [B, S, Dv],
    mask [B, S] bool (True = attend) or None."""
    B, S, D = keys.shape
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        bias = bias.view(B, 1, 1, S)
    out, lse = _attn.sdpa(q.reshape(B, 1, 1, D).contiguous(), keys.unsqueeze(1).contiguous(),
                          values.unsqueeze(1).contiguous(), bias, False, 1.0)
    # the scores again (one GEMV, accumulated as the kernels do) to turn the op's lse into weights
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.bmm(keys.to(acc), q.to(acc).unsqueeze(-1)).squeeze(-1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = _WeightsFromLse.apply(scores, lse.reshape(B).to(acc))
    return out.reshape(B, values.shape[-1]), weights.to(q.dtype)


class BahdanauAttention(torch.nn.Module):
    r"""Bahdanau (additive) attention for one decoder step, fused (seqfast::additive_attention).

    :math:`s_j = v \cdot \tanh(W q + U k_j)` with ``W = nn.Linear(query_size, attn_size, bias=False)``,
    ``U = nn.Linear(key_size, attn_size)`` and ``v`` a parameter of size ``attn_size``; weights are the softmax of
    the scores over the unmasked source positions, context :math:`= \sum_j w_j v_j`. Score, masked softmax and the
    weighted sum run in one pass without materialising ``tanh(Wq + Uk)``.

    ``U k`` does not change during decoding: compute it once with :meth:`precompute_keys` and pass it as
    ``projected_keys=`` at every step (``keys`` is then only the default ``values`` and may be None if ``values``
    is given).

    Forward: ``query [B, Dq]``, ``keys [B, S, Dk]``, ``mask [B, S]`` bool (True = attend) or None, ``values
    [B, S, Dv]`` (default: ``keys``), ``projected_keys [B, S, attn_size]`` or None -> ``(context [B, Dv],
    weights [B, S])``. Unbatched inputs are accepted. A row with every position masked gives zero context and
    weights.
    """

    def __init__(self, query_size, key_size, attn_size, device=None, dtype=None):
        super().__init__()
        self.query_size, self.key_size, self.attn_size = query_size, key_size, attn_size
        self.W = torch.nn.Linear(query_size, attn_size, bias=False, device=device, dtype=dtype)
        self.U = torch.nn.Linear(key_size, attn_size, bias=True, device=device, dtype=dtype)
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
        context, weights = _attn.additive_attention(qp.contiguous(), kp.contiguous(), self.v, values.contiguous(),
                                                    None if mask is None else mask.contiguous())
        return (context, weights) if batched else (context.squeeze(0), weights.squeeze(0))


def _to_head_batches(t, static, name, batch_heads, head_dim):
    """[len, B, E] -> [B * H, len, head_dim], or the caller's precomputed ``static`` tensor after torch's checks."""
    if static is None:
        return t.reshape(t.shape[0], batch_heads, head_dim).transpose(0, 1)
    if static.size(0) != batch_heads:
        raise AssertionError(f"expecting {name}.size(0) of {batch_heads}, but got {static.size(0)}")
    if static.size(2) != head_dim:
        raise AssertionError(f"expecting {name}.size(2) of {head_dim}, but got {static.size(2)}")
    return static
