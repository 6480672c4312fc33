"""bfloat16 on a CPU with AVX512_BF16 and no AMX: seqfast computes a call in float32 (the weights read in place or on
upcast copies) only inside the measured bounds (seqfast._rules.float32_bfloat16_max_batch, FLOAT32_BF16_WORK), before
the rule table; outside them the call keeps torch's op where a rule prefers it, else seqfast's bfloat16 kernels. The
bounds are forced onto this CPU's class and shrunk to small sizes here (hidden 8: cells up to batch 4), so every route
runs on any machine. Each route is checked against the one it must match: the float32 path's own result (the C++
calls against seqfast.functional, bit for bit), torch's op (bit for bit), float64 torch (within bfloat16's
tolerance)."""
import pytest
import torch

import seqfast
from conftest import bfloat16_and_float64, cpp_config
from seqfast import _ext, _rules

pytestmark = pytest.mark.skipif(_ext.module() is None or not _ext.module().rnn_kernels_supported()
                                or not _ext.module().bf16_cell_weights_supported(),
                                reason="seqfast._C not built or its bfloat16-weight cell kernels do not run here")

BF16 = torch.bfloat16
TOL = dict(rtol=5e-2, atol=5e-2)
HIDDEN = 8


@pytest.fixture
def bounds(monkeypatch):
    """This CPU taken for one with AVX512_BF16 and no AMX, the work bound shrunk so that cells at hidden 8 compute in
    float32 up to batch 4; the rule table as the test sets it (restored after)."""
    monkeypatch.setattr(_rules, "_UPCAST_BF16_CPUS", ())
    monkeypatch.setattr(_rules, "_FLOAT32_BF16_CPUS", (_rules.cpu_class(),))
    monkeypatch.setattr(_rules, "_FLOAT32_BF16_SDPA_CPUS", (_rules.cpu_class(),))
    monkeypatch.setattr(_rules, "FLOAT32_BF16_WORK", 4 * HIDDEN * HIDDEN)
    saved = list(_rules.RULES)
    _rules.set_rules([])
    yield
    _rules.set_rules(saved)


def _rule(family, training, **kw):
    _rules.set_rules([_rules.Rule(family, BF16, (_rules.cpu_class(),), training=training, source="test", **kw)])


def _flat(out):
    if isinstance(out, tuple):
        return [t for o in out for t in _flat(o)]
    return [out]


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_inside_and_outside_the_bound(bounds, kind):
    """Up to batch 4 the float32 path (the C++ call reading the weights in place: the functional's result bit for
    bit); from batch 5 torch's bfloat16 op, also where no rule names the cell, with gradients too -- except without
    gradients on a CPU whose fused bfloat16 steps run, where the C++ call runs the step (test_bf16_rnn_step.py checks
    it bit for bit against the layer entry; here against torch within bfloat16's tolerance, and torch's op bit for bit
    with the steps switched off)."""
    torch.manual_seed(0)
    ours, ref64 = bfloat16_and_float64(kind, 5, HIDDEN)
    ref = getattr(torch.nn, kind)(5, HIDDEN).to(BF16)
    ref.load_state_dict(ours.state_dict())
    functional = {"LSTMCell": seqfast.functional.lstm_cell, "GRUCell": seqfast.functional.gru_cell,
                  "RNNCell": seqfast.functional.rnn_cell}[kind]
    for batch, inside in ((1, True), (4, True), (5, False), (16, False)):
        x = torch.randn(batch, 5).to(BF16)
        h = torch.randn(batch, HIDDEN).to(BF16)
        hx = (h, torch.randn(batch, HIDDEN).to(BF16)) if kind == "LSTMCell" else h
        with torch.no_grad():
            got = _flat(ours(x, hx))
            call = ours._seqfast_call
            assert call and all(torch.equal(a, b) for a, b in zip(_flat(call(x, hx)), got))
            if inside:
                want = _flat(functional(x, hx, *ours.parameters()))
                assert all(torch.equal(a, b) for a, b in zip(got, want))
                hx64 = tuple(s.double() for s in hx) if kind == "LSTMCell" else hx.double()
                for g, w in zip(got, _flat(ref64(x.double(), hx64))):
                    torch.testing.assert_close(g.double(), w, **TOL)
            else:
                if _ext.module().bf16_rnn_step_available():
                    for g, w in zip(got, _flat(ref(x, hx))):
                        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
                    with cpp_config(bf16_rnn_step=False):
                        got = _flat(ours(x, hx))
                for g, w in zip(got, _flat(ref(x, hx))):
                    torch.testing.assert_close(g, w, rtol=0, atol=0)
        # with gradients: inside the bound the float32 path (the C++ call declines), outside it torch's cell op run
        # by the C++ call itself, recorded as torch records it (outputs and gradients bit for bit)
        xg = x.clone().requires_grad_()
        assert (call(xg, hx) is None) == inside
        got = _flat(ours(xg, hx))
        (gx,) = torch.autograd.grad(sum(o.float().sum() for o in got), xg)
        if not inside:
            xr = x.clone().requires_grad_()
            want = _flat(ref(xr, hx))
            (wx,) = torch.autograd.grad(sum(o.float().sum() for o in want), xr)
            for g, w in zip(got + [gx], want + [wx]):
                torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"})])
