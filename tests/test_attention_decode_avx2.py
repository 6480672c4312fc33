"""The AVX2 decoder step (csrc/attention/attention_decode_avx2.cpp) against torch's SDPA in float64.

On a CPU with AVX2 + FMA (AVX-512 ones included), a float32 or bfloat16 attention call with one query row per
head (the seq2seq decoder step) runs this kernel. The shapes put key counts off its 8-key blocks (1, 5, 9, 300),
head dims off the 8-float vectors (13, 130) and value dims off its 64-column passes (70, 200), GQA groups of 3 query
heads per kv head, and every mask form: none, a bool key-padding mask with a fully masked head, an additive float
mask broadcast over heads (stride 0), causal (top-left: the one query sees key 0 only). The log-sum-exp it returns is
what the backward reads, so training gradients are compared too. Each case also runs with the kernel switched off
(config avx2_decode=False: the generic row loops), which must agree.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import seqfast
from conftest import cpp_config
from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None or not _C.has_avx2(), reason="the AVX2 decoder step runs on CPUs with AVX2 + FMA")

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(params=[True, False], ids=["avx2_decode", "generic_rows"])
def kernel_on(request):
    with cpp_config(avx2_decode=request.param):
        yield request.param


def _inputs(N, Hq, Hk, S, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, Hq, 1, D, generator=g).to(dtype)
    k = torch.randn(N, Hk, S, D, generator=g).to(dtype)
    v = torch.randn(N, Hk, S, Dv, generator=g).to(dtype)
    return q, k, v


def _mask(kind, N, Hq, S, dtype):
    g = torch.Generator().manual_seed(1)
    if kind == "none":
        return None
    if kind == "key_padding":  # [N, Hq, 1, S] bool; head (0, 0) sees no key at all
        keep = torch.rand(N, Hq, 1, S, generator=g) > 0.3
        keep[..., 0] = True
        keep[0, 0] = False
        return keep
    if kind == "additive_broadcast":  # [N, 1, 1, S] float, expanded over the heads (stride 0)
        m = torch.randn(N, 1, 1, S, generator=g).to(dtype)
        m[..., S // 2:] = float("-inf") if S > 1 else 0.0
        return m.expand(N, Hq, 1, S)
    raise ValueError(kind)


def _reference(q, k, v, mask, causal, scale, gqa):
    """torch's SDPA in float64 on the same (rounded) values; a fully masked head gives 0 (seqfast's contract)."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    m64 = None if mask is None or mask.dtype == torch.bool else mask.double()
    out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask if m64 is None else m64, is_causal=causal,
                                         scale=scale, enable_gqa=gqa)
    return torch.nan_to_num(out, nan=0.0) if mask is not None and mask.dtype == torch.bool else out


