"""Functional scaled-dot-product attention (torch.nn.functional.scaled_dot_product_attention's signature, semantics
and errors), multi-head attention (torch.nn.functional.multi_head_attention_forward's) and the Luong (dot) decoder-step
attention, all on seqfast's fused attention op."""
import math
import warnings

import torch
import torch.nn.functional as torch_F

from .. import _backend, _ext, _rules
from ..ops import attention as _ops
from ..reference import attention as _reference
from ._linear import linear


def _broadcast(*shapes):
    """torch.broadcast_shapes, without its Python cost when the shapes already agree (the common case)."""
    first = shapes[0]
    return first if all(s == first for s in shapes[1:]) else torch.broadcast_shapes(*shapes)


def _as_4d(t, batch, heads):
    """t [..., h, len, dim] broadcast to [*batch, heads, len, dim] and flattened to [N, heads, len, dim] (views
    unless batch dims must merge); a 4-D tensor already of that shape is returned as is."""
    shape = (*batch, heads, *t.shape[-2:])
    if t.dim() == 4 and tuple(t.shape) == shape:
        return t
    return t.expand(shape).reshape(-1, heads, *t.shape[-2:])


# the C++ type names torch's SDPA error messages use
_CPP_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
              torch.bfloat16: "c10::BFloat16", torch.int64: "long int", torch.int32: "int", torch.int16: "short int",
              torch.int8: "signed char", torch.uint8: "unsigned char"}


def _cpp_name(dtype):
    return _CPP_NAMES.get(dtype, str(dtype).replace("torch.", ""))


_cpp_call = None  # seqfast._C.SdpaCall once built (False: none can be built here)


def _build_cpp_call():
    """seqfast._C.SdpaCall for this CPU and rule table (the C++ kernels' dtypes, the table's regions for calls without
    and with gradients), or False without the extension or a C++ SDPA kernel."""
    global _cpp_call
    module = _ext.module()
    dtypes = [dt for dt in (torch.float32, torch.float64, torch.bfloat16)
              if module is not None and _ops.sdpa.runs_cpp(torch.empty(0, dtype=dt))]
    _cpp_call = (module.SdpaCall(dtypes, _rules.sdpa_torch_regions(False), _rules.sdpa_torch_regions(True),
                                 _rules.sdpa_declined_regions())
                 if dtypes else False)
    return _cpp_call


