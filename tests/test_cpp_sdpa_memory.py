"""SDPA backward with fewer (batch x kv-head) pairs than threads splits the key blocks over the team; its extra dQ
memory must not grow with the thread count (before: one float32 dQ copy per thread). Measured as the peak RSS of a
fresh process, so the kernel's own allocations count whatever allocator they use."""
import os
import subprocess
import sys
import textwrap

import pytest

import seqfast
from seqfast import _ext

pytestmark = pytest.mark.skipif(_ext.module() is None, reason="seqfast._C not built")

SCRIPT = textwrap.dedent("""
    import resource, torch
    import seqfast
from seqfast import _ext
    _C = _ext.module()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 2048, 256) for _ in range(3))
    out, lse = _C.sdpa_forward(q, k, v, None, True, 0.0625)
    g = torch.randn_like(out)
    torch.set_num_threads(1)
    _C.sdpa_backward(g, q, k, v, out, lse, None, True, 0.0625)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.set_num_threads(16)
    _C.sdpa_backward(g, q, k, v, out, lse, None, True, 0.0625)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
""")


def test_backward_extra_memory_does_not_grow_with_threads(tmp_path):
    # the child imports the seqfast this process imported (not whatever the working directory holds)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(seqfast.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_parent, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0, r.stderr
    grown_kib = int(r.stdout.strip().splitlines()[-1])
    dq_kib = 2048 * 256 * 4 // 1024  # one float32 dQ: 2 MiB
    assert grown_kib < 2 * dq_kib, f"peak RSS grew by {grown_kib} KiB with 16 threads"
