"""SDPA backward with fewer (batch x kv-head) pairs than threads splits the key blocks over the team; its extra dQ
memory must not grow with the thread count (before: one float32 dQ copy per thread). Measured as the peak RSS
(VmHWM, reset just before the call) of a fresh process, so the kernel's allocations count whatever allocator they use."""
import os
import subprocess
import sys
import textwrap

import pytest

import seqfast
from seqfast import _ext

pytestmark = [pytest.mark.skipif(_ext.module() is None, reason="seqfast._C not built"),
              pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's clear_refs")]

SCRIPT = textwrap.dedent("""
    import torch
    from seqfast import _ext

    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    _C = _ext.module()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 2048, 256) for _ in range(3))
    out, lse = _C.sdpa_forward(q, k, v, None, True, 0.0625)
    g = torch.randn_like(out)
    def peak_growth(threads):
        torch.set_num_threads(threads)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        before = status_kib("VmRSS")
        _C.sdpa_backward(g, q, k, v, out, lse, None, True, 0.0625)
        return status_kib("VmHWM") - before

    peak_growth(2)  # warm-up: allocator state
    print(peak_growth(2), peak_growth(16))
""")


def test_backward_extra_memory_does_not_grow_with_threads(tmp_path):
    # the child imports the seqfast this process imported (not whatever the working directory holds)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(seqfast.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_parent, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0, r.stderr
    at_2, at_16 = map(int, r.stdout.strip().splitlines()[-1].split())
    dq_kib = 2048 * 256 * 4 // 1024  # one float32 dQ: 2 MiB
    # the outputs (dq, dk, dv) are the same at both thread counts; only per-thread copies would differ
    assert at_16 - at_2 < 2 * dq_kib, f"peak RSS grew by {at_2} KiB at 2 threads, {at_16} KiB at 16"
