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
    monkeypatch.setattr(_rules, "prefer_torch", lambda *a: calls.append(a) or original(*a))
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=0, atol=0)  # torch's op: bit for bit
    assert calls and original(*calls[-1])
    with torch.no_grad():  # training=True only: inference keeps seqfast's kernel (close, not bitwise)
        assert not original(family, x, 2, 4, (x,))
    with seqfast.use_backend("cpp"):  # a forced backend bypasses the table
        assert not original(family, x, 2, 4, (x,))


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
    families = {"lstm", "gru", "rnn", "lstm_cell", "gru_cell", "rnn_cell", "sdpa"}
    classes = {"avx512_bf16", "avx512", "avx2", "other"}
    for rule in _rules.RULES:
        assert rule.family in families and rule.cpus <= classes and rule.source
        for bound in (rule.batch, rule.hidden):
            assert bound is None or bound[0] <= bound[1]
    assert _rules.cpu_class() in classes