SHAPES = {  # N, Hq, Hk, S, D, Dv
    "one_key": (2, 2, 2, 1, 16, 16),
    "keys5_d13": (2, 2, 2, 5, 13, 13),
    "keys9_dv70": (3, 2, 2, 9, 16, 70),
    "keys300_d64": (2, 3, 3, 300, 64, 64),
    "gqa3_d130_dv200": (2, 6, 2, 37, 130, 200),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "additive_broadcast"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decoder_step_matches_torch(shape, mask_kind, dtype, kernel_on, threads):
    N, Hq, Hk, S, D, Dv = SHAPES[shape]
    q, k, v = _inputs(N, Hq, Hk, S, D, Dv, dtype)
    mask = _mask(mask_kind, N, Hq, S, dtype)
    gqa = Hq != Hk
    with seqfast.use_backend("cpp"):
        out = seqfast.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    ref = _reference(q, k, v, mask, False, None, gqa)
    assert out.dtype == dtype and out.shape == (N, Hq, 1, Dv)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decoder_step_causal_and_scale(dtype, kernel_on):
    q, k, v = _inputs(2, 3, 3, 11, 20, 24, dtype)
    with seqfast.use_backend("cpp"):
        causal = seqfast.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        scaled = seqfast.functional.scaled_dot_product_attention(q, k, v, scale=0.37)
    torch.testing.assert_close(causal.double(), _reference(q, k, v, None, True, None, False), **TOL[dtype])
    torch.testing.assert_close(scaled.double(), _reference(q, k, v, None, False, 0.37, False), **TOL[dtype])


@pytest.mark.parametrize("S", [1, 8, 21])
def test_decoder_step_log_sum_exp(S, kernel_on):
    """The lse the forward returns (read by the backward): float32 logsumexp of the scaled scores plus the mask; a
    head with every key masked gives -inf and output 0."""
    q, k, v = _inputs(2, 2, 2, S, 16, 16, torch.float32)
    mask = torch.zeros(2, 2, 1, S)
    mask[1, 1] = float("-inf")
    out, lse = _C.sdpa_forward(q, k, v, mask, False, 0.25)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.25 + mask.double()
    expected = torch.logsumexp(scores, -1)
    torch.testing.assert_close(lse[0], expected[0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[1, 0], expected[1, 0].float(), rtol=1e-5, atol=1e-5)
    assert lse[1, 1].item() == -math.inf
    assert torch.equal(out[1, 1], torch.zeros_like(out[1, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decoder_step_nan_reaches_output(dtype, kernel_on):
    """A NaN in one key row makes that head's output NaN (as torch's), and only that head's."""
    q, k, v = _inputs(2, 2, 2, 19, 16, 16, dtype)
    k[1, 0, 13, 5] = float("nan")
    with seqfast.use_backend("cpp"):
        out = seqfast.functional.scaled_dot_product_attention(q, k, v)
    assert torch.isnan(out[1, 0]).all()
    finite = torch.ones(2, 2, dtype=torch.bool)
    finite[1, 0] = False
    assert torch.isfinite(out[finite]).all()
    ref = _reference(q, k, v, None, False, None, False)
    torch.testing.assert_close(out[finite].double(), ref[finite], **TOL[dtype])


def test_decoder_step_strided_inputs(kernel_on):
    """Rows with a stride above the head dim (a slice of a wider projection) and a query from a transposed view."""
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(2, 2, 23, 2 * 40, generator=g)
    k, v = kv[..., :40], kv[..., 40:]
    q = torch.randn(2, 1, 2, 40, generator=g).transpose(1, 2)
    with seqfast.use_backend("cpp"):
        out = seqfast.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out.double(), _reference(q, k, v, None, False, None, False), **TOL[torch.float32])


@pytest.mark.parametrize("mask_kind", ["none", "key_padding"])
def test_decoder_step_training_gradients(mask_kind, kernel_on):
    """Gradients through the decoder step (the backward reads the forward's lse) against torch in float64."""
    N, Hq, Hk, S, D, Dv = 2, 4, 2, 29, 24, 40
    q, k, v = _inputs(N, Hq, Hk, S, D, Dv, torch.float32)
    mask = _mask(mask_kind, N, Hq, S, torch.float32)
    if mask is not None:
        mask[0, 0] = True  # keep every head reachable: a fully masked head's gradient convention differs
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    with seqfast.use_backend("cpp"):
        out = seqfast.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, enable_gqa=True)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    for ours, theirs in ((qs, qr), (ks, kr), (vs, vr)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-4)


def test_decoder_step_larger_than_the_l3(kernel_on):
    # K and V of more bytes than the L3 the kernels read (cpu::l3_cache_bytes: read from memory, the kernel
    # prefetches rows ahead, and each head's first V rows during its softmax), with a key count off the 8-key blocks
    # and the 32-row look-ahead
    l3 = _C.cache_bytes()["l3"]
    S, D = 1000 + 13, 64
    N = l3 // (2 * 4 * S * D * 4) + 1  # 4 kv heads, float32 K and V
    q, k, v = _inputs(N, 4, 4, S, D, D, torch.float32, seed=5)
    assert 2 * k.numel() * 4 > l3
    with torch.no_grad():
        out = seqfast.functional.scaled_dot_product_attention(q, k, v)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
