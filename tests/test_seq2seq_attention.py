"""seqfast.nn.LuongAttention / BahdanauAttention (one decoder step) against the plain PyTorch formulas: context,
weights and the gradients of the query, keys, values, projected keys and every parameter, on every backend and
dtype, with masks including a fully masked row (zero context, zero weights, no NaN)."""
import pytest
import torch

import seqfast
from conftest import BACKEND_DTYPES, TOL, backend_device
from seqfast.nn.attention import BahdanauAttention, LuongAttention

B, S, DQ, DK, DV, A = 3, 5, 6, 4, 3, 7


# ---------------------------------------------------------------------------------------------------------------
# the plain formulas (float64)
# ---------------------------------------------------------------------------------------------------------------
def masked_softmax(scores, mask):
    """softmax over the unmasked positions (mask True = keep); a fully masked row gives all-zero weights."""
    if mask is None:
        return torch.softmax(scores, -1)
    empty = ~mask.any(-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    return torch.softmax(scores, -1) * (~empty)


def luong_ref(query, keys, values, mask, W=None):
    q = query if W is None else torch.nn.functional.linear(query, W.weight, W.bias)
    weights = masked_softmax((keys * q[:, None, :]).sum(-1), mask)
    return (weights[:, :, None] * values).sum(1), weights


def bahdanau_ref(query, keys, values, mask, W, U, v, projected_keys=None):
    kp = torch.nn.functional.linear(keys, U.weight, U.bias) if projected_keys is None else projected_keys
    scores = (torch.tanh(torch.nn.functional.linear(query, W.weight)[:, None, :] + kp) * v).sum(-1)
    weights = masked_softmax(scores, mask)
    return (weights[:, :, None] * values).sum(1), weights


# ---------------------------------------------------------------------------------------------------------------
def tol(dtype):
    rtol, atol = TOL[dtype]
    return (rtol, atol) if dtype in (torch.float32, torch.float64) else (2 * rtol, 2 * atol)


def check_close(actual, expected, dtype, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    rtol, atol = tol(dtype)
    torch.testing.assert_close(actual.double().cpu(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def make_mask(kind, device):
    if kind is None:
        return None
    m = torch.rand(B, S) < 0.6
    m[:, 0] = True
    if kind == "empty_row":
        m[1] = False  # every source position of row 1 masked
    return m.to(device)


def rounded_pair(module, dtype, device):
    """The module in dtype on device, and a float64 CPU copy holding the same rounded parameters."""
    ours = module.to(device=device, dtype=dtype)
    ref_params = {n: p.detach().double().cpu().requires_grad_(True) for n, p in ours.named_parameters()}
    return ours, ref_params


def leaf(t, device=None, dtype=None):
    return t.detach().to(device=device, dtype=dtype).requires_grad_(True)


class _Lin:  # a Linear-like view on float64 reference parameters
    def __init__(self, params, prefix):
        self.weight, self.bias = params[f"{prefix}.weight"], params.get(f"{prefix}.bias")


def _compare(outs, outs_ref, leaves, module, ref_params, dtype):
    names = ("context", "weights")
    for name, a, r in zip(names, outs, outs_ref):
        assert a.dtype == dtype
        check_close(a, r.detach(), dtype, name)
    grads = [torch.randn_like(r) for r in outs_ref]
    torch.autograd.backward(outs, [g.to(device=outs[0].device, dtype=dtype) for g in grads])
    torch.autograd.backward(outs_ref, grads)
    for name, (a, r) in leaves.items():
        check_close(a.grad, r.grad, dtype, f"grad {name}")
    for name, p in module.named_parameters():
        check_close(p.grad, ref_params[name].grad, dtype, f"grad {name}")


LUONG = [("dot", False, False), ("general", False, True), ("general", True, False)]  # (score, bias, distinct values)
MASKS = [None, "partial", "empty_row"]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("mask_kind", MASKS, ids=["nomask", "mask", "empty_row"])
@pytest.mark.parametrize("score,bias,distinct", LUONG, ids=["dot", "general_values", "general_bias"])
def test_luong_parity(score, bias, distinct, mask_kind, backend, dtype):
    device = backend_device(backend)
    dk = DQ if score == "dot" else DK
    module = LuongAttention(DQ, dk, score=score, bias=bias)
    if bias:
        torch.nn.init.normal_(module.W.bias)
    ours, ref_params = rounded_pair(module, dtype, device)
    q, k = torch.randn(B, DQ).to(dtype), torch.randn(B, S, dk).to(dtype)
    v = torch.randn(B, S, DV).to(dtype) if distinct else None
    mask = make_mask(mask_kind, device)

    qs, ks = leaf(q, device), leaf(k, device)
    vs = leaf(v, device) if distinct else None
    with seqfast.use_backend(backend):
        outs = ours(qs, ks, mask, values=vs)
    qr, kr = leaf(q, "cpu", torch.float64), leaf(k, "cpu", torch.float64)
    vr = leaf(v, "cpu", torch.float64) if distinct else kr
    W = _Lin(ref_params, "W") if score == "general" else None
    outs_ref = luong_ref(qr, kr, vr, None if mask is None else mask.cpu(), W)
    leaves = {"query": (qs, qr), "keys": (ks, kr)}
    if distinct:
        leaves["values"] = (vs, vr)
    _compare(outs, outs_ref, leaves, ours, ref_params, dtype)
    if mask_kind == "empty_row":
        assert torch.equal(outs[0][1].detach().cpu(), torch.zeros(outs[0].shape[1], dtype=dtype))
        assert torch.equal(outs[1][1].detach().cpu(), torch.zeros(S, dtype=dtype))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("mask_kind", MASKS, ids=["nomask", "mask", "empty_row"])
@pytest.mark.parametrize("variant", ["keys", "values", "projected"])
def test_bahdanau_parity(variant, mask_kind, backend, dtype):
    device = backend_device(backend)
    module = BahdanauAttention(DQ, DK, A)
    ours, ref_params = rounded_pair(module, dtype, device)
    q, k, v = torch.randn(B, DQ).to(dtype), torch.randn(B, S, DK).to(dtype), torch.randn(B, S, DV).to(dtype)
    mask = make_mask(mask_kind, device)

    qs, ks = leaf(q, device), leaf(k, device)
    vs = leaf(v, device) if variant != "keys" else None
    qr, kr = leaf(q, "cpu", torch.float64), leaf(k, "cpu", torch.float64)
    vr = leaf(v, "cpu", torch.float64) if variant != "keys" else kr
    W, U, vv = _Lin(ref_params, "W"), _Lin(ref_params, "U"), ref_params["v"]
    with seqfast.use_backend(backend):
        if variant == "projected":  # the decoder-loop use: U keys once, then every step from it
            kp = ours.precompute_keys(ks)
            outs = ours(qs, None, mask, values=vs, projected_keys=kp)
        else:
            outs = ours(qs, ks, mask, values=vs)
    outs_ref = bahdanau_ref(qr, kr, vr, None if mask is None else mask.cpu(), W, U, vv)
    leaves = {"query": (qs, qr), "keys": (ks, kr)}
    if variant != "keys":
        leaves["values"] = (vs, vr)
    _compare(outs, outs_ref, leaves, ours, ref_params, dtype)
    if mask_kind == "empty_row":
        assert torch.equal(outs[0][1].detach().cpu(), torch.zeros(outs[0].shape[1], dtype=dtype))
        assert torch.equal(outs[1][1].detach().cpu(), torch.zeros(S, dtype=dtype))


@pytest.mark.parametrize("cls", ["luong", "bahdanau"])
def test_unbatched(cls):
    module = LuongAttention(DQ, DK, score="general") if cls == "luong" else BahdanauAttention(DQ, DK, A)
    module.double()
    q, k = torch.randn(B, DQ, dtype=torch.float64), torch.randn(B, S, DK, dtype=torch.float64)
    mask = make_mask("partial", "cpu")
    ctx, w = module(q, k, mask)
    for i in range(B):
        c1, w1 = module(q[i], k[i], mask[i])
        assert c1.shape == (DK,) and w1.shape == (S,)
        torch.testing.assert_close(c1, ctx[i])
        torch.testing.assert_close(w1, w[i])


def test_projected_keys_decoder_loop():
    """A decoder loop reusing precompute_keys gives the per-step results of calling with the keys."""
    module = BahdanauAttention(DQ, DK, A).double()
    k = torch.randn(B, S, DK, dtype=torch.float64)
    kp = module.precompute_keys(k)
    assert kp.shape == (B, S, A)
    for _ in range(3):
        q = torch.randn(B, DQ, dtype=torch.float64)
        a, b = module(q, k, projected_keys=kp), module(q, k)
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])


def test_construction_and_errors():
    assert LuongAttention(4).W is None
    assert LuongAttention(4, 5, score="general", bias=True).W.bias.shape == (5,)
    b = BahdanauAttention(4, 5, 6)
    assert b.W.bias is None and b.U.bias.shape == (6,) and b.v.shape == (6,)
    assert sorted(dict(b.named_parameters())) == ["U.bias", "U.weight", "W.weight", "v"]
    with pytest.raises(ValueError):
        LuongAttention(4, 5)  # dot needs equal sizes
    with pytest.raises(ValueError):
        LuongAttention(4, score="concat")
    with pytest.raises(ValueError):
        LuongAttention(4, bias=True)
    q, k = torch.randn(2, 4), torch.randn(2, 3, 4)
    with pytest.raises(TypeError):
        LuongAttention(4)(q, k, torch.ones(2, 3))  # mask must be bool
    with pytest.raises(ValueError):
        LuongAttention(4)(q, torch.randn(2, 3, 5))
    with pytest.raises(ValueError):
        LuongAttention(4)(q, torch.randn(3, 3, 4))
    with pytest.raises(ValueError):
        BahdanauAttention(4, 4, 6)(q, k, projected_keys=torch.randn(2, 3, 5))
    with pytest.raises(ValueError):
        BahdanauAttention(4, 4, 6)(q, None, projected_keys=torch.randn(2, 3, 6))  # values needed without keys


@pytest.mark.parametrize("kind", ["luong", "bahdanau"])
def test_plain_twins_match(kind):
    """seqfast.reference.seq2seq_attention (torch's side in the benchmarks and the seq2seq example) holds the same
    parameters as seqfast's modules and computes the same context and weights (rows with some key unmasked)."""
    from seqfast.reference import seq2seq_attention as plain
    torch.manual_seed(0)
    if kind == "luong":
        ours, twin = LuongAttention(DQ, DK, score="general").double(), plain.LuongAttention(DQ, DK).double()
    else:
        ours, twin = BahdanauAttention(DQ, DK, A).double(), plain.BahdanauAttention(DQ, DK, A).double()
    twin.load_state_dict(ours.state_dict())  # strict, both ways
    ours.load_state_dict(twin.state_dict())
    query, keys = torch.randn(B, DQ, dtype=torch.float64), torch.randn(B, S, DK, dtype=torch.float64)
    values, mask = torch.randn(B, S, DV, dtype=torch.float64), make_mask("some", "cpu")
    for got, want in zip(ours(query, keys, mask=mask, values=values), twin(query, keys, mask=mask, values=values)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", [None, "empty_row"])
def test_luong_no_grad_route_matches_training_route(kind):
    """LuongAttention runs two routes (seqfast.functional.dot_attention): the fused SDPA when a gradient is needed,
    torch's batched GEMVs without. Both give the plain formula's context and weights, a fully masked row included."""
    torch.manual_seed(0)
    module = LuongAttention(DQ, DK, score="general").double()
    query, keys = torch.randn(B, DQ, dtype=torch.float64), torch.randn(B, S, DK, dtype=torch.float64)
    values, mask = torch.randn(B, S, DV, dtype=torch.float64), make_mask(kind, "cpu")
    trained = module(query, keys, mask=mask, values=values)  # W requires grad: the fused route
    with torch.no_grad():
        plain = module(query, keys, mask=mask, values=values)
    want = luong_ref(query, keys, values, mask, module.W)
    for got_train, got_plain, expected in zip(trained, plain, want):
        torch.testing.assert_close(got_train.detach(), expected.detach())
        torch.testing.assert_close(got_plain, expected.detach())
