"""seqfast._C's configuration (csrc/cpu/config.h): read once from SEQFAST_CPU_* at load, re-read by reload_config(),
set field by field by set_config() so tests force internal paths by a call."""
import os

import pytest
import torch

from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None, reason="seqfast._C not built")


@pytest.fixture
def restore_config():
    saved = _C.get_config()
    yield
    _C.set_config(**{k: v for k, v in saved.items()})


def test_set_config_changes_only_named_fields(restore_config):
    before = _C.get_config()
    after = _C.set_config(fused=not before["fused"], par_min_work=12345)
    assert after["fused"] is (not before["fused"]) and after["par_min_work"] == 12345
    assert {k: v for k, v in after.items() if k not in ("fused", "par_min_work")} == \
        {k: v for k, v in before.items() if k not in ("fused", "par_min_work")}
    assert _C.get_config() == after


def test_set_config_rejects_unknown_fields_and_bad_values(restore_config):
    with pytest.raises(TypeError, match="no_such_field"):
        _C.set_config(no_such_field=1)
    with pytest.raises(RuntimeError, match="small_batch"):
        _C.set_config(small_batch=99)


def test_reload_reads_the_environment(restore_config, monkeypatch):
    monkeypatch.setenv("SEQFAST_CPU_NO_OWN_GEMM", "1")
    monkeypatch.setenv("SEQFAST_CPU_PAR_MIN_WORK", "777")
    cfg = _C.reload_config()
    assert cfg["own_gemm"] is False and cfg["par_min_work"] == 777
    assert not _C.own_gemm_available()
    monkeypatch.delenv("SEQFAST_CPU_NO_OWN_GEMM")
    monkeypatch.delenv("SEQFAST_CPU_PAR_MIN_WORK")
    cfg = _C.reload_config()
    assert cfg["own_gemm"] is True and cfg["par_min_work"] == 1 << 17


def test_own_gemm_switch_keeps_results(restore_config):
    torch.manual_seed(0)
    a, b = torch.randn(300, 70), torch.randn(70, 45)
    want = (a.double() @ b.double()).float()
    for own in (True, False):
        _C.set_config(own_gemm=own)
        assert _C.own_gemm_available() == (own and _C.has_avx512())
        torch.testing.assert_close(_C.mm_f32(a, b, None), want, rtol=1e-5, atol=1e-4)


def test_usable_cpus_follow_the_affinity_mask():
    assert 1 <= _C.usable_cpus() <= len(os.sched_getaffinity(0))
