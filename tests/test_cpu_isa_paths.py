"""The C++ kernels have AVX-512 paths (own GEMM, fused LSTM step, attention blocks) and the paths a CPU without
AVX-512 takes (MKL GEMMs, AVX2 loops). The suite's machine runs the first; this runs parity checks of the second in
a fresh process with SEQFAST_CPU_NO_OWN_GEMM=1 (read once per process), so both stay tested on one machine."""
import os
import subprocess
import sys
import textwrap

import pytest

from seqfast import _ext

pytestmark = pytest.mark.skipif(_ext.module() is None, reason="seqfast._C not built")

SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F, seqfast
    from seqfast import _ext
    torch.manual_seed(0)
    assert not _ext.module().own_gemm_available()
    for kind in ("LSTM", "GRU"):
        ref = getattr(torch.nn, kind)(40, 48, bidirectional=True).double()
        ours = getattr(seqfast.nn, kind)(40, 48, bidirectional=True)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(7, 12, 40)
        xs, xr = x.clone().requires_grad_(), x.double().requires_grad_()
        with seqfast.use_backend("cpp"):
            out = ours(xs)[0]
        ref_out = ref(xr)[0]
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ref_out)
        out.backward(g.float()); ref_out.backward(g)
        torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
        for p, pr in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.double(), pr.grad, rtol=1e-5, atol=1e-5)
        with torch.no_grad(), seqfast.use_backend("cpp"):
            torch.testing.assert_close(ours(x)[0].double(), ref_out.detach(), rtol=1e-5, atol=1e-5)
    q, k, v = (torch.randn(1, 2, 130, 16, requires_grad=True) for _ in range(3))
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    with seqfast.use_backend("cpp"):
        out = seqfast.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    out.backward(g.float()); ref.backward(g)
    for a, b in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=2e-5, atol=2e-5)
    print("ok")
""")


def test_non_avx512_paths_match_torch():
    env = dict(os.environ, SEQFAST_CPU_NO_OWN_GEMM="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
