"""The performance floor's dispatch (seqfast/_rules.py): where a rule says torch's op is faster, the call runs torch's
op and gives torch's results exactly; elsewhere, and with a forced backend, seqfast's kernels run."""
import pytest
import torch

import seqfast
from seqfast import _rules


@pytest.fixture
def rule_for(monkeypatch):
    """Installs one rule matching this CPU (set_rules clears the memos), and the real table again after."""
    def install(family, dtype, **bounds):
        rule = _rules.Rule(family, dtype, (_rules.cpu_class(),), source="test", **bounds)
        _rules.set_rules([rule])
    saved = list(_rules.RULES)
    yield install
    _rules.set_rules(saved)


def _pair(name, *args, **kw):
    ref = getattr(torch.nn, name)(*args, **kw).double()
    ours = getattr(seqfast.nn, name)(*args, **kw).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("name,family", [("LSTM", "lstm"), ("GRU", "gru"), ("RNN", "rnn")])
def test_sequence_rule_runs_torchs_op(rule_for, name, family, monkeypatch):
    ref, ours = _pair(name, 3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    rule_for(family, torch.float64, training=True, batch=(2, 2))
    calls = []
    original = _rules.prefer_torch
    monkeypatch.setattr(_rules, "prefer_torch", lambda *a, **k: calls.append((a, k)) or original(*a, **k))
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=0, atol=0)  # torch's op: bit for bit
    # decided by the module's C++ call (seqfast._C.ModuleCall, from the table's training regions) or by the Python path
    call = ours.__dict__.get("_seqfast_call")
    assert (call and call(x, None, True) is not None) or (calls and original(*calls[-1][0], **calls[-1][1]))
    with torch.no_grad():  # training=True only: inference keeps seqfast's kernel (close, not bitwise)
        assert not original(family, x, 2, 4, (x,))
    with seqfast.use_backend("cpp"):  # a forced backend bypasses the table
        assert not original(family, x, 2, 4, (x,))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_sequence_rule_bounded_in_steps(rule_for, packed, grad):
    # a rule from 4 steps on: a 3-step call runs seqfast's kernels, a 4-step one torch's op (bit for bit), whichever
    # path the call takes (the C++ module call, the no-grad Python path, the functional; padded or packed)
    ref, ours = _pair("LSTM", 3, 4)
    rule_for("lstm", torch.float64, batch=(2, 2), steps=(4, 6))
    assert not _rules.prefer_torch_when("lstm", torch.zeros(1, dtype=torch.float64), 2, 4, grad, steps=3)
    assert _rules.prefer_torch_when("lstm", torch.zeros(1, dtype=torch.float64), 2, 4, grad, steps=4)
    for steps, torchs in ((3, False), (4, True), (7, False)):
        x = torch.randn(steps, 2, 3, dtype=torch.float64)
        if packed:
            x = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([steps, steps - 1]))
        with torch.set_grad_enabled(grad):
            got, want = ours(x)[0], ref(x)[0]
        got, want = (got.data, want.data) if packed else (got, want)
        if torchs:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, want)
            assert not torch.equal(got, want)  # seqfast's kernels ran (their float64 math is not torch's bit for bit)


@pytest.mark.parametrize("name,family", [("LSTMCell", "lstm_cell"), ("GRUCell", "gru_cell"), ("RNNCell", "rnn_cell")])
def test_cell_rule_runs_torchs_op(rule_for, name, family):
    ref, ours = _pair(name, 3, 4)
    x = torch.randn(2, 3, dtype=torch.float64)
    rule_for(family, torch.float64, hidden=(4, 4))
    out, want = ours(x), ref(x)
    for o, w in zip(out if isinstance(out, tuple) else (out,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(o, w, rtol=0, atol=0)


def test_sdpa_rule_runs_torchs_op(rule_for):
    q, k, v = torch.randn(1, 2, 1, 8, dtype=torch.float64), torch.randn(1, 2, 300, 8, dtype=torch.float64), \
        torch.randn(1, 2, 300, 8, dtype=torch.float64)
    rule_for("sdpa", torch.float64, batch=(1, 1), hidden=(256, 4096))  # the decoder step
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(seqfast.functional.scaled_dot_product_attention(q, k, v), want, rtol=0, atol=0)


def test_rules_are_well_formed():
    families = {"lstm", "gru", "rnn", "lstm_cell", "gru_cell", "rnn_cell", "sdpa", "sdpa_upcast"}
    classes = {"amx", "avx512_bf16", "avx512", "avx2", "other"}
    for rule in _rules.RULES:
        assert rule.family in families and rule.cpus <= classes and rule.source
        for bound in (rule.batch, rule.hidden, rule.head_dim, rule.steps, rule.work):
            assert bound is None or bound[0] <= bound[1]
    assert _rules.cpu_class() in classes


def test_work_bound_narrows_batches(rule_for):
    """``work`` bounds batch x hidden^2 (inclusive): the batch range at each hidden, in prefer_torch_when and in the
    regions the C++ calls get (torch_regions / torch_batches), and a call inside it runs torch's op bit for bit."""
    rule_for("lstm", torch.float64, work=(64, 200), steps=(2, _rules.INF))
    t = torch.zeros(1, dtype=torch.float64)
    # hidden 4: batches 4-12 (16 x batch in [64, 200]); hidden 8: batch 1-3
    assert [b for b in range(1, 20) if _rules.prefer_torch_when("lstm", t, b, 4, False, steps=5)] == list(range(4, 13))
    assert [b for b in range(1, 20) if _rules.prefer_torch_when("lstm", t, b, 8, False, steps=5)] == [1, 2, 3]
    assert not _rules.prefer_torch_when("lstm", t, 4, 4, False, steps=1)  # the steps bound still holds
    assert _rules.torch_regions("lstm", torch.float64, False, 4) == [(4, 12, 2, _rules.INF)]
    assert _rules.torch_regions("lstm", torch.float64, False, 16) == []  # 256 x batch > 200: no batch
    ref, ours = _pair("LSTM", 3, 4)
    for batch, torchs in ((3, False), (4, True)):
        x = torch.randn(5, batch, 3, dtype=torch.float64)
        with torch.no_grad():
            got, want = ours(x)[0], ref(x)[0]
        assert torch.equal(got, want) == torchs


def test_past_float32_bound(rule_for, monkeypatch):
    """``past_float32``: only the batches past float32_bfloat16_max_batch's bound at the call's hidden size."""
    monkeypatch.setattr(_rules, "float32_bfloat16_max_batch", lambda family, hidden, steps=1: 1024 // (hidden * hidden))
    rule_for("gru_cell", torch.bfloat16, training=False, past_float32=True)
    t = torch.zeros(1, dtype=torch.bfloat16)
    assert not _rules.prefer_torch_when("gru_cell", t, 16, 8, False)  # 16 x 64 = 1024: inside
    assert _rules.prefer_torch_when("gru_cell", t, 17, 8, False)
    assert _rules.torch_batches("gru_cell", torch.bfloat16, False, 8) == [(17, _rules.INF)]
    assert _rules.torch_batches("gru_cell", torch.bfloat16, False, 64) == [(1, _rules.INF)]  # bound 0: every batch


def test_rules_bounds_are_well_formed_for_every_hidden():
    """Every rule of the table gives a well-formed (possibly empty) batch range at any hidden size."""
    for rule in _rules.RULES:
        for hidden in (1, 7, 64, 128, 384, 1024, 4096):
            low, high = rule.batches(hidden)
            assert 0 <= low and high <= _rules.INF
