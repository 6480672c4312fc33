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


# ---- the thread team's contention back-off switch (contention_backoff, SEQFAST_CPU_NO_BACKOFF): set by set_config
# and the environment; kernels give the same results with it off
def test_backoff_is_on_by_default_and_set_config_round_trips(restore_config, monkeypatch):
    monkeypatch.delenv("SEQFAST_CPU_NO_BACKOFF", raising=False)
    assert _C.reload_config()["contention_backoff"] is True
    before = _C.get_config()
    after = _C.set_config(contention_backoff=False)
    assert after["contention_backoff"] is False and _C.get_config() == after
    assert {k: v for k, v in after.items() if k != "contention_backoff"} == \
        {k: v for k, v in before.items() if k != "contention_backoff"}
    assert _C.set_config(contention_backoff=True)["contention_backoff"] is True


def test_environment_switches_backoff_off(restore_config, monkeypatch):
    monkeypatch.setenv("SEQFAST_CPU_NO_BACKOFF", "1")
    assert _C.reload_config()["contention_backoff"] is False
    monkeypatch.delenv("SEQFAST_CPU_NO_BACKOFF")
    assert _C.reload_config()["contention_backoff"] is True


def _kernels():
    """A fused LSTM sequence (forward and backward: team regions with a barrier per step) and an SDPA
    forward (parallel_for), forced multi-threaded where the machine has the cores."""
    torch.manual_seed(0)
    B, T, I, H = 12, 6, 10, 48
    bs = torch.full((T,), B, dtype=torch.int64)
    x, h0, c0 = torch.randn(B * T, I), torch.randn(B, H), torch.randn(B, H)
    w_ih, w_hh, b = torch.randn(4 * H, I) * 0.2, torch.randn(4 * H, H) * 0.2, torch.randn(4 * H) * 0.1
    out, hn, cn, gates, cs = _C.lstm_layer_forward(x, bs, h0, c0, w_ih, w_hh, b, b, False)
    grads = _C.lstm_layer_backward(torch.ones_like(out), torch.zeros_like(hn), torch.zeros_like(cn), x, bs, h0, c0,
                                   w_ih, w_hh, out, gates, cs, False)
    q, k, v = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 50, 16), torch.randn(2, 3, 50, 16)
    o, lse = _C.sdpa_forward(q, k, v, None, True, 0.25)
    return [out, hn, cn, *grads, o, lse]


def test_kernels_give_the_same_results_with_backoff_off(restore_config):
    _C.set_config(par_min_work=1)
    _C.set_config(contention_backoff=True)
    want = _kernels()
    _C.set_config(contention_backoff=False)
    for _ in range(2):  # the second run starts from the state the first left
        for got, ref in zip(_kernels(), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="test error"):  # errors still surface from a full team
        _C._raise_in_parallel_region(team=True)
