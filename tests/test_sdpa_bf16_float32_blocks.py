"""bfloat16 SDPA in the C++ op on the float32 blocks (csrc/attention/attention.cpp: sdpa_bf16_upcasts): forward and
backward compute in float32 on upcast copies of q, k, v (and grad_out, out, the mask bias) and round the results to
bfloat16 once; the forward decoder step keeps streaming bfloat16. The rule table is emptied so seqfast's op runs every
call. Checked: outputs bit-equal to the float32 op on the same values rounded once, outputs and gradients against
float64 torch on the same bfloat16 values, masks (broadcast bool, float), GQA, causal, odd sizes, the decoder step's
training call."""
import pytest
import torch
import torch.nn.functional as F

import seqfast
from seqfast import _ext, _rules

C = _ext.module()
BF16 = torch.bfloat16
sdpa = seqfast.functional.scaled_dot_product_attention

pytestmark = [pytest.mark.skipif(C is None or not C.sdpa_bf16_upcasts(),
                                 reason="bfloat16 SDPA computes in float32 where the own float32 blocks run (not AMX)"),
              pytest.mark.usefixtures("no_rules")]


def _bf16(*shape, grad=False):
    return torch.randn(*shape).to(BF16).requires_grad_(grad)


def _want(q, k, v, mask=None, **kw):
    """torch's SDPA in float64 on the same bfloat16 values."""
    mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask, **kw)


# (q shape, kv heads, key length, value dim): odd lengths and head dims, one kv head per two query heads (GQA)
SHAPES = [((2, 2, 5, 8), 2, 7, 5), ((1, 4, 19, 16), 2, 23, 16), ((1, 1, 33, 12), 1, 33, 12), ((3, 2, 2, 64), 2, 9, 64)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,hk,S,Dv", SHAPES)
def test_forward_is_the_float32_op_rounded_once(shape, hk, S, Dv, causal):
    torch.manual_seed(0)
    N, H, L, D = shape
    q, k, v = _bf16(*shape), _bf16(N, hk, S, D), _bf16(N, hk, S, Dv)
    gqa = hk != H
    with torch.no_grad():
        got = sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)
        ref32 = sdpa(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=gqa)
    assert got.dtype == BF16 and got.shape == (N, H, L, Dv)
    assert torch.equal(got, ref32.to(BF16))
    want = _want(q, k, v, is_causal=causal, enable_gqa=gqa)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,hk,S,Dv", SHAPES)
def test_gradients_against_float64_torch(shape, hk, S, Dv, causal):
    torch.manual_seed(1)
    N, H, L, D = shape
    q, k, v = _bf16(*shape, grad=True), _bf16(N, hk, S, D, grad=True), _bf16(N, hk, S, Dv, grad=True)
    gqa = hk != H
    out = sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)
    g = torch.randn(out.shape).to(BF16)
    got = torch.autograd.grad(out, (q, k, v), g)
    assert all(t.dtype == BF16 for t in got)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal, enable_gqa=gqa)
    want = torch.autograd.grad(out64, (q64, k64, v64), g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2)
    # the op's backward is the float32 backward on the same values (out as the forward rounded it), rounded once
    qd, kd, vd = (t.detach() for t in (q, k, v))
    o, lse = C.sdpa_forward(qd, kd, vd, None, causal, D ** -0.5)
    got_op = C.sdpa_backward(g, qd, kd, vd, o, lse, None, causal, D ** -0.5)
    ref = C.sdpa_backward(g.float(), qd.float(), kd.float(), vd.float(), o.float(), lse, None, causal, D ** -0.5)
    for a, b in zip(got_op, ref):
        assert a.dtype == BF16 and torch.equal(a, b.to(BF16))


