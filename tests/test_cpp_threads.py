"""Threads in seqfast._C: teams are sized by the CPUs the process may use, so results do not depend on
torch.set_num_threads (1, 2, 3 and 8 on any machine) nor on two Python threads running kernels at once; an error
inside a parallel region reaches Python as an exception (never std::terminate)."""
import threading

import pytest
import torch

from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None, reason="seqfast._C not built")

THREADS = [1, 2, 3, 8]


@pytest.fixture
def torch_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _lstm_step(H=128, T=64, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T * B, 32, generator=g)
    bs = torch.full((T,), B, dtype=torch.long)
    h0, c0 = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    w_ih, w_hh = torch.randn(4 * H, 32, generator=g) * 0.1, torch.randn(4 * H, H, generator=g) * 0.1
    b = torch.randn(4 * H, generator=g) * 0.1
    out, hn, cn, gates, cs = _C.lstm_layer_forward(x, bs, h0, c0, w_ih, w_hh, b, b, False)
    go = torch.randn(out.shape, generator=g)
    grads = _C.lstm_layer_backward(go, torch.zeros_like(hn), torch.zeros_like(cn), x, bs, h0, c0, w_ih, w_hh, out,
                                   gates, cs, False)
    return (out, hn, cn) + tuple(grads)


def _gru_step(H=96, T=20, B=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T * B, 16, generator=g)
    bs = torch.full((T,), B, dtype=torch.long)
    h0 = torch.randn(B, H, generator=g)
    w_ih, w_hh = torch.randn(3 * H, 16, generator=g) * 0.1, torch.randn(3 * H, H, generator=g) * 0.1
    out, hn, ws = _C.gru_layer_forward(x, bs, h0, w_ih, w_hh, None, None, True)
    grads = _C.gru_layer_backward(torch.randn(out.shape, generator=g), torch.zeros_like(hn), x, bs, h0, w_ih, w_hh,
                                  out, ws, True)
    return (out, hn) + tuple(grads)


def _sdpa_step(seed=0):
    g = torch.Generator().manual_seed(seed)
    # one (batch, kv head) and several key blocks: the backward splits key blocks over the team
    q, k, v = (torch.randn(1, 1, 300, 32, generator=g) for _ in range(3))
    out, lse = _C.sdpa_forward(q, k, v, None, True, 0.2)
    return (out, lse) + tuple(_C.sdpa_backward(torch.randn(out.shape, generator=g), q, k, v, out, lse, None, True, 0.2))


CASES = {"lstm": _lstm_step, "gru": _gru_step, "sdpa": _sdpa_step}


@pytest.mark.parametrize("case", CASES)
def test_results_do_not_depend_on_the_thread_count(torch_threads, case):
    results = []
    for n in THREADS:
        torch.set_num_threads(n)
        results.append(CASES[case]())
    # the same values up to float32 rounding of the sums: a product split over another number of threads may add its
    # terms in another order, and a weight gradient's sum of 64 terms of magnitude ~10 can cancel to ~0.01 (so the
    # absolute tolerance follows the tensor's scale); a race or a lost share would be off by whole terms
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, a.abs().max().item()))


def test_two_python_threads_get_the_same_results(torch_threads):
    torch.set_num_threads(4)  # more threads than this machine may have: teams must size themselves
    want = {name: f(seed=1) for name, f in CASES.items()}
    got, errors = {}, []

    def run(name):
        try:
            for _ in range(3):
                got[name] = CASES[name](seed=1)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("lstm", "sdpa", "gru")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and all(not t.is_alive() for t in threads)
    for name in got:
        for a, b in zip(want[name], got[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("team", [False, True], ids=["parallel_for", "team_with_barrier"])
def test_an_error_inside_a_parallel_region_becomes_a_python_exception(torch_threads, team):
    torch.set_num_threads(2)
    if _C.usable_cpus() < 2 and not team:
        pytest.skip("parallel_for runs inline on one CPU")
    with pytest.raises(RuntimeError, match="test error"):
        _C._raise_in_parallel_region(team)
    # the process and the kernels still work afterwards
    _lstm_step(T=4)
