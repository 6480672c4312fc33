"""Every kernel binding of seqfast._C releases the GIL: another Python thread keeps running while a long SDPA or
additive-attention call runs (before, SDPA held the GIL for the whole kernel)."""
import threading
import time

import pytest
import torch

from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None, reason="seqfast._C not built")


def _ticks_during(call):
    """Runs call() in a thread; returns how many loop iterations this thread made inside the call's first half."""
    window = {}

    def worker():
        window["t0"] = time.perf_counter()
        call()
        window["t1"] = time.perf_counter()

    stamps = []
    t = threading.Thread(target=worker)
    t.start()
    while t.is_alive():
        stamps.append(time.perf_counter())
    t.join()
    t0, t1 = window["t0"], window["t1"]
    assert t1 - t0 > 0.02, "the call was too short to tell"
    # the call's first half past a margin: the GIL may change hands around the call's start, and after a call that
    # held it, this thread runs for a switch interval (5 ms) before the worker can stamp t1
    return sum(t0 + 0.005 < s < (t0 + t1) / 2 for s in stamps)


def _sized(make, seconds=0.06, max_scale=16):
    """make(scale) -> (inputs, call): the smallest power-of-two scale whose call takes at least `seconds` on this CPU
    (a fast CPU finishes the base size in under _ticks_during's 20 ms window), or the largest scale tried."""
    scale = 1
    while True:
        inputs, call = make(scale)
        call()  # warm-up: workspaces, the team
        t0 = time.perf_counter()
        call()
        if time.perf_counter() - t0 >= seconds or scale >= max_scale:
            return inputs, call
        scale *= 2


def test_sdpa_forward_and_backward_release_the_gil():
    torch.manual_seed(0)

    def make(scale):
        q, k, v = (torch.randn(1, 4 * scale, 1536, 64) for _ in range(3))
        return (q, k, v), lambda: _C.sdpa_forward(q, k, v, None, False, 0.125)

    (q, k, v), forward = _sized(make)
    out, lse = forward()
    assert _ticks_during(forward) > 100
    g = torch.randn_like(out)
    assert _ticks_during(lambda: _C.sdpa_backward(g, q, k, v, out, lse, None, False, 0.125)) > 100


def test_additive_attention_releases_the_gil():
    torch.manual_seed(0)

    def make(scale):
        N, S, A, Dv = 64 * scale, 2048, 128, 64
        qp, kp, v, values = torch.randn(N, A), torch.randn(N, S, A), torch.randn(A), torch.randn(N, S, Dv)
        return None, lambda: _C.additive_attention_forward(qp, kp, v, values, None)

    _, forward = _sized(make)
    assert _ticks_during(forward) > 100


def test_module_calls_release_the_gil_past_small_steps():
    """The modules' C++ calls (seqfast._C.CellCall / ModuleCall / SdpaCall) keep the GIL only for steps of at most
    about a million multiply-adds (call_guard::released_unless_small); a longer no-grad call lets other threads run."""
    import seqfast
    from seqfast.functional import _attention
    torch.manual_seed(0)

    def no_grad(call):  # grad mode is per thread: the worker thread's call sets its own
        def run():
            with torch.no_grad():
                assert call() is not None, "the C++ call declined"
        return run

    def cell(scale):
        m = seqfast.nn.GRUCell(512, 512)
        x, h = torch.randn(256 * scale, 512), torch.randn(256 * scale, 512)
        no_grad(lambda: m(x, h))()  # builds the module's C++ call
        return None, no_grad(lambda: m.__dict__["_seqfast_call"](x, h))

    def layer(scale):
        m = seqfast.nn.LSTM(256, 256)
        x, hx = torch.randn(16 * scale, 32, 256), (torch.zeros(1, 32, 256), torch.zeros(1, 32, 256))
        no_grad(lambda: m(x, hx))()
        return None, no_grad(lambda: m.__dict__["_seqfast_call"](x, hx, False))

    def attention(scale):
        q, k, v = (torch.randn(1, 4 * scale, 1024, 64) for _ in range(3))
        no_grad(lambda: seqfast.functional.scaled_dot_product_attention(q, k, v))()
        return None, no_grad(lambda: _attention._cpp_call(q, k, v, False, None, False))

    for make in (cell, layer, attention):
        _, call = _sized(make)
        assert _ticks_during(call) > 100, make.__name__
