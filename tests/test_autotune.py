"""seqfast.autotune: the measured first-call choice between seqfast's kernel and torch's op. These tests steer the
measurement (seqfast.autotune._measure) instead of timing anything: one measurement per shape class, the chosen path
on later calls, torch's results either way, and no measurement where autotuning does not apply."""
import pytest
import torch

import seqfast
import seqfast.autotune as autotune
from seqfast import _ext
from seqfast.functional import _rnn_cell

pytestmark = pytest.mark.skipif(_ext.module() is None or not _ext.module().rnn_kernels_supported(),
                                reason="seqfast._C not built or its RNN kernels do not run on this CPU")


@pytest.fixture
def tuned(monkeypatch):
    """Autotuning on with a fresh choice table; -> the list of measured keys. The measurement picks
    ``tuned.winner`` (after running both paths once, as the real one does)."""
    monkeypatch.setattr(autotune, "_enabled", True)
    monkeypatch.setattr(autotune, "_choices", {})

    class Measured(list):
        winner = "seqfast"
    measured = Measured()

    def fake_measure(calls):
        out = {name: fn() for name, fn in calls.items()}
        measured.append(sorted(calls))
        return measured.winner, out[measured.winner]
    monkeypatch.setattr(autotune, "_measure", fake_measure)
    return measured


@pytest.fixture
def torch_cell_calls(monkeypatch):
    """How many times torch's LSTM cell op ran through seqfast.functional."""
    seen = [0]
    torch_cell = _rnn_cell._TORCH_LSTM_CELL

    def counted_torch(*args):
        seen[0] += 1
        return torch_cell(*args)
    monkeypatch.setattr(_rnn_cell, "_TORCH_LSTM_CELL", counted_torch)
    return seen


def _cells(kind="LSTMCell", **kw):
    ref = getattr(torch.nn, kind)(6, 8, **kw)
    mod = getattr(seqfast.nn, kind)(6, 8, **kw)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


@pytest.mark.parametrize("winner", ["torch", "seqfast"])
def test_cell_measures_once_per_class_then_runs_the_choice(tuned, torch_cell_calls, no_grad_kernel_calls, winner):
    tuned.winner = winner
    torch.manual_seed(0)
    ref, mod = _cells()
    with torch.no_grad():
        for batch in (3, 4, 3):  # one shape class: batch rounds up to 4
            x, hx = torch.randn(batch, 6), (torch.randn(batch, 8), torch.randn(batch, 8))
            torch.testing.assert_close(mod(x, hx), ref(x, hx))
    assert len(tuned) == 1 and list(autotune.choices().values()) == [winner]
    # the measurement ran each path once; the two later calls ran the chosen one only
    counts = {"torch": torch_cell_calls[0], "seqfast": len(no_grad_kernel_calls)}
    assert counts[winner] == 3 and counts["torch" if winner == "seqfast" else "seqfast"] == 1
    with torch.no_grad():
        mod(torch.randn(5, 6), (torch.randn(5, 8), torch.randn(5, 8)))  # batch class 8: measured anew
    assert len(tuned) == 2


@pytest.mark.parametrize("kind,kw", [("GRUCell", {}), ("RNNCell", {}), ("RNNCell", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("winner", ["torch", "seqfast"])
def test_other_cells(tuned, kind, kw, winner):
    tuned.winner = winner
    torch.manual_seed(0)
    ref, mod = _cells(kind, **kw)
    x, h = torch.randn(3, 6), torch.randn(3, 8)
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(mod(x, h), ref(x, h))
            torch.testing.assert_close(mod(x), ref(x))  # no state given: zeros, same class
    assert len(tuned) == 1


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("winner", ["torch", "seqfast"])
def test_module_sequence(tuned, monkeypatch, kind, winner):
    tuned.winner = winner
    module = _ext.module()
    one_call = module.rnn_module_inference
    ran = []

    def counted(*args, **kw):
        ran.append(1)
        return one_call(*args, **kw)
    monkeypatch.setattr(module, "rnn_module_inference", counted)
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(6, 8, num_layers=2, bidirectional=True)
    mod = getattr(seqfast.nn, kind)(6, 8, num_layers=2, bidirectional=True)
    mod.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for T in (5, 7, 6):  # one class: T rounds up to 8
            x = torch.randn(T, 3, 6)
            torch.testing.assert_close(mod(x), ref(x))
    assert len(tuned) == 1
    assert len(ran) == (3 if winner == "seqfast" else 1)  # the measurement, then only the chosen path
    with torch.no_grad():
        x = torch.randn(5, 6)  # unbatched: a class of its own
        torch.testing.assert_close(mod(x), ref(x))
    assert len(tuned) == 2


def test_no_measurement_outside_no_grad_inference(tuned):
    torch.manual_seed(0)
    ref, mod = _cells()
    x, hx = torch.randn(3, 6), (torch.randn(3, 8), torch.randn(3, 8))
    mod(x, hx)[0].sum().backward()  # records autograd: the rule table decides
    with torch.no_grad(), seqfast.use_backend("reference"):  # a forced backend comes first
        mod(x, hx)
    lstm = seqfast.nn.LSTM(6, 8)
    with torch.no_grad():
        lstm(torch.randn(4, 3, 6), (torch.zeros(1, 3, 8), torch.zeros(1, 3, 8)))  # states given: regular path
    assert tuned == [] and autotune.choices() == {}


def test_disabled_by_default_and_clear(monkeypatch):
    monkeypatch.setattr(autotune, "_choices", {})
    monkeypatch.setattr(autotune, "_enabled", False)
    ref, mod = _cells()
    with torch.no_grad():
        mod(torch.randn(3, 6))
    assert autotune.choices() == {}
    autotune.enable()
    assert autotune.enabled()
    with torch.no_grad():
        torch.testing.assert_close(mod(torch.randn(2, 6).zero_()), ref(torch.zeros(2, 6)))  # a real measurement
    assert set(autotune.choices().values()) <= {"torch", "seqfast"} and len(autotune.choices()) == 1
    autotune.clear()
    assert autotune.choices() == {}
    autotune.enable(False)
    assert not autotune.enabled()


def test_size_class():
    assert [autotune.size_class(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [0, 1, 2, 4, 4, 8, 1024, 1024,
                                                                                      2048]
