"""Parity of seqfast.nn.MultiheadAttention with torch.nn.MultiheadAttention: outputs, weights and the gradients of
the inputs and every parameter, for each option (batch_first, unbatched, kdim/vdim, bias, add_bias_kv,
add_zero_attn, bool/float 2-D/3-D attn_mask, bool/float key_padding_mask, is_causal) on every backend and dtype;
torch's errors (same exception types and messages); state_dict both ways; swapped into torch's Transformer layers.

need_weights=False runs seqfast's fused SDPA (the backend under test); need_weights=True runs torch's plain math
whatever the backend, so it is tested on the reference backend only, across dtypes.
"""
import copy

import pytest
import torch

import seqfast
from conftest import BACKEND_DTYPES, TOL, backend_device
from seqfast.nn.attention import MultiheadAttention

E, H, B, L = 8, 2, 2, 3

# (name, constructor kwargs, input spec). spec: mode "self" (q is k is v), "cross" (k is v, S != L) or "distinct"
# (three tensors); S source length; unbatched; kpm None/"bool"/"float"; attn None/"bool2d"/"float2d"/"bool3d"/
# "float3d"/"causal_bool"/"causal_float"; is_causal.
CASES = [
    ("self", {}, dict(mode="self")),
    ("batch_first_self", dict(batch_first=True), dict(mode="self")),
    ("cross", {}, dict(mode="cross", S=5)),
    ("distinct_kv", dict(batch_first=True), dict(mode="distinct", S=4)),
    ("kdim_vdim", dict(kdim=5, vdim=7), dict(mode="distinct", S=5)),
    ("kdim_vdim_bf_masks", dict(kdim=5, vdim=7, batch_first=True), dict(mode="distinct", S=4, kpm="bool",
                                                                         attn="bool3d")),
    ("no_bias", dict(bias=False), dict(mode="self", attn="float2d")),
    ("unbatched", {}, dict(mode="self", unbatched=True, kpm="bool", attn="bool2d")),
    ("unbatched_3d_mask", dict(batch_first=True), dict(mode="distinct", unbatched=True, S=4, attn="float3d")),
    ("bias_kv", dict(add_bias_kv=True), dict(mode="cross", S=4, kpm="bool", attn="bool2d")),
    ("zero_attn", dict(add_zero_attn=True), dict(mode="self", kpm="float", attn="float3d")),
    ("bias_kv_zero_attn_kdim", dict(add_bias_kv=True, add_zero_attn=True, kdim=5, vdim=6),
     dict(mode="distinct", S=4, kpm="bool", attn="bool3d")),
    ("kpm_bool", {}, dict(mode="self", kpm="bool")),
    ("kpm_float", dict(batch_first=True), dict(mode="cross", S=4, kpm="float")),
    ("attn_bool2d", {}, dict(mode="cross", S=5, attn="bool2d")),
    ("attn_float3d", {}, dict(mode="self", attn="float3d")),
    ("both_bool", dict(batch_first=True), dict(mode="self", kpm="bool", attn="bool2d")),
    ("both_float", {}, dict(mode="cross", S=4, kpm="float", attn="float2d")),
    ("causal", dict(batch_first=True), dict(mode="self", attn="causal_bool", is_causal=True)),
    ("causal_float", {}, dict(mode="self", attn="causal_float", is_causal=True)),
    ("causal_kpm", dict(batch_first=True), dict(mode="self", attn="causal_bool", is_causal=True, kpm="bool")),
]
CASE_IDS = [c[0] for c in CASES]
# the Triton interpreter is slow: a subset covering every mask kind, layout and key/value option
TRITON_CASES = ["self", "distinct_kv", "kdim_vdim_bf_masks", "unbatched", "bias_kv_zero_attn_kdim", "kpm_float",
                "both_float", "causal", "causal_kpm"]


def tol(dtype):
    """TOL, looser for half precision: q/k/v/out projections and the attention each round to the storage dtype, and
    parameter gradients sum over batch and length."""
    rtol, atol = TOL[dtype]
    return (rtol, atol) if dtype in (torch.float32, torch.float64) else (2 * rtol, 2 * atol)