def test_sequences_take_the_float32_path_before_the_rules(bounds, kind, kw):
    """A rule preferring torch's op for every bfloat16 call of the family: inside the float32 bounds (batch 4 at hidden
    8) one-step calls still compute in float32 (as cell steps, the C++ call running them), with and without
    gradients, and so do sequences of up to 16 rows that autograd records (cell steps, the Python path's); sequences
    without gradients, sequences of 17+ rows (no upcast copies on such a CPU: the fused bfloat16 steps or torch's op
    run them) and calls outside the bounds run torch's op from the C++ call itself, bit for bit."""
    torch.manual_seed(0)
    ours, ref64 = bfloat16_and_float64(kind, 5, HIDDEN, **kw)
    ref = getattr(torch.nn, kind)(5, HIDDEN, **kw).to(BF16)
    ref.load_state_dict(ours.state_dict())
    _rule(kind.lower(), None)
    # (steps, batch, float32 without gradients, float32 with them)
    calls = ((1, 4, True, True), (4, 4, False, True), (17, 1, False, False), (4, 5, False, False), (1, 5, False, False))
    for steps, batch, float32, float32_grad in calls:
        x = torch.randn(steps, batch, 5).to(BF16)
        with torch.no_grad():
            got = _flat(ours(x))
            call = ours._seqfast_call
            assert call(x) is not None  # cell steps or torch's op, both in C++
            if float32:  # the cell steps seqfast's Python path runs with no rule at all (the C++ call set aside)
                saved = list(_rules.RULES)
                _rules.set_rules([])
                ours.__dict__["_seqfast_call"] = None
                python = _flat(ours(x))
                _rules.set_rules(saved)
                assert all(torch.equal(a, b) for a, b in zip(got, python))
                for g, w in zip(got, _flat(ref64(x.double()))):
                    torch.testing.assert_close(g.double(), w, **TOL)
            else:
                for g, w in zip(got, _flat(ref(x))):
                    torch.testing.assert_close(g, w, rtol=0, atol=0)
        # with gradients: the C++ call declines inside the bounds (the float32 path records its own graph) and runs
        # torch's op, as torch records it, outside them
        xg = x.clone().requires_grad_()
        out = _flat(ours(xg))
        assert (ours._seqfast_call(xg, None, True) is None) == float32_grad
        (gx,) = torch.autograd.grad(sum(o.float().sum() for o in out), xg)
        if float32_grad:
            x64 = x.double().requires_grad_()
            (w,) = torch.autograd.grad(sum(o.sum() for o in _flat(ref64(x64))), x64)
            torch.testing.assert_close(gx.double(), w, rtol=1e-1, atol=1e-1)
        else:
            xr = x.clone().requires_grad_()
            (w,) = torch.autograd.grad(sum(o.float().sum() for o in _flat(ref(xr))), xr)
            torch.testing.assert_close(gx, w, rtol=0, atol=0)


def test_sdpa_upcasts_from_the_row_bound(bounds, monkeypatch):
    """Without gradients, from FLOAT32_BF16_SDPA_MIN_ROWS query rows: the float32 kernel on upcast copies, rounded
    once (bit for bit the float32 call's result); fewer rows keep the bfloat16 routes."""
    monkeypatch.setattr(_rules, "FLOAT32_BF16_SDPA_MIN_ROWS", 16)
    sdpa = seqfast.functional.scaled_dot_product_attention
    torch.manual_seed(0)
    for L, upcast in ((16, True), (40, True), (15, False)):
        q, k, v = (torch.randn(1, 2, L, 8).to(BF16) for _ in range(3))
        with torch.no_grad():
            got = sdpa(q, k, v, is_causal=True)
            want = sdpa(q.float(), k.float(), v.float(), is_causal=True).to(BF16)
            if upcast:
                assert torch.equal(got, want)
            ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
            torch.testing.assert_close(got.double(), ref, **TOL)