@pytest.mark.parametrize("mask_kind", ["bool_broadcast", "float", "bool_with_empty_row"])
def test_masks(mask_kind):
    torch.manual_seed(2)
    q, k, v = _bf16(2, 3, 6, 8, grad=True), _bf16(2, 3, 9, 8, grad=True), _bf16(2, 3, 9, 4, grad=True)
    if mask_kind == "float":
        mask = _bf16(2, 1, 6, 9)
    else:
        mask = torch.rand(6, 9) > 0.3
        mask[:, 0] = True
        if mask_kind == "bool_with_empty_row":
            mask[2] = False  # torch gives NaN there (all keys masked); compared as such
    out = sdpa(q, k, v, attn_mask=mask)
    want = _want(q, k, v, mask)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2, equal_nan=True)
    if mask_kind == "bool_with_empty_row":
        return
    g = torch.randn(out.shape).to(BF16)
    got = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(_want(q64, k64, v64, mask), (q64, k64, v64), g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2)


def test_broadcast_bias_into_the_op():
    """The op's bias arrives expanded (stride 0 over batch and heads): its float32 copy keeps the broadcast, and the
    result equals the same bias materialised."""
    torch.manual_seed(3)
    q, k, v = _bf16(3, 4, 5, 8), _bf16(3, 4, 7, 8), _bf16(3, 4, 7, 8)
    base = _bf16(1, 1, 5, 7)
    expanded = base.expand(3, 4, 5, 7)
    out_e, lse_e = C.sdpa_forward(q, k, v, expanded, False, 0.35)
    out_m, lse_m = C.sdpa_forward(q, k, v, expanded.contiguous(), False, 0.35)
    assert torch.equal(out_e, out_m) and torch.equal(lse_e, lse_m)
    g = _bf16(3, 4, 5, 8)
    grads_e = C.sdpa_backward(g, q, k, v, out_e, lse_e, expanded, False, 0.35)
    grads_m = C.sdpa_backward(g, q, k, v, out_m, lse_m, expanded.contiguous(), False, 0.35)
    for a, b in zip(grads_e, grads_m):
        assert torch.equal(a, b)


def test_decoder_step_training():
    """One query row: the forward streams bfloat16 (the decode kernel), the backward runs on float32 copies."""
    torch.manual_seed(4)
    q, k, v = _bf16(4, 8, 1, 64, grad=True), _bf16(4, 8, 37, 64, grad=True), _bf16(4, 8, 37, 64, grad=True)
    out = sdpa(q, k, v)
    g = torch.randn(out.shape).to(BF16)
    got = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = F.scaled_dot_product_attention(q64, k64, v64)
    torch.testing.assert_close(out.double(), out64, rtol=2e-2, atol=2e-2)
    want = torch.autograd.grad(out64, (q64, k64, v64), g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("mask_dtype", [None, torch.bool, BF16, torch.float32])
def test_upcast_calls_reach_the_op_without_python_copies(monkeypatch, mask_dtype):
    """A call that seqfast._rules computes in float32 (sdpa_upcasts_bfloat16) goes to the op with its bfloat16 tensors
    (the op makes the copies), except with a float32 mask, which keeps its precision on Python's float32 copies."""
    from seqfast.functional import _attention
    seen = []
    inner = _attention.scaled_dot_product_attention
    monkeypatch.setattr(_attention, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(a[0].dtype) or inner(*a, **kw))
    monkeypatch.setattr(_rules, "sdpa_upcasts_bfloat16", lambda *a: True)
    torch.manual_seed(5)
    q, k, v = _bf16(2, 3, 8, 16), _bf16(2, 3, 11, 16), _bf16(2, 3, 11, 16)
    mask = None if mask_dtype is None else (torch.rand(8, 11) > 0.3 if mask_dtype is torch.bool
                                            else torch.randn(2, 1, 8, 11).to(mask_dtype))
    if mask is not None and mask_dtype is torch.bool:
        mask[:, 0] = True
    with torch.no_grad():
        got = inner(q, k, v, attn_mask=mask)
        want = inner(q.float(), k.float(), v.float(), attn_mask=None if mask is None else (
            mask if mask_dtype in (torch.bool, torch.float32) else mask.float()))
    assert seen == ([torch.float32] if mask_dtype is torch.float32 else [])  # Python's copies: float32 masks only
    assert got.dtype == BF16 and torch.equal(got, want.to(BF16))
