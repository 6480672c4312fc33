"""seqfast.functional.scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention on every
backend and dtype: outputs and the gradients of query, key and value, for masks, causal, scale, GQA, lengths."""
import pytest
import torch
import torch.nn.functional as F

import seqfast
from conftest import BACKEND_DTYPES, TOL, backend_device

sdpa = seqfast.functional.scaled_dot_product_attention

# name -> (q shape, k shape, v shape, kwargs); masks are built in _mask
CASES = {
    "basic": ((2, 3, 5, 16), (2, 3, 7, 16), (2, 3, 7, 16), {}),
    "causal_square": ((1, 2, 33, 16), (1, 2, 33, 16), (1, 2, 33, 16), {"is_causal": True}),
    "causal_lq_gt_lk": ((1, 2, 9, 16), (1, 2, 5, 16), (1, 2, 5, 8), {"is_causal": True}),
    "causal_lq_lt_lk": ((1, 2, 5, 16), (1, 2, 19, 16), (1, 2, 19, 16), {"is_causal": True}),
    "decoder_step": ((3, 2, 1, 16), (3, 2, 37, 16), (3, 2, 37, 16), {"mask": "key_padding"}),
    # query length 1 takes the decode kernels: GQA heads sharing keys, head dims off the 16-float vectors, value
    # dim over one 64-column pass, a broadcast float mask, a batch whose keys are all masked, causal (key 0 only)
    "decoder_step_gqa_float_mask": ((2, 4, 1, 20), (2, 2, 33, 20), (2, 2, 33, 70),
                                    {"mask": "float", "enable_gqa": True}),
    "decoder_step_all_masked": ((2, 2, 1, 16), (2, 2, 17, 16), (2, 2, 17, 16), {"mask": "key_padding_all"}),
    "decoder_step_causal": ((2, 2, 1, 16), (2, 2, 9, 16), (2, 2, 9, 16), {"is_causal": True}),
    # its backward's per-key pass over several key blocks of one head (split between tasks, dq summed), and a scale
    "decoder_step_long": ((1, 1, 1, 24), (1, 1, 300, 24), (1, 1, 300, 40), {"mask": "float", "scale": 0.3}),
    "decoder_step_long_gqa": ((1, 4, 1, 16), (1, 1, 270, 16), (1, 1, 270, 16),
                              {"mask": "key_padding", "enable_gqa": True}),
    "bool_mask_2d": ((2, 2, 6, 16), (2, 2, 7, 16), (2, 2, 7, 16), {"mask": "bool"}),
    "float_mask": ((2, 2, 6, 16), (2, 2, 7, 16), (2, 2, 7, 16), {"mask": "float"}),
    "mask_and_causal": ((1, 2, 7, 16), (1, 2, 7, 16), (1, 2, 7, 16), {"mask": "float", "is_causal": True}),
    "fully_masked_row": ((2, 2, 4, 16), (2, 2, 6, 16), (2, 2, 6, 16), {"mask": "row_off"}),
    "gqa": ((1, 4, 6, 16), (1, 2, 9, 16), (1, 2, 9, 16), {"enable_gqa": True}),
    "scale_and_dv": ((2, 1, 4, 32), (2, 1, 5, 32), (2, 1, 5, 24), {"scale": 0.37}),
    "no_head_dim": ((4, 16), (6, 16), (6, 16), {}),
    "extra_batch_dims": ((2, 2, 2, 3, 16), (2, 2, 2, 4, 16), (2, 2, 2, 4, 16), {"is_causal": True}),
    "length_one": ((2, 2, 1, 16), (2, 2, 1, 16), (2, 2, 1, 16), {}),
    "head_dim_80": ((1, 2, 5, 80), (1, 2, 6, 80), (1, 2, 6, 80), {}),
    # several query blocks (64) and key blocks (256) of the C++ kernels, partial last blocks
    "blocks_causal": ((1, 2, 130, 16), (1, 2, 300, 16), (1, 2, 300, 24), {"is_causal": True}),
    "blocks_float_mask": ((1, 1, 70, 16), (1, 1, 270, 16), (1, 1, 270, 16), {"mask": "float"}),
    "blocks_key_padding": ((2, 1, 70, 16), (2, 1, 270, 16), (2, 1, 270, 16), {"mask": "key_padding"}),
}


