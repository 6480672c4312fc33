"""Sequences run as one cell call per step (seqfast.functional._cell_steps): bfloat16 layers over fewer than 8 rows
(steps x batch) on a CPU without native bfloat16, the weights read in place, states kept in float32 and the results
rounded once (the path forced onto this CPU's class, so it is tested on any machine with the kernels: outputs, states
and gradients against float64 torch on the same bfloat16 values, padded, packed, several layers, both directions,
batch_first, unbatched, given states); float32 / float64 single-step calls with gradients (torch's results); and the
other paths wherever a call does not qualify."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
from conftest import bfloat16_and_float64, bfloat16_paths_taken, recorded_as_cell_steps
from seqfast import _ext
from seqfast.functional import _rnn_sequence

pytestmark = pytest.mark.skipif(_ext.module() is None or not _ext.module().bf16_cell_weights_supported(),
                                reason="seqfast._C not built or no AVX2 + FMA on this CPU")

BF16 = torch.bfloat16
TOL = dict(rtol=2e-2, atol=2e-2)


@pytest.fixture
def in_steps(monkeypatch, no_rules):
    """The cell-step path allowed on this CPU class at every layer size, no rule sending the call to torch's op; ->
    the row counts of the calls taking it."""
    bfloat16_paths_taken(monkeypatch, "bf16_weights_in_place")
    monkeypatch.setattr(_rnn_sequence, "BF16_STEPS_MIN_WEIGHTS_NO_GRAD", 0)
    taken = []
    original = _rnn_sequence.bf16_in_steps

    def spy(tensors, rows, *shape, **kw):
        verdict = original(tensors, rows, *shape, **kw)
        if verdict:
            taken.append(rows)
        return verdict
    monkeypatch.setattr(_rnn_sequence, "bf16_in_steps", spy)
    return taken


def _flat(out):
    if hasattr(out, "batch_sizes"):
        return [out.data]
    if isinstance(out, tuple):
        return [t for o in out for t in _flat(o)]
    return [out]


def _check(got, want, ours, ref, x, x64):
    for g, w in zip(_flat(got), _flat(want)):
        assert g.dtype == BF16 and g.shape == w.shape
        torch.testing.assert_close(g.double(), w, **TOL)
    if x.requires_grad:
        weights = [torch.randn(w.shape, dtype=torch.float64) for w in _flat(want)]
        sum((g.double() * r).sum() for g, r in zip(_flat(got), weights)).backward()
        sum((w * r).sum() for w, r in zip(_flat(want), weights)).backward()
        assert x.grad.dtype == BF16
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=5e-2, atol=5e-2)
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert p.grad.dtype == BF16, name
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"}), ("RNN", {})])
@pytest.mark.parametrize("layers,bidirectional,batch_first", [(1, False, False), (2, True, True)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_layers_match_float64_torch(in_steps, kind, kw, layers, bidirectional, batch_first, packed, grad):
    torch.manual_seed(0)
    ours, ref = bfloat16_and_float64(kind, 5, 7, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **kw)
    T, B = 3, 2
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5)).to(BF16).requires_grad_(grad)
    x64 = x.detach().double().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        if packed:  # lengths 1 and 3: the states of the shorter sequence end at its first step
            lengths = torch.tensor([1, 3])
            got = ours(pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False))
            want = ref(pack_padded_sequence(x64, lengths, batch_first=batch_first, enforce_sorted=False))
        else:
            got, want = ours(x), ref(x64)
    assert in_steps == [4 if packed else 6]  # no grad, padded: the module's C++ call (rnn_module_inference) ran it
    _check(got, want, ours, ref, x, x64)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_one_step_with_states_and_unbatched(in_steps, kind):
    """A decoder's call: one step, its states given; and an unbatched step."""
    torch.manual_seed(0)
    ours, ref = bfloat16_and_float64(kind, 6, 8, num_layers=2)
    x = torch.randn(1, 1, 6).to(BF16).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    h = torch.randn(2, 1, 8).to(BF16)
    hx = (h, torch.randn(2, 1, 8).to(BF16)) if kind == "LSTM" else h
    hx64 = tuple(t.double() for t in hx) if kind == "LSTM" else h.double()
    _check(ours(x, hx), ref(x64, hx64), ours, ref, x, x64)
    with torch.no_grad():
        u = torch.randn(3, 6).to(BF16)  # unbatched: [T, I]
        _check(ours(u), ref(u.double()), ours, ref, u, u)
    assert in_steps and set(in_steps) <= {1, 3}


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_no_grad_module_call_matches_the_functional_steps(in_steps, kind):
    """The module's no-grad C++ call (rnn_module_inference with cell_steps) runs the same steps as the functional:
    the same bits, with and without given states, batch_first, both directions."""
    torch.manual_seed(0)
    ours, _ = bfloat16_and_float64(kind, 5, 7, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 3, 5).to(BF16)
    h = torch.randn(4, 2, 7).to(BF16)
    hx = (h, torch.randn(4, 2, 7).to(BF16)) if kind == "LSTM" else h
    for states in ((), (hx,)):
        with torch.no_grad():
            got = ours(x, *states)
            assert ours._seqfast_call(x, *states) is not None  # the C++ call takes it
        want = ours(x.clone().requires_grad_(), *states)  # grad mode: seqfast.functional's cell steps
        for g, w in zip(_flat(got), _flat(want)):
            assert torch.equal(g, w.detach())
    assert in_steps


