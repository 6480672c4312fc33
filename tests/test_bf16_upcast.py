"""bfloat16 RNN layers and cells on a CPU without native bfloat16 (seqfast._rules.upcast_bfloat16): computed in
float32 on upcast copies, results rounded to bfloat16 once. The path is forced onto this CPU's class here, so it is
tested on any machine: outputs and gradients against float64 torch on the same bfloat16 values, bfloat16 results
and gradients, and the regular path (torch's errors) wherever the call does not qualify."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
from conftest import assert_raises_like_torch, bfloat16_and_float64, bfloat16_paths_taken, cpp_config
from seqfast import _rules

BF16 = torch.bfloat16
TOL = dict(rtol=5e-2, atol=5e-2)


@pytest.fixture
def upcasts(monkeypatch, no_rules):
    """The upcast path allowed on this CPU class, no rule sending the call to torch's op, and no fused bfloat16 step
    (a CPU without native bfloat16 has none; where it runs, the modules' no-grad steps take it instead of the copies:
    test_cell_no_grad_path.py); -> the list of calls that took it."""
    with cpp_config(bf16_rnn_step=False):
        yield bfloat16_paths_taken(monkeypatch, "upcast_bfloat16")


def _flat(out):
    if hasattr(out, "batch_sizes"):  # a PackedSequence (itself a tuple): its data
        return [out.data]
    if isinstance(out, tuple):
        return [t for o in out for t in _flat(o)]
    return [out]


@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("layers,bidirectional,batch_first", [(1, False, False), (2, True, True)])
@pytest.mark.parametrize("packed", [False, True])
def test_sequence_matches_float64_torch(upcasts, kind, kw, layers, bidirectional, batch_first, packed):
    torch.manual_seed(0)
    ours, ref = bfloat16_and_float64(kind, 6, 8, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **kw)
    # 18 rows (packed: 17): fewer run as cell steps (test_cell_steps.py)
    x = torch.randn((3, 6, 6) if batch_first else (6, 3, 6)).to(BF16).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    if packed:
        lengths = torch.tensor([6, 6, 5])
        got = ours(pack_padded_sequence(x, lengths, batch_first=batch_first))
        want = ref(pack_padded_sequence(x64, lengths, batch_first=batch_first))
    else:
        got, want = ours(x), ref(x64)
    assert upcasts  # the float32 path ran
    for g, w in zip(_flat(got), _flat(want)):
        assert g.dtype == BF16
        torch.testing.assert_close(g.double(), w, **TOL)
    sum(t.double().sum() for t in _flat(got)).backward()
    sum(t.sum() for t in _flat(want)).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-1, atol=1e-1)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert p.grad.dtype == BF16, name
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-1, atol=1e-1)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("grad", [False, True])
def test_cell_matches_float64_torch(upcasts, kind, grad):
    torch.manual_seed(0)
    ours, ref = bfloat16_and_float64(kind, 6, 8)
    rows = _rules.BF16_IN_PLACE_MAX_ROWS + 1  # fewer rows read the weights in place (test_bf16_cell_weights.py)
    x = torch.randn(rows, 6).to(BF16)
    h = torch.randn(rows, 8).to(BF16)
    hx = (h, torch.randn(rows, 8).to(BF16)) if kind == "LSTMCell" else h
    hx64 = tuple(t.double() for t in hx) if kind == "LSTMCell" else h.double()
    with torch.set_grad_enabled(grad):
        got, want = _flat(ours(x, hx)), _flat(ref(x.double(), hx64))
    assert upcasts == [rows]
    for g, w in zip(got, want):
        assert g.dtype == BF16
        torch.testing.assert_close(g.double(), w, **TOL)
    if grad:
        got[0].double().sum().backward()
        want[0].sum().backward()
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert p.grad.dtype == BF16
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-1, atol=1e-1)


def test_regular_path_where_the_call_does_not_qualify(upcasts):
    torch.manual_seed(0)
    ours, _ = bfloat16_and_float64("LSTMCell", 6, 8)
    ref = torch.nn.LSTMCell(6, 8).to(BF16)
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ours(torch.randn(4, 6).to(BF16))  # batch below UPCAST_BF16_MIN_ROWS
        with seqfast.use_backend("torch"):  # a forced backend
            ours(torch.randn(9, 6).to(BF16))
        with torch.autocast("cpu", dtype=BF16):  # autocast casts itself
            ours(torch.randn(9, 6).to(BF16))
    assert upcasts == []
    # a float32 state with a bfloat16 input: torch's error, as before
    args = (torch.randn(9, 6).to(BF16), (torch.randn(9, 8), torch.randn(9, 8)))
    assert_raises_like_torch(ref, ours, args, same_message=False)
    seq, _ = bfloat16_and_float64("GRU", 6, 8)
    tseq = torch.nn.GRU(6, 8).to(BF16)
    tseq.load_state_dict(seq.state_dict())
    assert_raises_like_torch(tseq, seq, (torch.randn(5, 3, 6).to(BF16), torch.randn(1, 3, 8)), same_message=False)
    assert upcasts == []


def test_not_on_cpus_with_native_bfloat16(monkeypatch):
    monkeypatch.setattr(_rules, "_UPCAST_BF16_CPUS", ())
    monkeypatch.setattr(_rules, "_FLOAT32_BF16_CPUS", ())
    assert not _rules.upcast_bfloat16([torch.zeros(2, dtype=BF16)], 64, "gru", 64, 1024)
    monkeypatch.setattr(_rules, "_UPCAST_BF16_CPUS", (_rules.cpu_class(),))
    assert _rules.upcast_bfloat16([torch.zeros(2, dtype=BF16), None], 64, "gru", 64, 1024)  # any size
    assert not _rules.upcast_bfloat16([torch.zeros(2, dtype=BF16), torch.zeros(2)], 64, "gru", 64, 1024)  # float32


def test_float32_bounds_on_cpus_with_avx512_bf16(monkeypatch):
    """With AVX512_BF16 and no AMX (class "avx512_bf16"), bfloat16 calls compute in float32 only inside the measured
    bounds (seqfast._rules.float32_bfloat16_max_batch): cells, one-step calls and sequences of up to 16 rows (as cell
    steps) up to batch x hidden^2 = 2^20, no upcast copies for sequences of 2+ steps (the fused bfloat16 steps run
    those), SDPA from 128 query rows."""
    monkeypatch.setattr(_rules, "_UPCAST_BF16_CPUS", ())
    monkeypatch.setattr(_rules, "_FLOAT32_BF16_CPUS", (_rules.cpu_class(),))
    monkeypatch.setattr(_rules, "_FLOAT32_BF16_SDPA_CPUS", (_rules.cpu_class(),))
    t = [torch.zeros(2, dtype=BF16)]
    assert _rules.float32_bfloat16_max_batch("lstm_cell", 1024) == 1
    assert _rules.float32_bfloat16_max_batch("gru_cell", 128) == 64
    assert _rules.upcast_bfloat16(t, 64, "rnn_cell", 64, 128) and not _rules.upcast_bfloat16(t, 65, "rnn_cell", 65, 128)
    assert _rules.upcast_bfloat16(t, 16, "rnn_cell", 16, 256) and not _rules.upcast_bfloat16(t, 17, "rnn_cell", 17, 256)
    assert not _rules.upcast_bfloat16(t, 256, "gru", 8, 256, 32)  # sequences: no copies (the fused bfloat16 steps)
    assert _rules.bf16_weights_in_place(t, 16, "gru", 8, 256, 2)  # but cell steps up to 16 rows
    assert not _rules.upcast_bfloat16(t, 32, "rnn", 1, 1024, 32)  # over hidden 512
    assert _rules.upcast_bfloat16(t, 8, "rnn", 8, 256, 1)  # one step: the cells' bound
    assert _rules.upcast_bfloat16(t, 8, "lstm", 8, 128, 1) and not _rules.upcast_bfloat16(t, 32, "lstm", 1, 128, 32)
    assert _rules.bf16_weights_in_place(t, 1, "lstm_cell", 1, 1024) and not _rules.bf16_weights_in_place(
        t, 2, "lstm_cell", 2, 1024)
    assert _rules.float32_bfloat16_regions("gru", 256) == [(1, 16, 1, 1), (1, 16, 2, _rules.INF)]
    assert _rules.float32_bfloat16_regions("lstm", 512) == [(1, 4, 1, 1), (1, 4, 2, _rules.INF)]
    assert _rules.sdpa_float32_bfloat16_min_rows() == 128
    monkeypatch.setattr(_rules, "_FLOAT32_BF16_SDPA_CPUS", ())  # an AMX CPU (class "amx"): SDPA off, RNNs on
    assert _rules.float32_bfloat16_max_batch("lstm_cell", 64) == 256
    assert _rules.sdpa_float32_bfloat16_min_rows() == _rules.INF
    monkeypatch.setattr(_rules, "_FLOAT32_BF16_CPUS", ())  # a class outside both: off
    assert _rules.float32_bfloat16_max_batch("lstm_cell", 64) == 0


def test_amx_class_bounds():
    """On an AMX CPU the RNNs' float32 bounds hold as with AVX512_BF16 alone, SDPA takes no upcast copies and a cell
    step past the bound runs torch's op, not the fused bfloat16 step (measured: seqfast._rules.FLOAT32_BF16_WORK)."""
    assert "amx" in _rules._FLOAT32_BF16_CPUS and "amx" not in _rules._FLOAT32_BF16_SDPA_CPUS
    if _rules.cpu_class() == "amx":
        assert not _rules.fused_bf16_cells_past_float32()
        assert _rules.float32_bfloat16_max_batch("gru_cell", 128) == 64
    elif _rules.cpu_class() == "avx512_bf16":
        assert _rules.fused_bf16_cells_past_float32()