def _mask(kind, q, k):
    L, S = q.shape[-2], k.shape[-2]
    if kind == "bool":
        m = torch.rand(L, S) > 0.4
        m[:, 0] = True
        return m
    if kind == "float":
        return torch.randn(L, S)
    if kind == "float_transposed":  # a mask view whose keys are strided (stride 1 along queries)
        return torch.randn(S, L).t()
    if kind == "key_padding":  # [N, 1, 1, S], True = attend
        m = torch.ones(q.shape[0], 1, 1, S, dtype=torch.bool)
        m[0, ..., S // 2:] = False
        return m
    if kind == "key_padding_all":  # batch 0 attends to nothing
        m = torch.ones(q.shape[0], 1, 1, S, dtype=torch.bool)
        m[0] = False
        return m
    if kind == "row_off":
        m = torch.ones(L, S, dtype=torch.bool)
        m[1] = False
        return m
    return None


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES + [("cpp", torch.bfloat16)], ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_parity(case, backend, dtype):
    qs, ks, vs, kw = CASES[case]
    kw = dict(kw)
    device = backend_device(backend)
    q64, k64, v64 = (torch.randn(s, dtype=torch.float64) for s in (qs, ks, vs))
    mask = _mask(kw.pop("mask", None), q64, k64)
    # the reference sees exactly the rounded values the backend sees
    q, k, v = (t.to(dtype).to(device).requires_grad_(True) for t in (q64, k64, v64))
    qr, kr, vr = (t.detach().cpu().double().requires_grad_(True) for t in (q, k, v))
    m = None if mask is None else (mask if mask.dtype == torch.bool else mask.to(dtype)).to(device)
    mr = None if mask is None else (mask if mask.dtype == torch.bool else m.double().cpu())
    with seqfast.use_backend(backend):
        out = sdpa(q, k, v, attn_mask=m, **kw)
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mr, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=rtol, atol=atol)
    g = torch.randn_like(ref)
    out.backward(g.to(device=device, dtype=dtype))
    ref.backward(g)
    for name, a, b in (("dq", q, qr), ("dk", k, kr), ("dv", v, vr)):
        assert torch.isfinite(a.grad).all(), name
        torch.testing.assert_close(a.grad.double().cpu(), b.grad, rtol=rtol * 2, atol=atol * 2,
                                   msg=lambda msg: f"{name}: {msg}")


def test_fully_masked_row_is_zero():
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    m = torch.ones(3, 4, dtype=torch.bool)
    m[1] = False
    for backend in ("reference", "cpp"):
        with seqfast.use_backend(backend):
            out = sdpa(q, k, v, attn_mask=m)
        assert torch.equal(out[0, 0, 1], torch.zeros(8))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradcheck_float64(backend):
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 5, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(4, 5, dtype=torch.float64)
    with seqfast.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda q, k, v: sdpa(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True), (q, k, v))


def test_dropout_statistics_and_backward_mask():
    """dropout_p > 0: the expectation is kept (1/(1-p) scaling), about p of the weights drop, and the backward uses
    the forward's mask (gradient of sum(out * g) equals the one recomputed with the same mask)."""
    torch.manual_seed(0)
    p = 0.3
    q = torch.randn(1, 1, 64, 16)
    k = torch.randn(1, 1, 64, 16)
    v = torch.eye(64).reshape(1, 1, 64, 64)  # out = dropped, rescaled attention weights
    outs = torch.stack([sdpa(q, k, v, dropout_p=p) for _ in range(50)])
    weights = torch.softmax(q @ k.transpose(-1, -2) / 4, -1)
    dropped = (outs == 0).float().mean().item()
    assert abs(dropped - p) < 0.02
    torch.testing.assert_close(outs.mean(0), weights, atol=0.05, rtol=0)
    # the backward uses the forward's mask: with v = I, out is the dropped weights P and d sum(out) / dv = P^T 1,
    # i.e. every column of v's gradient is the column sums of that same P
    vv = v.clone().requires_grad_(True)
    out = sdpa(q, k, vv, dropout_p=p)
    out.sum().backward()
    column_sums = out[0, 0].detach().sum(0)
    torch.testing.assert_close(vv.grad[0, 0], column_sums[:, None].expand(64, 64))