def test_cell_steps_entry_checks():
    x = torch.randn(1, 2, 5)
    w = [torch.randn(7, 5).to(BF16), torch.randn(7, 7).to(BF16)]
    with pytest.raises(RuntimeError, match="cell_steps takes bfloat16"):
        _ext.module().rnn_module_inference("RNN_TANH", x, w, False, 1, False, False, cell_steps=True)
    with pytest.raises(RuntimeError, match="h0 must have dtype BFloat16"):
        _ext.module().rnn_module_inference("RNN_TANH", x.to(BF16), w, False, 1, False, False, h0=torch.zeros(1, 2, 7),
                                           cell_steps=True)


def test_where_the_call_does_not_qualify(in_steps, monkeypatch):
    torch.manual_seed(0)
    ours, ref = bfloat16_and_float64("GRU", 5, 7)
    with torch.no_grad():
        ours(torch.randn(9, 2, 5).to(BF16))  # 18 rows: the upcast path's
        with seqfast.use_backend("torch"):
            ours(torch.randn(1, 1, 5).to(BF16))
        lstm = seqfast.nn.LSTM(5, 7, proj_size=3).to(BF16)
        lstm(torch.randn(1, 1, 5).to(BF16))  # proj_size: torch's op
    assert in_steps == []
    # without gradients, small layers keep the sequence kernels on the Python path (BF16_STEPS_MIN_WEIGHTS_NO_GRAD; a
    # packed input), while the module's padded call runs the steps in C++ at any size
    monkeypatch.setattr(_rnn_sequence, "BF16_STEPS_MIN_WEIGHTS_NO_GRAD", 4 * 7 * 12 + 1)
    small = seqfast.nn.LSTM(5, 7).to(BF16)
    x = torch.randn(1, 1, 5).to(BF16)
    with torch.no_grad():
        small(pack_padded_sequence(x, torch.tensor([1])))
        assert in_steps == []
        small(x)
        assert in_steps == [1]
    small(x.requires_grad_())
    assert in_steps == [1, 1]


@pytest.fixture
def cell_step_calls(monkeypatch):
    """-> the dtypes of the calls seqfast.functional.recurrent ran as cell steps."""
    from seqfast.functional import _cell_steps
    calls = []

    def spy(original):
        def run(kind, input, *args):
            calls.append(input.dtype)
            return original(kind, input, *args)
        return run
    # the general walk, and its shorter twin for a padded one-step call
    for name in ("recurrent_in_steps", "one_step"):
        monkeypatch.setattr(_cell_steps, name, spy(getattr(_cell_steps, name)))
    return calls


@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"}), ("RNN", {})])
@pytest.mark.parametrize("layers,bidirectional,batch_first,packed",
                         [(1, False, False, False), (2, True, True, False), (2, True, True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_step_with_gradients_matches_torch(cell_step_calls, kind, kw, layers, bidirectional, batch_first,
                                                  packed, dtype):
    """A one-step call in grad mode (a decoder trained one token per call) runs the cell kernels: torch's outputs,
    states and gradients."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(5, 7, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                                  **kw).to(dtype)
    ours = getattr(seqfast.nn, kind)(5, 7, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                                     **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn((3, 1, 5) if batch_first else (1, 3, 5), dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    if packed:
        lengths = torch.ones(3, dtype=torch.int64)
        got = ours(pack_padded_sequence(x, lengths, batch_first=batch_first))
        want = ref(pack_padded_sequence(x_ref, lengths, batch_first=batch_first))
    else:
        got, want = ours(x), ref(x_ref)
    # a packed call takes the Python path's cell steps; a padded one the module's C++ call, which records the cell
    # steps from C++ (test_rnn_one_step_recorded.py)
    assert cell_step_calls == ([dtype] if packed else []) and (packed or recorded_as_cell_steps(_flat(got)[0]))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for g, w in zip(_flat(got), _flat(want)):
        torch.testing.assert_close(g, w, **tol)
    weights = [torch.randn(w.shape, dtype=dtype) for w in _flat(want)]
    sum((g * r).sum() for g, r in zip(_flat(got), weights)).backward()
    sum((w * r).sum() for w, r in zip(_flat(want), weights)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=name)


def test_longer_or_no_grad_calls_keep_the_sequence_kernels(cell_step_calls):
    torch.manual_seed(0)
    ours = seqfast.nn.GRU(5, 7)
    ours(torch.randn(2, 3, 5, requires_grad=True))  # two steps
    with torch.no_grad():
        ours(torch.randn(1, 3, 5))  # no gradients: the no-grad module call
    assert cell_step_calls == []


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_single_step_dropout_draws_torchs_masks(cell_step_calls, kind):
    """Dropout between layers of a one-step call in training: the masks torch draws from the same seed (its op applies
    the same dropout to each layer's output), so outputs, states and gradients match."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(5, 7, num_layers=3, dropout=0.5, bidirectional=True)
    ours = getattr(seqfast.nn, kind)(5, 7, num_layers=3, dropout=0.5, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    got = ours(x)
    torch.manual_seed(1)
    want = ref(x_ref)
    assert cell_step_calls == [torch.float32]
    for g, w in zip(_flat(got), _flat(want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    sum(t.sum() for t in _flat(got)).backward()
    sum(t.sum() for t in _flat(want)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_outputs_do_not_alias_the_states(in_steps, cell_step_calls, dtype):
    """As torch's: writing into the output leaves h_n as it was (one step of one layer, where they hold equal
    values)."""
    torch.manual_seed(0)
    mod = seqfast.nn.GRU(5, 7).to(dtype)
    out, hn = mod(torch.randn(1, 2, 5, dtype=dtype, requires_grad=True))
    assert cell_step_calls or recorded_as_cell_steps(out)  # the Python path's cell steps or the C++ call's
    assert out.untyped_storage().data_ptr() != hn.untyped_storage().data_ptr()
