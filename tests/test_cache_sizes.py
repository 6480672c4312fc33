"""The cache sizes the kernels' rules read (cpu::l2_cache_bytes / l3_cache_bytes): one instance of each cache, as
Linux's sysfs describes CPU 0's caches, not glibc's sysconf (which on a Zen 5 EPYC guest reported every CCD's L3
together: 384 MB for a 32 MB L3)."""
import os

import pytest

from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None, reason="the C++ extension is not built")

SYSFS = "/sys/devices/system/cpu/cpu0/cache"


def _sysfs_bytes(level):
    """The size of CPU 0's level-`level` data or unified cache from sysfs, or None."""
    if not os.path.isdir(SYSFS):
        return None
    for entry in sorted(os.listdir(SYSFS)):
        d = os.path.join(SYSFS, entry)
        try:
            with open(os.path.join(d, "level")) as f_level, open(os.path.join(d, "type")) as f_type, \
                    open(os.path.join(d, "size")) as f_size:
                lvl, kind, size = int(f_level.read()), f_type.read().strip(), f_size.read().strip()
        except (OSError, ValueError):
            continue
        if lvl == level and kind != "Instruction":
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
            return int(size.rstrip("KMG")) * scale
    return None


@pytest.mark.parametrize("level,key,lo,hi", [(2, "l2", 64 << 10, 64 << 20), (3, "l3", 1 << 20, 1 << 30)])
def test_cache_sizes_follow_sysfs(level, key, lo, hi):
    got = _C.cache_bytes()[key]
    assert lo <= got <= hi
    want = _sysfs_bytes(level)
    if want is None or not lo <= want <= hi:
        pytest.skip(f"no usable sysfs entry for the L{level} here")
    assert got == want