# The C++ float32 forward's block structure at sizes the interpreter-backed parity cases above cannot afford: several
# 64-query tasks and 256-key blocks, the causal diagonal in every position within a key block (query blocks start at
# offsets 0, 64, 128 and 192 of it), head and value dims off the 16-float vectors and the 6-column register tiles, a
# partial last query block, masks read per key (float [L, S]) and broadcast over queries ([N, 1, 1, S]).
@pytest.mark.parametrize("lq,lk,D,Dv,causal,mask", [
    (600, 600, 72, 40, True, None),
    (520, 700, 64, 64, True, None),
    (300, 530, 128, 17, False, "float"),
    (100, 270, 24, 16, False, "float_transposed"),
    (200, 530, 33, 130, False, "key_padding"),
    (130, 300, 16, 24, False, "row_off"),
], ids=lambda v: str(v))
def test_cpp_float32_blocks(lq, lk, D, Dv, causal, mask):
    torch.manual_seed(0)
    q64, k64, v64 = (torch.randn(2, 2, n, d, dtype=torch.float64) for n, d in ((lq, D), (lk, D), (lk, Dv)))
    m = _mask(mask, q64, k64)
    q, k, v = (t.float().requires_grad_(True) for t in (q64, k64, v64))
    qr, kr, vr = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    mf = None if m is None else (m if m.dtype == torch.bool else m.float())
    mr = None if m is None else (m if m.dtype == torch.bool else mf.double())
    with seqfast.use_backend("cpp"):
        out = sdpa(q, k, v, attn_mask=mf, is_causal=causal)
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mr, is_causal=causal)
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol)
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    for name, a, b in (("dq", q, qr), ("dk", k, kr), ("dv", v, vr)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=rtol * 2, atol=atol * 2,
                                   msg=lambda msg: f"{name}: {msg}")


@pytest.mark.parametrize("kwargs,exc", [
    (dict(query=torch.randn(2, 4, 8).double()), RuntimeError),              # dtype mismatch
    (dict(dropout_p=1.5), RuntimeError),                                     # bad probability
    (dict(attn_mask=torch.ones(4, 5, dtype=torch.int64)), RuntimeError),     # integer mask
    (dict(attn_mask=torch.randn(3, 4)), RuntimeError),                       # mask does not broadcast
    (dict(key=torch.randn(2, 5, 7)), RuntimeError),                          # embedding size mismatch
])
def test_errors_match_torch(kwargs, exc):
    args = dict(query=torch.randn(2, 4, 8), key=torch.randn(2, 5, 8), value=torch.randn(2, 5, 8))
    args.update(kwargs)
    with pytest.raises(exc):
        F.scaled_dot_product_attention(**args)
    with pytest.raises(exc):
        sdpa(**args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool])
def test_mask_dtypes_as_torch_accepts_them(dtype, mask_dtype):
    """torch's rule: a bool mask, a float32 one whatever the query's dtype, or one of the query's dtype; any other
    raises torch's error, word for word. An accepted float mask is added to the scores (against float64 math: torch
    2.13's own op gets a float32 mask under a float64 query wrong from 16 query rows, so it is not the oracle)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 8).to(dtype) for _ in range(3))
    mask = torch.rand(20, 20) > 0.3 if mask_dtype is torch.bool else torch.randn(20, 20).to(mask_dtype)
    if mask_dtype not in (torch.bool, torch.float32, dtype):
        with pytest.raises(RuntimeError) as theirs:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with pytest.raises(RuntimeError) as ours:
            sdpa(q, k, v, attn_mask=mask)
        assert str(ours.value) == str(theirs.value)
        return
    with torch.no_grad():
        got = sdpa(q, k, v, attn_mask=mask)
    additive = mask.double() if mask_dtype is not torch.bool else torch.zeros(20, 20, dtype=torch.float64).masked_fill(
        ~mask, float("-inf"))
    want = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8 ** 0.5 + additive, -1) @ v.double()
    assert got.dtype == dtype
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.double(), want, **tol)