def _op_upcasts(query):
    """Whether seqfast's op, on the backend it resolves to for ``query``, computes bfloat16 in float32 itself
    (seqfast._C.sdpa_bf16_upcasts: the C++ op wherever its own float32 attention blocks run, not on AMX CPUs)."""
    module = _ext.module()
    return module is not None and _ops.sdpa.runs_cpp(query) and module.sdpa_bf16_upcasts()


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention, fused (same signature, semantics and errors).

    query [..., Hq, L, E], key [..., Hk, S, E], value [..., Hk, S, Ev] (leading dims broadcast; Hk may divide Hq with
    enable_gqa). attn_mask: bool (True = attend) or additive float, broadcastable to [..., Hq, L, S]. ``dropout_p >
    0`` and a float mask that requires grad have no seqfast kernel: they run torch's own op (the reference only when
    that is forced), as does any case no seqfast kernel covers. A mask with is_causal applies both on 4-D inputs, as
    torch's CPU op does; on others torch's op raises its error.
    """
    # An unmasked call on 4-D CPU tensors (a decoder step, self-attention): seqfast._C.SdpaCall checks the tensors,
    # grad mode, autocast and the rule table in C++ and runs the kernel (no graph to record) or, with gradients inside
    # the table's regions, torch's op; or it declines (None) and the lines below decide. At batch 1 over 16 keys the
    # Python below took twice the kernel's time, and with gradients made torch's op 2x slower (25.8 against 12.0 us).
    if (attn_mask is None and dropout_p == 0.0 and not torch.compiler.is_compiling()
            and _backend.forced_backend() is None):
        call = _cpp_call if _cpp_call is not None else _build_cpp_call()
        if call:
            out = call(query, key, value, is_causal, scale, enable_gqa)
            if out is not None:
                return out
            if call.stale():  # a new rule table
                _build_cpp_call()
    upcast = (query.dtype is torch.bfloat16 and dropout_p == 0.0 and query.dim() >= 2 and key.dim() >= 2
              and (attn_mask is None or attn_mask.dtype in (torch.bool, torch.float32, torch.bfloat16))
              and _rules.sdpa_upcasts_bfloat16(query, key, value, is_causal))
    # a float32 mask keeps its precision on the copies (the op would round it to the query's dtype)
    direct = upcast and (attn_mask is None or attn_mask.dtype is not torch.float32) and _op_upcasts(query)
    if upcast and not direct:
        # no native bfloat16 on this CPU: the float32 kernels on upcast copies, the output rounded once (seqfast._rules)
        mask = attn_mask.float() if attn_mask is not None and attn_mask.dtype is torch.bfloat16 else attn_mask
        return scaled_dot_product_attention(query.float(), key.float(), value.float(), mask, 0.0, is_causal,
                                            scale=scale, enable_gqa=enable_gqa).to(torch.bfloat16)
    # (direct: the op computes bfloat16 in float32 itself, and the call goes to it below with its bfloat16 tensors: the
    # op's pooled copies and no Python ones, 2-13% less time at L128-2048 on the Zen 5)
    # Where torch's own op runs the call (no seqfast kernel for it, or a rule prefers torch's: decoder steps over few
    # keys on AVX2, for one), decide that before any of the work below: torch's op then checks its arguments itself
    # (its own errors), and a decoder step spends no Python on views it never uses (at 256 keys that Python cost
    # 7% of torch's step, measured in one process).
    if not direct and query.dim() >= 2 and key.dim() >= 2 and (_ops.sdpa.runs_torch_op(query) or _rules.prefer_torch(
            "sdpa", query, query.shape[-2], key.shape[-2], (query, key, value), is_causal, query.shape[-1])):
        return torch_F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                                    enable_gqa=enable_gqa)
    if attn_mask is None and dropout_p == 0.0 and query.dim() == key.dim() == value.dim() == 4:
        # the common call (a decoder step or self-attention, [N, H, len, dim] each, no mask): straight to the op. The
        # general path's broadcasting and views cost more Python than the kernel takes at batch 1 (a decoder step
        # over 16 keys and 8 heads: ~20 against ~6 us on a Zen 3 core)
        qs, ks, vs = query.shape, key.shape, value.shape
        if (qs[0] == ks[0] == vs[0] and qs[1] == ks[1] == vs[1] and qs[3] == ks[3] and ks[2] == vs[2] and qs[3] > 0
                and query.dtype == key.dtype == value.dtype and query.device == key.device == value.device):
            return _ops.sdpa(query.contiguous(), key.contiguous(), value.contiguous(), None, is_causal,
                             qs[3] ** -0.5 if scale is None else float(scale))[0]
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(f"Expected query, key, and value to have the same dtype, but got query.dtype: "
                           f"{query.dtype} key.dtype: {key.dtype} and value.dtype: {value.dtype} instead.")
    if not (query.device == key.device == value.device):
        raise RuntimeError(f"Expected query, key, and value to be on the same device, got {query.device}, "
                           f"{key.device} and {value.device}")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError("scaled_dot_product_attention: query, key and value must be at least 2-D")
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(f"scaled_dot_product_attention: query and key must have the same embedding size, got "
                           f"query {tuple(query.shape)} and key {tuple(key.shape)}")
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(f"scaled_dot_product_attention: key and value must have the same sequence length, got "
                           f"key {tuple(key.shape)} and value {tuple(value.shape)}")
    # torch's rule: a bool mask, a float32 one (whatever the query's dtype), or one of the query's dtype
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                           f"attn_mask.dtype: {_cpp_name(attn_mask.dtype)} and  query.dtype: "
                           f"{_cpp_name(query.dtype)} instead.")
    L, E, S, Ev = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    # torch's own op, exactly (its result or its error), for: no scores to scale (an empty or uniform result); an
    # empty query, key or value (whose mask the views below cannot fold); a mask with is_causal on other than 4-D
    # inputs (torch's math path raises there, its 4-D CPU path applies both, as seqfast's op does); enable_gqa on
    # inputs without a head dimension (torch raises IndexError)
    if (E == 0 or query.numel() == 0 or key.numel() == 0 or value.numel() == 0
            or (is_causal and attn_mask is not None and not query.dim() == key.dim() == value.dim() == 4)
            or (enable_gqa and min(query.dim(), key.dim(), value.dim()) < 3)):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                                                scale=scale, enable_gqa=enable_gqa)
    given_scale, scale = scale, (E ** -0.5 if scale is None else float(scale))

    # to [N, H, len, dim]: broadcast leading dims (views), keep kv heads apart for GQA
    q4, k4, v4 = (t.reshape((1,) * (4 - t.dim()) + t.shape) if t.dim() < 4 else t for t in (query, key, value))
    hq, hk = q4.shape[-3], k4.shape[-3]
    if enable_gqa and hq != hk:
        if hq % hk != 0 or v4.shape[-3] != hk:
            raise RuntimeError(f"scaled_dot_product_attention: with enable_gqa, the number of query heads ({hq}) "
                               f"must be a multiple of the number of key/value heads ({hk})")
    else:
        hk = hq = _broadcast(q4.shape[-3:-2], k4.shape[-3:-2], v4.shape[-3:-2])[0]
    batch = _broadcast(q4.shape[:-3], k4.shape[:-3], v4.shape[:-3])
    q4, k4, v4 = (_as_4d(t, batch, h) for t, h in ((q4, hq), (k4, hk), (v4, hk)))
    # torch's output has the rank of the highest-rank input
    out_shape = (tuple(batch) + (hq, L, Ev))[-max(query.dim(), key.dim(), value.dim()):]

    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
            bias.masked_fill_(~attn_mask, float("-inf"))
        else:
            bias = attn_mask.to(query.dtype)
        try:
            bias = bias.expand(*batch, hq, L, S).reshape(-1, hq, L, S)  # a view unless batch dims must merge
        except RuntimeError:
            raise RuntimeError(f"scaled_dot_product_attention: attn_mask of shape {tuple(attn_mask.shape)} does "
                               f"not broadcast to {tuple(batch) + (hq, L, S)}") from None

    feature = dropout_p > 0.0 or (bias is not None and bias.requires_grad)
    if feature and _backend.use_torch_for_feature():
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                                                scale=given_scale, enable_gqa=enable_gqa)
    if feature:  # forced reference
        out = _reference.sdpa_dropout(q4, k4, v4, bias, is_causal, scale, dropout_p)
    else:
        out = _ops.sdpa(q4.contiguous(), k4.contiguous(), v4.contiguous(), bias, is_causal, scale)[0]
    return out.reshape(out_shape)


# ----------------------------------------------------------------------------------------------------------------
# Multi-head attention (torch.nn.functional.multi_head_attention_forward)
# ----------------------------------------------------------------------------------------------------------------
def canonical_mask(mask, mask_name, other_type, other_name, target_type, check_other=True):
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
            proj = linear(q, w, b).unflatten(-1, (3, E))
            return proj[..., 0, :], proj[..., 1, :], proj[..., 2, :]
        w_q, w_kv = w.split([E, E * 2])
        b_q, b_kv = (None, None) if b is None else b.split([E, E * 2])
        kv = linear(k, w_kv, b_kv).unflatten(-1, (2, E))
        return linear(q, w_q, b_q), kv[..., 0, :], kv[..., 1, :]
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return linear(q, w_q, b_q), linear(k, w_k, b_k), linear(v, w_v, b_v)


def _in_projection(q, k, v, w_q, w_k, w_v, b_q, b_k, b_v):
    Eq, Ek, Ev = q.size(-1), k.size(-1), v.size(-1)
    for name, t, shape in (("query weights", w_q, (Eq, Eq)), ("key weights", w_k, (Eq, Ek)),
                           ("value weights", w_v, (Eq, Ev))):
        if t.shape != shape:
            raise AssertionError(f"expecting {name} shape of {shape}, but got {t.shape}")
    for name, t in (("query bias", b_q), ("key bias", b_k), ("value bias", b_v)):
        if t is not None and t.shape != (Eq,):
            raise AssertionError(f"expecting {name} shape of {(Eq,)}, but got {t.shape}")
    return linear(q, w_q, b_q), linear(k, w_k, b_k), linear(v, w_v, b_v)


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

    mask_dtype = None if attn_mask is None else attn_mask.dtype
    key_padding_mask = canonical_mask(key_padding_mask, "key_padding_mask", mask_dtype,
                                       "attn_mask", query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        # as torch: trust the hint and let the attention kernel build the causal mask (no mask tensor read)
        attn_mask = None
    else:
        attn_mask = canonical_mask(attn_mask, "attn_mask", None, "", query.dtype, check_other=False)
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
        out = linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, -1)
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
    out = scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, -1)
    if not is_batched:
        out = out.squeeze(1)
    return out, None


def _to_head_batches(t, static, name, batch_heads, head_dim):
    """[len, B, E] -> [B * H, len, head_dim], or the caller's precomputed ``static`` tensor after torch's checks."""
    if static is None:
        return t.reshape(t.shape[0], batch_heads, head_dim).transpose(0, 1)
    if static.size(0) != batch_heads:
        raise AssertionError(f"expecting {name}.size(0) of {batch_heads}, but got {static.size(0)}")
    if static.size(2) != head_dim:
        raise AssertionError(f"expecting {name}.size(2) of {head_dim}, but got {static.size(2)}")
    return static


# ----------------------------------------------------------------------------------------------------------------
# Luong (dot) decoder-step attention
# ----------------------------------------------------------------------------------------------------------------
def dot_attention(q, keys, values, mask=None):
    """context and weights of softmax(keys . q) over the unmasked keys; q [B, D], keys [B, S, D], values [B, S, Dv],
    mask [B, S] bool (True = attend) or None. A row with every key masked gives zero weights and context (the
    contract of seqfast/reference/attention.py).

    The step is bound by reading keys and values, and must return its weights as well as the context. Two ways, by
    what was faster on the CPU (same-process timings against torch's plain formula, B32 S512 D256 with a mask):
    - no gradient needed: two batched products around a softmax (each of keys and values read once; the scores as
      q @ keys^T, see _scores: 1033 against torch's 3516 us on a Zen 3; the fused route below, 1384 us, reads the
      keys twice);
    - training: seqfast's fused SDPA for the context, whose backward is fused too, plus one product for the weights
      (1.17x against 0.95-1.04x the plain way, before _scores). With the keys as values, the op gets them as one
      tensor and its backward returns dK + dV as one gradient: autograd added the two 16 MB gradients into a third
      before (Intel Xeon family 6 model 167, same process, torch's time over seqfast's: B32 S512 size 256 0.87x ->
      1.33x, B32 S64 size 512 0.94x -> 1.22x, B8 S128 size 256 0.74x -> 0.90x; the plain way 0.77-0.85x)."""
    if torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or values.requires_grad):
        return _fused_dot_attention(q, keys, values, mask)
    acc = torch.promote_types(q.dtype, torch.float32)  # the softmax runs in float32 at least
    scores = _scores(q, keys)
    if mask is None:
        weights = torch.softmax(scores, -1, dtype=acc)
    else:
        empty = ~mask.any(-1, keepdim=True)  # every key masked: weights 0, not softmax's NaN
        scores = scores.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
        weights = torch.softmax(scores, -1, dtype=acc).masked_fill(empty, 0.0)
    weights = weights.to(q.dtype)
    context = torch.bmm(weights.unsqueeze(1), values).squeeze(1)
    return context, weights


def _scores(q, keys):
    """keys . q per row: [B, S] from q [B, D] and keys [B, S, D], as q [B, 1, D] @ keys^T. The same sum as
    bmm(keys, q[..., None]), whose batched matrix-vector form runs ~6x slower on CPU (torch 2.13, B32 S512 D256:
    2967 against 506 us on a Zen 3)."""
    return torch.bmm(q.unsqueeze(1), keys.transpose(1, 2)).squeeze(1)


class _WeightsFromLse(torch.autograd.Function):
    """softmax(scores) given the row log-sum-exp the fused attention already computed: w = exp(s - lse), with the
    full softmax gradient ds = w * (dw - <w, dw>) (lse depends on s). A row with every score -inf (lse = -inf on
    every backend: seqfast/reference/attention.py) gives w = 0 and ds = 0; NaN or +inf scores stay NaN, as in torch."""

    @staticmethod
    def forward(scores, lse):
        lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        return torch.exp(scores - lse.to(scores.dtype)[:, None])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_w):
        (w,) = ctx.saved_tensors
        return w * (grad_w - (w * grad_w).sum(-1, keepdim=True)), None


def _fused_dot_attention(q, keys, values, mask):
    """dot_attention's training route: the context from the fused SDPA op (query length 1, scale 1, the mask as a
    key-padding bias), the weights from the same op's log-sum-exp (exp(s - lse))."""
    B, S, D = keys.shape
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        bias = bias.view(B, 1, 1, S)
    k = keys.unsqueeze(1).contiguous()
    v = k if values is keys else values.unsqueeze(1).contiguous()  # one tensor: the op's backward sums dK + dV itself
    out, lse = _ops.sdpa(q.reshape(B, 1, 1, D).contiguous(), k, v, bias, False, 1.0)
    # the scores again (one GEMV, accumulated as the kernels do) to turn the op's lse into weights
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = _scores(q.to(acc), keys.to(acc))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = _WeightsFromLse.apply(scores, lse.reshape(B).to(acc))
    return out.reshape(B, values.shape[-1]), weights.to(q.dtype)

