"""The C++ kernels have AVX-512 paths (own GEMM, fused LSTM step, attention blocks) and the paths a CPU without
AVX-512 takes (MKL GEMMs, AVX2 loops). Whatever this machine runs by default, this forces the second by an explicit
seqfast._C.set_config() call and checks module-level parity with torch, so both stay tested on an AVX-512 machine."""
import pytest
import torch
import torch.nn.functional as F

import seqfast
from conftest import cpp_config
from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None, reason="seqfast._C not built")


@pytest.fixture
def portable_paths():
    with cpp_config(own_gemm=False, avx512_attention=False):
        yield


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_non_avx512_rnn_paths_match_torch(portable_paths, kind):
    assert not _C.own_gemm_available()
    ref = getattr(torch.nn, kind)(40, 48, bidirectional=True).double()
    ours = getattr(seqfast.nn, kind)(40, 48, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, 12, 40)
    xs, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    with seqfast.use_backend("cpp"):
        out = ours(xs)[0]
    ref_out = ref(xr)[0]
    _close(out, ref_out)
    g = torch.randn_like(ref_out)
    out.backward(g.float())
    ref_out.backward(g)
    _close(xs.grad, xr.grad)
    for p, pr in zip(ours.parameters(), ref.parameters()):
        _close(p.grad, pr.grad)
    with torch.no_grad(), seqfast.use_backend("cpp"):
        _close(ours(x)[0], ref_out.detach())


def test_non_avx512_attention_paths_match_torch(portable_paths):
    q, k, v = (torch.randn(1, 2, 130, 16, requires_grad=True) for _ in range(3))
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    with seqfast.use_backend("cpp"):
        out = seqfast.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
    _close(out, ref)
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    for a, b in ((q, qr), (k, kr), (v, vr)):
        _close(a.grad, b.grad, 2e-5)
