"""The AVX2 float32 attention blocks (csrc/attention/attention_avx2.cpp, attention_avx2_bwd.cpp) against torch's SDPA
in float64.

On a CPU with AVX2 + FMA and without the AVX-512 kernels, a float32 attention forward with two or more query rows
runs the forward block (64-query blocks, 256-key blocks, queries along the vector lanes), and every float32 backward
the backward block (64-query blocks against 128-key blocks). The shapes put query counts off
its 8-lane vectors and 64-row blocks (2, 7, 65, 130), key counts across its key blocks (1, 9, 257, 300: the online
softmax's rescale), head dims and value dims off the vectors (13, 24, 70, 96), GQA, causal masking with fewer or
more keys than queries (top-left, as torch), bool masks with fully masked rows (also rows masked through the whole
first key block only), additive masks varying by query or broadcast over queries (stride 0), and a NaN. The log-sum-
exp it returns is what the backward reads. The backward's cases: GQA, masks (a fully masked row gets zero
gradients), causal blocks with fewer than 64 queries, key ranges split across tasks (batch x heads below the thread
count), a NaN, and query blocks below 8 rows (one query row: the decoder step's backward), which keep the BLAS
blocks. Every case also runs with the kernels switched off
(config avx2_attention=False: the BLAS block path), which must agree.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import seqfast
from conftest import cpp_config
from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(
    _C is None or not _C.has_avx2() or _C.own_gemm_available(),
    reason="the AVX2 attention block runs on CPUs with AVX2 + FMA and without the AVX-512 kernels")

TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(params=[True, False], ids=["avx2_block", "blas_blocks"])
def kernel_on(request):
    with cpp_config(avx2_attention=request.param):
        yield request.param


def _inputs(N, Hq, Hk, L, S, D, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, Hq, L, D, generator=g), torch.randn(N, Hk, S, D, generator=g),
            torch.randn(N, Hk, S, Dv, generator=g))


def _reference(q, k, v, mask=None, causal=False, scale=None, gqa=False):
    """torch's SDPA in float64; a fully masked row gives 0 (seqfast's contract, attention.h)."""
    m = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m, is_causal=causal,
                                         scale=scale, enable_gqa=gqa)
    return torch.nan_to_num(out, nan=0.0) if mask is not None and mask.dtype == torch.bool else out


SHAPES = {  # N, Hq, Hk, L, S, D, Dv
    "q2_k1": (2, 2, 2, 2, 1, 16, 16),
    "q7_k9_d13": (1, 3, 3, 7, 9, 13, 13),
    "q65_k257_dv70": (1, 2, 2, 65, 257, 32, 70),
    "q130_k300_d96_dv24": (2, 2, 2, 130, 300, 96, 24),
    "gqa_q64_k64": (1, 4, 2, 64, 64, 64, 64),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_matches_torch(shape, causal, kernel_on, threads):
    N, Hq, Hk, L, S, D, Dv = SHAPES[shape]
    q, k, v = _inputs(N, Hq, Hk, L, S, D, Dv)
    gqa = Hq != Hk
    with seqfast.use_backend("cpp"):
        out = seqfast.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    assert out.shape == (N, Hq, L, Dv) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(q, k, v, causal=causal, gqa=gqa), **TOL)


@pytest.mark.parametrize("mask_kind", ["bool", "float_per_query", "float_broadcast_queries"])
def test_forward_masks(mask_kind, kernel_on):
    N, H, L, S, D = 2, 2, 70, 300, 24
    q, k, v = _inputs(N, H, H, L, S, D, D)
    g = torch.Generator().manual_seed(5)
    if mask_kind == "bool":
        mask = torch.rand(N, H, L, S, generator=g) > 0.4
        mask[0, 0, 3] = False                 # a fully masked row: output 0
        mask[1, 1, 5, :256] = False           # masked through the whole first key block, live in the second
        mask[1, 1, 5, 256:] = True
    elif mask_kind == "float_per_query":
        mask = torch.randn(N, H, L, S, generator=g)
        mask[:, :, :, 100:150] = float("-inf")
    else:
        mask = torch.randn(N, 1, 1, S, generator=g).expand(N, H, L, S)
    with seqfast.use_backend("cpp"):
        out = seqfast.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask), **TOL)
    if mask_kind == "bool":
        assert torch.equal(out[0, 0, 3], torch.zeros(D))


def test_forward_causal_more_keys_than_queries_and_scale(kernel_on):
    """Top-left causal with Lk > Lq (query i sees keys <= i) and an explicit scale."""
    q, k, v = _inputs(1, 2, 2, 100, 333, 40, 40)
    with seqfast.use_backend("cpp"):
        out = seqfast.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(out.double(), _reference(q, k, v, causal=True, scale=0.3), **TOL)


def test_forward_log_sum_exp(kernel_on):
    """The lse the forward returns: logsumexp of the scaled, masked scores in float32; -inf on a fully masked row."""
    q, k, v = _inputs(1, 2, 2, 67, 260, 16, 16)
    mask = torch.zeros(1, 2, 67, 260)
    mask[0, 1, 66] = float("-inf")
    out, lse = _C.sdpa_forward(q, k, v, mask, False, 0.25)
    expected = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * 0.25 + mask.double(), -1)
    live = torch.ones(1, 2, 67, dtype=torch.bool)
    live[0, 1, 66] = False
    torch.testing.assert_close(lse[live], expected[live].float(), rtol=1e-5, atol=1e-5)
    assert lse[0, 1, 66].item() == -math.inf
    assert torch.equal(out[0, 1, 66], torch.zeros(16))


def test_forward_nan_reaches_only_its_rows(kernel_on):
    """A NaN in one key row makes every query row that sees it NaN (as torch), causally the later ones only."""
    q, k, v = _inputs(1, 2, 2, 80, 80, 16, 16)
    k[0, 1, 40, 3] = float("nan")
    with seqfast.use_backend("cpp"):
        out = seqfast.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.isnan(out[0, 1, 40:]).all()
    assert torch.isfinite(out[0, 1, :40]).all() and torch.isfinite(out[0, 0]).all()
    ref = _reference(q, k, v, causal=True)
    torch.testing.assert_close(out[0, 1, :40].double(), ref[0, 1, :40], **TOL)


def test_forward_strided_inputs(kernel_on):
    """q, k, v as slices of one packed projection (row stride 3 x the head dim), as MultiheadAttention makes them."""
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(1, 90, 2, 3 * 32, generator=g).transpose(1, 2)  # [N, H, L, 3D]
    q, k, v = qkv[..., :32], qkv[..., 32:64], qkv[..., 64:]
    with seqfast.use_backend("cpp"):
        out = seqfast.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out.double(), _reference(q, k, v, causal=True), **TOL)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_training_gradients(causal, kernel_on):
    """Gradients through this forward and the generic backward (which reads its lse) against torch in float64."""
    q, k, v = _inputs(1, 2, 2, 70, 270, 24, 20)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    with seqfast.use_backend("cpp"):
        out = seqfast.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
    ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    torch.testing.assert_close(out.double(), ref, **TOL)
    for ours, theirs in ((qs, qr), (ks, kr), (vs, vr)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-4)


BWD_SHAPES = {  # N, Hq, Hk, L, S, D, Dv
    "one_query": (2, 2, 2, 1, 37, 16, 16),
    "q7_k9_d13": (1, 3, 3, 7, 9, 13, 13),
    "q65_k300_dv24": (1, 2, 2, 65, 300, 32, 24),
    "gqa_q70_k150": (2, 4, 2, 70, 150, 24, 40),
}


def _grads(q, k, v, mask=None, causal=False, gqa=False, double=False):
    ts = [(t.double() if double else t.clone()).requires_grad_() for t in (q, k, v)]
    m = mask.double() if double and mask is not None and mask.dtype != torch.bool else mask
    g = torch.Generator().manual_seed(11)
    if double:
        out = F.scaled_dot_product_attention(*ts, attn_mask=m, is_causal=causal, enable_gqa=gqa)
    else:
        with seqfast.use_backend("cpp"):
            out = seqfast.functional.scaled_dot_product_attention(*ts, attn_mask=m, is_causal=causal, enable_gqa=gqa)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return [t.grad for t in ts]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", list(BWD_SHAPES))
def test_backward_matches_torch(shape, causal, kernel_on, threads):
    N, Hq, Hk, L, S, D, Dv = BWD_SHAPES[shape]
    q, k, v = _inputs(N, Hq, Hk, L, S, D, Dv, seed=4)
    gqa = Hq != Hk
    ours = _grads(q, k, v, causal=causal, gqa=gqa)
    ref = _grads(q, k, v, causal=causal, gqa=gqa, double=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask_kind", ["bool", "float_per_query"])
def test_backward_masks(mask_kind, kernel_on):
    """A bool mask with a fully masked row (torch's grads there are NaN-free zeros after nan_to_num; seqfast gives
    zeros) and an additive mask varying by query."""
    q, k, v = _inputs(1, 2, 2, 66, 140, 16, 16, seed=6)
    g = torch.Generator().manual_seed(8)
    if mask_kind == "bool":
        mask = torch.rand(1, 2, 66, 140, generator=g) > 0.3
        mask[..., 0] = True
    else:
        mask = torch.randn(1, 2, 66, 140, generator=g)
    ours = _grads(q, k, v, mask=mask)
    ref = _grads(q, k, v, mask=mask, double=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_backward_fully_masked_row_gets_zero_grads(kernel_on):
    q, k, v = _inputs(1, 1, 1, 10, 20, 8, 8, seed=9)
    mask = torch.ones(1, 1, 10, 20, dtype=torch.bool)
    mask[0, 0, 4] = False
    dq, dk, dv = _grads(q, k, v, mask=mask)
    assert torch.equal(dq[0, 0, 4], torch.zeros(8))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_backward_nan_in_keys(kernel_on):
    """A NaN key gives NaN gradients exactly where torch's are NaN (dQ = dS K reaches every row through the NaN key,
    even the causally masked ones: 0 x NaN), and the same values elsewhere."""
    q, k, v = _inputs(1, 1, 1, 40, 40, 8, 8, seed=10)
    k[0, 0, 20, 2] = float("nan")
    ours = _grads(q, k, v, causal=True)
    ref = _grads(q, k, v, causal=True, double=True)
    assert torch.isnan(ours[0]).any()
    for a, b in zip(ours, ref):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        torch.testing.assert_close(a.double().nan_to_num(), b.nan_to_num(), rtol=1e-4, atol=1e-4)