def check_close(actual, expected, dtype, what):
    rtol, atol = tol(dtype)
    torch.testing.assert_close(actual.double().cpu(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def make_pair(ctor, dtype, device):
    """(ours in dtype on device, torch's in float64 on CPU with our rounded parameters), both in eval mode."""
    ref = torch.nn.MultiheadAttention(E, H, **ctor).double()
    with torch.no_grad():  # non-zero biases, so the bias gradients are meaningful
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.normal_()
    ours = MultiheadAttention(E, H, **ctor)
    ours.load_state_dict(ref.state_dict())
    ours.to(device=device, dtype=dtype)
    ref.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
    return ours.eval(), ref.eval()


def _mask(kind, shape, dtype, g):
    """A random mask with column 0 never masked (no fully masked row: torch's need_weights math gives NaN there)."""
    masked = torch.rand(shape, generator=g) < 0.35
    masked[..., 0] = False
    if kind == "bool":
        return masked
    return (torch.randn(shape, generator=g) * 0.5).masked_fill(masked, float("-inf")).to(dtype)


def make_inputs(ctor, spec, dtype):
    """Inputs as CPU tensors in dtype: (query, key, value, kwargs for forward). key is query / value is key by mode."""
    g = torch.Generator().manual_seed(0)
    S = spec.get("S", L) if spec["mode"] != "self" else L
    unbatched, bf = spec.get("unbatched", False), ctor.get("batch_first", False)

    def seq(n, d):
        shape = (n, d) if unbatched else ((B, n, d) if bf else (n, B, d))
        return torch.randn(shape, generator=g).to(dtype)

    query = seq(L, E)
    if spec["mode"] == "self":
        key = value = query
    elif spec["mode"] == "cross":
        key = value = seq(S, ctor.get("kdim", E))
    else:
        key, value = seq(S, ctor.get("kdim", E)), seq(S, ctor.get("vdim", E))
    kw = {}
    if spec.get("kpm"):
        kw["key_padding_mask"] = _mask(spec["kpm"], (S,) if unbatched else (B, S), dtype, g)
    attn = spec.get("attn")
    if attn in ("bool2d", "float2d"):
        kw["attn_mask"] = _mask(attn[:-2], (L, S), dtype, g)
    elif attn in ("bool3d", "float3d"):
        kw["attn_mask"] = _mask(attn[:-2], (H, L, S) if unbatched else (B * H, L, S), dtype, g)
    elif attn == "causal_bool":
        kw["attn_mask"] = torch.ones(L, S, dtype=torch.bool).triu(1)
    elif attn == "causal_float":
        kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)
    if spec.get("is_causal"):
        kw["is_causal"] = True
    return query, key, value, kw


def _leaves(query, key, value, device, dtype):
    """Leaf copies keeping the identities (query is key is value) that select torch's packed projections."""
    q = query.detach().to(device=device, dtype=dtype).requires_grad_(True)
    k = q if key is query else key.detach().to(device=device, dtype=dtype).requires_grad_(True)
    v = k if value is key else value.detach().to(device=device, dtype=dtype).requires_grad_(True)
    return q, k, v


def _move(kw, device, dtype):
    return {k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def run_parity(case, backend, dtype, need_weights, average=True):
    _, ctor, spec = case
    device = backend_device(backend)
    ours, ref = make_pair(ctor, dtype, device)
    query, key, value, kw = make_inputs(ctor, spec, dtype)
    q, k, v = _leaves(query, key, value, device, dtype)
    with seqfast.use_backend(backend):
        out, w = ours(q, k, v, need_weights=need_weights, average_attn_weights=average, **_move(kw, device, dtype))
    qr, kr, vr = _leaves(query, key, value, "cpu", torch.float64)
    out_r, w_r = ref(qr, kr, vr, need_weights=need_weights, average_attn_weights=average,
                     **_move(kw, "cpu", torch.float64))

    assert out.dtype == dtype and out.shape == out_r.shape
    check_close(out, out_r.detach(), dtype, "output")
    outs, outs_r = [out], [out_r]
    if need_weights:
        assert w.shape == w_r.shape
        check_close(w, w_r.detach(), dtype, "weights")
        outs.append(w)
        outs_r.append(w_r)
    else:
        assert w is None and w_r is None
    grads = [torch.randn_like(o) for o in outs_r]
    torch.autograd.backward(outs, [g.to(device=device, dtype=dtype) for g in grads])
    torch.autograd.backward(outs_r, grads)
    for name, a, r in (("query", q, qr), ("key", k, kr), ("value", v, vr)):
        check_close(a.grad, r.grad, dtype, f"grad {name}")
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        check_close(p.grad, ref_params[name].grad, dtype, f"grad {name}")


FUSED_PARAMS = [(b, d, c) for b, d in BACKEND_DTYPES for c in CASES if b != "triton" or c[0] in TRITON_CASES]


@pytest.mark.parametrize("backend,dtype,case", FUSED_PARAMS,
                         ids=[f"{b}-{str(d)[6:]}-{c[0]}" for b, d, c in FUSED_PARAMS])
def test_fused_parity(backend, dtype, case):
    run_parity(case, backend, dtype, need_weights=False)


@pytest.mark.parametrize("dtype,average", [(torch.float64, True), (torch.float32, False), (torch.bfloat16, True)],
                         ids=["float64-avg", "float32-per_head", "bfloat16-avg"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_need_weights_parity(case, average, dtype):
    run_parity(case, "reference", dtype, need_weights=True, average=average)


@pytest.mark.parametrize("need_weights", [False, True])
def test_float_mask_gradients(need_weights):
    """A float attn_mask that requires grad gets torch's gradient (the fused path then runs autograd's reference)."""
    ours, ref = make_pair({}, torch.float64, "cpu")
    x = torch.randn(L, B, E, dtype=torch.float64)
    mask = torch.randn(B * H, L, L, dtype=torch.float64)
    grads = []
    for mod in (ours, ref):
        m = mask.clone().requires_grad_(True)
        xs = x.clone().requires_grad_(True)
        out = mod(xs, xs, xs, attn_mask=m, need_weights=need_weights)[0]
        out.pow(2).sum().backward()
        grads.append((out.detach(), m.grad, xs.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_dropout_training(need_weights, batch_first):
    """In training, dropout applies to the attention weights; with the same seed the masks equal torch's draws."""
    ours, ref = make_pair(dict(dropout=0.5, batch_first=batch_first), torch.float64, "cpu")
    ours.train()
    ref.train()
    x = torch.randn((B, L, E) if batch_first else (L, B, E), dtype=torch.float64)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, -1] = True
    outs = []
    for mod in (ours, ref):
        torch.manual_seed(123)
        xs = x.clone().requires_grad_(True)
        out, w = mod(xs, xs, xs, key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=False)
        out.sum().backward()
        outs.append((out.detach(), xs.grad) + (() if w is None else (w.detach(),)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # dropout is active: two draws differ; eval mode is deterministic
        assert not torch.equal(ours(x, x, x, need_weights=need_weights)[0], ours(x, x, x, need_weights=need_weights)[0])
        ours.eval()
        torch.testing.assert_close(ours(x, x, x, need_weights=need_weights)[0],
                                   ref.eval()(x, x, x, need_weights=need_weights)[0])


def test_fully_masked_row_fused():
    """A fully masked key row gives output = out_proj bias with need_weights=False (torch's SDPA gives 0 attention
    there too) and finite gradients."""
    ours, ref = make_pair({}, torch.float64, "cpu")
    x = torch.randn(L, B, E, dtype=torch.float64)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0] = True
    res = []
    for mod in (ours, ref):
        xs = x.clone().requires_grad_(True)
        out = mod(xs, xs, xs, key_padding_mask=kpm, need_weights=False)[0]
        out.sum().backward()
        res.append((out.detach(), xs.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)
    assert torch.isfinite(res[0][1]).all()


# ------------------------------------------------------------------------------------------------------------------
# errors: same exception types and messages as torch
# ------------------------------------------------------------------------------------------------------------------
def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


ERRORS = {
    "query_4d": ({}, lambda: ((_x(1, L, B, E),) * 3, {})),
    "key_2d_for_batched": ({}, lambda: ((_x(L, B, E), _x(L, E), _x(L, E)), {})),
    "key_3d_for_unbatched": ({}, lambda: ((_x(L, E), _x(L, B, E), _x(L, B, E)), {})),
    "kpm_3d": ({}, lambda: ((_x(L, B, E),) * 3, dict(key_padding_mask=torch.zeros(B, L, 1, dtype=torch.bool)))),
    "kpm_2d_unbatched": ({}, lambda: ((_x(L, E),) * 3, dict(key_padding_mask=torch.zeros(1, L, dtype=torch.bool)))),
    "attn_mask_4d": ({}, lambda: ((_x(L, B, E),) * 3, dict(attn_mask=torch.zeros(1, 1, L, L)))),
    "attn_mask_int": ({}, lambda: ((_x(L, B, E),) * 3, dict(attn_mask=torch.zeros(L, L, dtype=torch.int64)))),
    "kpm_int": ({}, lambda: ((_x(L, B, E),) * 3, dict(key_padding_mask=torch.zeros(B, L, dtype=torch.int32)))),
    "causal_without_mask": ({}, lambda: ((_x(L, B, E),) * 3, dict(is_causal=True))),
    "causal_without_mask_no_weights": ({}, lambda: ((_x(L, B, E),) * 3, dict(is_causal=True, need_weights=False))),
    "embed_dim": ({}, lambda: ((_x(L, B, E + 1),) * 3, {})),
    "key_value_shape": ({}, lambda: ((_x(L, B, E), _x(L + 1, B, E), _x(L, B, E)), {})),
    "kdim_batch_mismatch": (dict(kdim=5, vdim=6), lambda: ((_x(L, B, E), _x(4, B, 5), _x(3, B, 6)), {})),
    "kdim_wrong_key_size": (dict(kdim=5, vdim=6), lambda: ((_x(L, B, E), _x(4, B, 6), _x(4, B, 6)), {})),
    "attn_mask_2d_shape": ({}, lambda: ((_x(L, B, E),) * 3, dict(attn_mask=torch.zeros(L, L + 1)))),
    "attn_mask_3d_shape": ({}, lambda: ((_x(L, B, E),) * 3, dict(attn_mask=torch.zeros(B, L, L)))),
    "attn_mask_3d_unbatched": ({}, lambda: ((_x(L, E),) * 3, dict(attn_mask=torch.zeros(1, L, L)))),
    "kpm_shape": ({}, lambda: ((_x(L, B, E),) * 3, dict(key_padding_mask=torch.zeros(B, L + 1, dtype=torch.bool)))),
    "kpm_batch": ({}, lambda: ((_x(L, B, E),) * 3, dict(key_padding_mask=torch.zeros(B + 1, L, dtype=torch.bool)))),
    "kpm_shape_zero_attn": (dict(add_zero_attn=True), lambda: ((_x(L, B, E),) * 3,
                                                             dict(key_padding_mask=torch.zeros(B, L + 2,
                                                                                               dtype=torch.bool)))),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_match_torch(name):
    ctor, make = ERRORS[name]
    ref = torch.nn.MultiheadAttention(E, H, **ctor)
    ours = MultiheadAttention(E, H, **ctor)
    ours.load_state_dict(ref.state_dict())
    args, kw = make()
    with pytest.raises(Exception) as expected:
        ref(*args, **kw)
    with pytest.raises(expected.type) as got:
        ours(*args, **kw)
    assert got.type is expected.type
    assert str(got.value) == str(expected.value)


def test_mismatched_mask_types_warn_like_torch():
    ours, ref = make_pair({}, torch.float64, "cpu")
    x = _x(L, B, E, dtype=torch.float64)
    kw = dict(key_padding_mask=torch.zeros(B, L, dtype=torch.bool), attn_mask=torch.zeros(L, L, dtype=torch.float64))
    with pytest.warns(UserWarning, match="Support for mismatched key_padding_mask and attn_mask is deprecated"):
        ref(x, x, x, **kw)
    with pytest.warns(UserWarning, match="Support for mismatched key_padding_mask and attn_mask is deprecated"):
        out = ours(x, x, x, **kw)[0]
    torch.testing.assert_close(out, ref(x, x, x, **kw)[0])


# ------------------------------------------------------------------------------------------------------------------
# state_dict, module attributes
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ctor", [{}, dict(kdim=5, vdim=7), dict(add_bias_kv=True, bias=False),
                                  dict(batch_first=True, add_zero_attn=True)], ids=["plain", "kdim", "bias_kv", "bf"])
def test_state_dict_both_ways(ctor):
    ref = torch.nn.MultiheadAttention(E, H, **ctor)
    ours = MultiheadAttention(E, H, **ctor)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    assert all(sd_ref[k].shape == sd_ours[k].shape for k in sd_ref)
    ours.load_state_dict(sd_ref)
    ref2 = torch.nn.MultiheadAttention(E, H, **ctor)
    ref2.load_state_dict(ours.state_dict())
    for k, v in ref2.state_dict().items():
        assert torch.equal(v, sd_ref[k])
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "batch_first", "_qkv_same_embed_dim",
                 "dropout", "add_zero_attn"):
        assert getattr(ours, attr) == getattr(ref, attr)


# ------------------------------------------------------------------------------------------------------------------
# swapped into torch's Transformer layers
# ------------------------------------------------------------------------------------------------------------------
def _swap(layer, names):
    for name in names:
        old = getattr(layer, name)
        new = MultiheadAttention(old.embed_dim, old.num_heads, dropout=old.dropout, batch_first=old.batch_first,
                                 device=old.in_proj_weight.device, dtype=old.in_proj_weight.dtype)
        new.load_state_dict(old.state_dict())
        setattr(layer, name, new)
    return layer


LAYER_PARAMS = [("reference", torch.float64), ("cpp", torch.float64), ("cpp", torch.float32), ("triton", torch.float32)]


@pytest.mark.parametrize("backend,dtype", LAYER_PARAMS, ids=[f"{b}-{str(d)[6:]}" for b, d in LAYER_PARAMS])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "sf"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_transformer_layer_swap(kind, batch_first, backend, dtype):
    """torch's layer vs the same layer with seqfast attention (same weights), eval mode with grad (torch's native
    fast path then stays off, so both run the same composite): outputs and all gradients."""
    device = backend_device(backend)
    kw = dict(d_model=E, nhead=H, dim_feedforward=16, dropout=0.0, batch_first=batch_first, device=device, dtype=dtype)
    if kind == "encoder":
        ref = torch.nn.TransformerEncoderLayer(**kw).eval()
        ours = _swap(copy.deepcopy(ref), ["self_attn"])
    else:
        ref = torch.nn.TransformerDecoderLayer(**kw).eval()
        ours = _swap(copy.deepcopy(ref), ["self_attn", "multihead_attn"])
    S = 4

    def seq(n):
        return torch.randn((B, n, E) if batch_first else (n, B, E), dtype=dtype, device=device)

    x, mem = seq(L), seq(S)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, device=device, dtype=dtype)
    kpm = torch.zeros(B, L, dtype=torch.bool, device=device)
    kpm[1, -1] = True
    mem_kpm = torch.zeros(B, S, dtype=torch.bool, device=device)
    mem_kpm[0, 1:3] = True
    results = []
    for layer in (ref, ours):
        xs, ms = x.clone().requires_grad_(True), mem.clone().requires_grad_(True)
        with seqfast.use_backend(backend):
            if kind == "encoder":
                out = layer(xs, src_mask=causal, src_key_padding_mask=kpm, is_causal=True)
                out2 = layer(xs)
            else:
                out = layer(xs, ms, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=mem_kpm)
                out2 = layer(xs, ms, tgt_key_padding_mask=kpm)
        (out.pow(2).sum() + out2.sum()).backward()
        results.append([out.detach(), out2.detach(), xs.grad, ms.grad if kind == "decoder" else xs.grad]
                       + [p.grad for p in layer.parameters()])
    rtol, atol = tol(dtype)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_transformer_encoder_fast_path_untouched():
    """In eval mode without grad torch's encoder layer takes its native fast path, reading the attention's
    attributes (batch_first, _qkv_same_embed_dim, in_proj_*, out_proj): the swapped module must keep it working."""
    ref = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    ours = _swap(copy.deepcopy(ref), ["self_attn"])
    enc_ref = torch.nn.TransformerEncoder(ref, 2, enable_nested_tensor=False).eval()
    enc_ours = torch.nn.TransformerEncoder(ours, 2, enable_nested_tensor=False).eval()
    assert isinstance(enc_ours.layers[0].self_attn, MultiheadAttention)
    x = torch.randn(B, L, E)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -1] = True
    with torch.no_grad():
        torch.testing.assert_close(enc_ours(x, src_key_padding_mask=kpm), enc_ref(x, src_key_padding_mask=kpm))
        torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("need_weights", [False, True])
def test_functional_static_kv(need_weights):
    """seqfast.functional.multi_head_attention_forward takes torch's functional signature, static_k/v included."""
    from seqfast.functional import multi_head_attention_forward
    ref = torch.nn.MultiheadAttention(E, H).double()
    x = torch.randn(L, B, E, dtype=torch.float64)
    S = 4
    static_k, static_v = (torch.randn(B * H, S, E // H, dtype=torch.float64) for _ in range(2))
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 0] = True
    args = (x, x, x, E, H, ref.in_proj_weight, ref.in_proj_bias, None, None, False, 0.0, ref.out_proj.weight,
            ref.out_proj.bias)
    kw = dict(training=False, key_padding_mask=kpm, need_weights=need_weights, static_k=static_k,
              static_v=static_v)
    a = multi_head_attention_forward(*args, **kw)
    b = torch.nn.functional.multi_head_attention_forward(*args, **kw)
    torch.testing.assert_close(a[0], b[0])
    if need_weights:
        torch.testing.assert_close(a[1], b[1])


def test_module_is_torchs_where_the_rule_table_gives_torch_the_attention(monkeypatch):
    """Where the rule table gives a call's attention to torch's SDPA, the module runs torch's own forward (its fused
    inference path included): torch's results bit for bit, seqfast's functional never called. With an empty table the
    module composes seqfast's functional as usual."""
    from seqfast import _rules
    from seqfast.nn import attention as nn_attention
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    mod = seqfast.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 32)
    calls = []
    original = nn_attention.seqfast_F.multi_head_attention_forward
    monkeypatch.setattr(nn_attention.seqfast_F, "multi_head_attention_forward",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    saved = list(_rules.RULES)
    try:
        _rules.set_rules([_rules.Rule("sdpa", torch.float32, (_rules.cpu_class(),), source="test")])
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                for args in ((x, x, x), (x, x[:, :3], x[:, :3])):
                    for need_weights in (False, True):
                        got = mod(*args, need_weights=need_weights)
                        want = ref(*args, need_weights=need_weights)
                        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
                        assert (got[1] is None) == (want[1] is None)
        assert calls == []
        _rules.set_rules([])
        with torch.no_grad():
            torch.testing.assert_close(mod(x, x, x)[0], ref(x, x, x)[0], rtol=1e-5, atol=1e-6)
        assert calls == [1]
        with seqfast.use_backend("reference"):  # a forced backend bypasses the table
            _rules.set_rules([_rules.Rule("sdpa", torch.float32, (_rules.cpu_class(),), source="test")])
            mod(x, x, x)
        assert calls == [1, 1]
    finally:
        _rules.set_rules(saved)
