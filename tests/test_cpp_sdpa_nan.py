"""SDPA in seqfast._C (float32 / float64 / bfloat16 paths, decoder step included): NaN or Inf in q, k or a float mask
reaches the output as NaN, as torch's does, for any query length (before, query length >= 2 turned it into 0 outputs
and 0 gradients); rows whose every key is masked still give 0 with lse = -inf and 0 gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import cpp_config
from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None, reason="seqfast._C not built")

NAN, INF = float("nan"), float("inf")


@pytest.fixture(params=[True, False], ids=["avx512_on", "avx512_off"])
def avx512_attention(request):
    """The AVX-512 attention kernels on (where this CPU has them) and off: both paths see the same cases."""
    with cpp_config(avx512_attention=request.param):
        yield request.param


def _inputs(dtype, Lq, poison):
    torch.manual_seed(0)
    N, H, Lk, D = 2, 2, 7, 8
    q, k, v = torch.randn(N, H, Lq, D), torch.randn(N, H, Lk, D), torch.randn(N, H, Lk, D)
    bias = torch.randn(N, H, Lq, Lk)
    bias[1, 0, Lq - 1, :] = -INF  # one fully masked row
    where, value = poison
    if where == "q":
        q[0, 0, 0, 3] = value
    elif where == "k":
        k[1, 1, 4, 0] = value
    elif where == "k_all":  # every score of head (0, 1) is NaN, including the masked positions
        k[0, 1, :, :] = value
    elif where == "bias":
        bias[0, 1, 0, 3] = value
    return [t.to(dtype) for t in (q, k, v, bias)]


POISONS = [("q", NAN), ("k", NAN), ("k", INF), ("q", -INF), ("bias", NAN), ("k_all", NAN), ("none", 0.0)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Lq", [1, 5])
@pytest.mark.parametrize("poison", POISONS, ids=[f"{w}-{v}" for w, v in POISONS])
def test_nan_reaches_the_output_as_in_torch(avx512_attention, dtype, Lq, poison):
    if dtype == torch.bfloat16 and Lq == 1 and poison[0] == "none":
        pass
    q, k, v, bias = _inputs(dtype, Lq, poison)
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse = _C.sdpa_forward(q, k, v, bias, False, scale)
    qr, kr, vr, br = (t.double().requires_grad_() for t in (q, k, v, bias))
    want = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=br.detach(), scale=scale)
    assert torch.equal(out.isnan(), want.isnan()), (out, want)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), want.detach(), equal_nan=True, **tol)
    # the fully masked row: output 0, lse -inf (unless a NaN score reached it: then NaN, as torch's output is)
    masked = out[1, 0, -1]
    if not masked.isnan().any():
        assert torch.all(masked == 0) and lse[1, 0, -1] == -INF
    # gradients: NaN wherever torch's are NaN, equal elsewhere; the fully masked row gets 0 gradient
    g = torch.randn_like(want)
    dq, dk, dv = _C.sdpa_backward(g.to(dtype), q, k, v, out, lse, bias, False, scale)
    want.backward(g)
    for ours, ref in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert torch.equal(ours.isnan(), ref.isnan()), (ours, ref)
        torch.testing.assert_close(ours.double(), ref, equal_nan=True,
                                   **(dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 else tol))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("Lq", [1, 70])
def test_fully_masked_rows_give_zero_and_minus_inf_lse(avx512_attention, dtype, Lq):
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, Lq, 16, dtype=dtype), torch.randn(1, 2, 9, 16, dtype=dtype), \
        torch.randn(1, 2, 9, 16, dtype=dtype)
    bias = torch.zeros(1, 2, Lq, 9, dtype=dtype)
    bias[0, 1] = -INF
    out, lse = _C.sdpa_forward(q, k, v, bias, False, 0.25)
    assert torch.all(out[0, 1] == 0) and torch.all(lse[0, 1] == -INF) and torch.isfinite(lse[0, 0]).all()
    dq, dk, dv = _C.sdpa_backward(torch.randn_like(out), q, k, v, out, lse, bias, False, 0.25)
    assert torch.all(dq[0, 1] == 0) and torch.all(dk[0, 1] == 0) and torch.all(dv[0, 1] == 0)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
