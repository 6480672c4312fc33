"""The fused bfloat16 LSTM and GRU steps (csrc/rnn/rnn_sequence_step_bf16.h: vdpbf16ps on AVX512_BF16 CPUs, AMX
ones included).

Their arithmetic is defined exactly: bfloat16 operands, float32 products and sums, the LSTM's cell state in float32, h
rounded to bfloat16 once per step. The layer entries are checked against that algorithm written in plain PyTorch (LSTM
cell states and the GRU's workspace within float32 rounding, outputs within one bfloat16 step: the bf16-GEMM loop they
replace rounds its pre-activations to bfloat16 and misses by ~1e-3), over odd input sizes, hidden sizes off the
16-unit blocks, batches across several 6-row tiles and both threads, packed and reversed sequences and given states;
the modules against float64 torch in inference and training (the backward upcasts), with the rule table emptied so
the steps take every call."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
from conftest import bfloat16_and_float64
from seqfast import _ext, _rules

C = _ext.module()
pytestmark = pytest.mark.skipif(C is None or not C.bf16_rnn_step_available(),
                                reason="the fused bfloat16 steps need AVX512_BF16")
BF16 = torch.bfloat16


def _steps(batch_sizes, reverse):
    """(rows, first row) of each step of a packed sequence, in processing order."""
    sizes = batch_sizes.tolist()
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    return [(sizes[t], offsets[t]) for t in order]


def _final_rows(sizes, reverse):
    """The packed row holding each batch row's final state: its last step's (reversed: the first step's)."""
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    last = [0 if reverse else max(t for t in range(len(sizes)) if b < sizes[t]) for b in range(sizes[0])]
    return torch.tensor([offsets[t] + b for b, t in enumerate(last)])


def _lstm_algorithm(x, batch_sizes, h0, c0, w_ih, w_hh, bias, reverse):
    """The step's arithmetic over a packed sequence: x [N, I] bfloat16 in time-major packed order."""
    H = h0.shape[1]
    h, c = h0.clone(), c0.float().clone()
    out = torch.empty(x.shape[0], H, dtype=BF16)
    cs = torch.empty(x.shape[0], H)
    for bs, off in _steps(batch_sizes, reverse):
        g = x[off:off + bs].float() @ w_ih.float().T + h[:bs].float() @ w_hh.float().T + bias
        i, f, gg, o = g.split(H, 1)
        cn = torch.sigmoid(f) * c[:bs] + torch.sigmoid(i) * torch.tanh(gg)
        hn = (torch.sigmoid(o) * torch.tanh(cn)).to(BF16)
        h, c = h.clone(), c.clone()
        h[:bs], c[:bs] = hn, cn
        out[off:off + bs], cs[off:off + bs] = hn, cn
    return out, cs


def _flat(out):
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return [out]


# (steps, batch sizes per step or None: the same each step, input size, hidden size) of the LSTM and GRU layer checks
SHAPES = [(5, None, 7, 9), (6, None, 33, 17), (4, None, 64, 48), (3, None, 16, 130), (5, [13, 13, 9, 4, 1], 5, 40),
          (2, None, 128, 256)]


def _layer_inputs(T, sizes, I, H, G):
    """A layer's bfloat16 inputs for G gates: (batch sizes list, batch_sizes, x, h0, c0, w_ih, w_hh, b_ih, b_hh)."""
    torch.manual_seed(0)
    sizes = sizes or [13 if H < 100 else 3] * T
    B, N = sizes[0], sum(sizes)
    x = torch.randn(N, I).to(BF16)
    h0, c0 = torch.randn(B, H).to(BF16), torch.randn(B, H).to(BF16)
    w_ih, w_hh = (torch.randn(G * H, I) / I ** 0.5).to(BF16), (torch.randn(G * H, H) / H ** 0.5).to(BF16)
    b_ih, b_hh = torch.randn(G * H).to(BF16), torch.randn(G * H).to(BF16)
    return sizes, torch.tensor(sizes, dtype=torch.int64), x, h0, c0, w_ih, w_hh, b_ih, b_hh


@pytest.mark.parametrize("T,sizes,I,H", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_layer_matches_the_algorithm(T, sizes, I, H, reverse):
    sizes, batch_sizes, x, h0, c0, w_ih, w_hh, b_ih, b_hh = _layer_inputs(T, sizes, I, H, 4)
    N = sum(sizes)
    want_out, want_cs = _lstm_algorithm(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih.float() + b_hh.float(), reverse)
    out, hn, cn, gates, cs = C.lstm_layer_forward(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)
    assert out.dtype == BF16 and cs.dtype == torch.float32 and gates.shape == (N, 4 * H)
    torch.testing.assert_close(cs, want_cs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=8e-3, atol=1e-3)
    # the final states: each row's state at its last step (packed: shorter rows end early)
    rows = _final_rows(sizes, reverse)
    torch.testing.assert_close(hn, out[rows], rtol=0, atol=0)
    torch.testing.assert_close(cn, cs[rows].to(BF16), rtol=0, atol=0)


def _gru_algorithm(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse):
    """The GRU step's arithmetic over a packed sequence; -> (out, ws [r z n hn])."""
    H = h0.shape[1]
    h = h0.clone()
    out = torch.empty(x.shape[0], H, dtype=BF16)
    ws = torch.empty(x.shape[0], 4 * H)
    for bs, off in _steps(batch_sizes, reverse):
        gi = x[off:off + bs].float() @ w_ih.float().T + b_ih.float()
        gh = h[:bs].float() @ w_hh.float().T + b_hh.float()
        r = torch.sigmoid(gi[:, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
        n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
        hn = ((1 - z) * n + z * h[:bs].float()).to(BF16)
        h = h.clone()
        h[:bs] = hn
        out[off:off + bs] = hn
        ws[off:off + bs] = torch.cat([r, z, n, gh[:, 2 * H:]], 1)
    return out, ws


@pytest.mark.parametrize("T,sizes,I,H", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_gru_layer_matches_the_algorithm(T, sizes, I, H, reverse):
    sizes, batch_sizes, x, h0, _, w_ih, w_hh, b_ih, b_hh = _layer_inputs(T, sizes, I, H, 3)
    want_out, want_ws = _gru_algorithm(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse)
    out, hn, ws = C.gru_layer_forward(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse)
    assert out.dtype == BF16 and ws.dtype == torch.float32
    torch.testing.assert_close(ws, want_ws, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(hn, out[_final_rows(sizes, reverse)], rtol=0, atol=0)


def _rnn_algorithm(x, batch_sizes, h0, w_ih, w_hh, bias, relu, reverse):
    """The Elman RNN step's arithmetic over a packed sequence."""
    h = h0.clone()
    out = torch.empty(x.shape[0], h0.shape[1], dtype=BF16)
    for bs, off in _steps(batch_sizes, reverse):
        pre = x[off:off + bs].float() @ w_ih.float().T + h[:bs].float() @ w_hh.float().T + bias
        hn = (torch.relu(pre) if relu else torch.tanh(pre)).to(BF16)
        h = h.clone()
        h[:bs] = hn
        out[off:off + bs] = hn
    return out


@pytest.mark.parametrize("T,sizes,I,H", [(5, None, 7, 9), (6, None, 33, 17), (4, None, 64, 100), (3, None, 16, 130),
                                         (5, [13, 13, 9, 4, 1], 5, 70), (2, None, 128, 256)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_rnn_layer_matches_the_algorithm(T, sizes, I, H, relu, reverse):
    """Blocks of 64 units (four 16-unit groups): hidden sizes that end inside a group (70, 100, 130) and at a group
    edge; outputs within one bfloat16 step of the algorithm (no float32 state to compare: the step keeps none)."""
    sizes, batch_sizes, x, h0, _, w_ih, w_hh, b_ih, b_hh = _layer_inputs(T, sizes, I, H, 1)
    want = _rnn_algorithm(x, batch_sizes, h0, w_ih, w_hh, b_ih.float() + b_hh.float(), relu, reverse)
    out, hn = C.rnn_layer_forward(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, relu, reverse)
    assert out.dtype == BF16
    # within one bfloat16 rounding step of the algorithm, and equal on all but a few elements (the bf16-GEMM loop,
    # which rounds its input products to bfloat16 first, differs on most)
    torch.testing.assert_close(out.float(), want.float(), rtol=8e-3, atol=1e-3)
    assert (out != want).float().mean() < 0.02
    torch.testing.assert_close(hn, out[_final_rows(sizes, reverse)], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("layers,bidirectional,batch_first", [(1, False, False), (2, True, True)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_module_matches_float64_torch(no_rules, monkeypatch, kind, layers, bidirectional, batch_first, packed, grad):
    monkeypatch.setattr(_rules, "_FLOAT32_BF16_CPUS", ())  # no float32 path for small calls: the steps take them all
    torch.manual_seed(0)
    ours, ref = bfloat16_and_float64(kind, 9, 20, num_layers=layers, bidirectional=bidirectional,
                                     batch_first=batch_first)
    T, B = 7, 10  # 70 rows: past the float32 bounds and the cell steps, onto the sequence kernels
    x = torch.randn((B, T, 9) if batch_first else (T, B, 9)).to(BF16).requires_grad_(grad)
    x64 = x.detach().double().requires_grad_(grad)
    h0 = torch.randn(layers * (2 if bidirectional else 1), B, 20).to(BF16)
    states, states64 = ((h0, h0 * 0.5), (h0.double(), (h0 * 0.5).double())) if kind == "LSTM" else (h0, h0.double())
    with torch.set_grad_enabled(grad):
        if packed:
            lengths = torch.tensor([7, 7, 6, 5, 5, 4, 3, 2, 1, 1])
            got = ours(pack_padded_sequence(x, lengths, batch_first=batch_first), states)
            want = ref(pack_padded_sequence(x64, lengths, batch_first=batch_first), states64)
            got, want = (got[0].data, got[1]), (want[0].data, want[1])
        else:
            got, want = ours(x, states), ref(x64, states64)
        got, want = _flat(got), _flat(want)
    for g, w in zip(got, want):
        assert g.dtype == BF16
        torch.testing.assert_close(g.double(), w, rtol=3e-2, atol=3e-2)
    if grad:
        sum(g.double().sum() for g in got).backward()
        sum(w.sum() for w in want).backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-1, atol=1e-1)
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert p.grad.dtype == BF16, name
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-1, atol=1e-1)


def _cell_pair(kind, input_size, hidden, **kw):
    ours = getattr(seqfast.nn, kind + "Cell")(input_size, hidden, **kw).to(BF16)
    ref = getattr(torch.nn, kind + "Cell")(input_size, hidden, **kw).to(BF16)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _one_step(kind, batch, input_size, hidden):
    """A bfloat16 cell pair of ``kind`` (seed ``batch``), one step's x, h, c and the layer entry's results for that step
    run as a one-step layer (h', and c' for the LSTM)."""
    torch.manual_seed(batch)
    ours, ref = _cell_pair(kind, input_size, hidden)
    x, h = torch.randn(batch, input_size).to(BF16), torch.randn(batch, hidden).to(BF16)
    c = torch.randn(batch, hidden).to(BF16)
    w = [p.detach() for p in ours.parameters()]  # w_ih, w_hh, b_ih, b_hh
    bs = torch.tensor([batch])
    if kind == "LSTM":
        layer = C.lstm_layer_forward(x, bs, h, c, *w, False)
        want_step = [layer[1], layer[2]]
    elif kind == "GRU":
        want_step = [C.gru_layer_forward(x, bs, h, *w, False)[1]]
    else:
        want_step = [C.rnn_layer_forward(x, bs, h, *w, False, False)[1]]
    return ours, ref, x, h, c, want_step


@pytest.mark.parametrize("past", [True, False])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch,input_size,hidden", [(40, 33, 200), (70, 64, 130), (17, 40, 800), (9, 20, 400)])
def test_cell_steps_past_the_float32_bound_run_the_fused_step(no_rules, monkeypatch, past, kind, batch, input_size,
                                                               hidden):
    # no-grad bfloat16 cell module steps past the float32 bound (batch x hidden^2 > 2^20) run the fused step as a
    # one-step layer from 16 rows while the weights hold at most 2^21 elements (bit for bit the layer entry's
    # results), torch's cell op below 16 rows, beyond that weight bound, with the steps switched off and where
    # seqfast._rules.fused_bf16_cells_past_float32 says no (an AMX CPU; bit for bit torch's)
    from conftest import cpp_config
    monkeypatch.setattr(_rules, "fused_bf16_cells_past_float32", lambda: past)
    ours, ref, x, h, c, want_step = _one_step(kind, batch, input_size, hidden)
    state = (h, c) if kind == "LSTM" else h
    fused = past and batch >= 16 and ours.weight_ih.numel() + ours.weight_hh.numel() <= 1 << 21
    with torch.no_grad():
        got = _flat(ours(x, state))
        want_torch = _flat(ref(x, state))
        with cpp_config(bf16_rnn_step=False):
            got_off = _flat(ours(x, state))
    for g, s, t, o in zip(got, want_step, want_torch, got_off):
        assert g.dtype == BF16 and g.shape == t.shape
        assert torch.equal(g, s if fused else t)
        assert torch.equal(o, t)
        torch.testing.assert_close(g.float(), t.float(), rtol=2e-2, atol=2e-2)
    if fused:
        assert any(not torch.equal(g, t) for g, t in zip(got, want_torch)), "the fused step must be the one that ran"


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch,input_size,hidden", [(17, 24, 128), (40, 33, 100), (64, 16, 128)])
def test_steps_inside_the_float32_bound_past_the_in_place_rows_run_the_fused_step(no_rules, monkeypatch, kind, batch,
                                                                                   input_size, hidden):
    # inside the float32 bound (batch x hidden^2 <= 2^20) but past the rows that read the weights in place, a no-grad
    # cell module step, and a one-step module call, run the fused step (bit for bit the layer entry's results) in
    # place of float32 upcast copies, which they take with the steps switched off (close to torch's op)
    from conftest import cpp_config
    assert _rules.BF16_IN_PLACE_MAX_ROWS < batch <= _rules.float32_bfloat16_max_batch(kind.lower() + "_cell", hidden)
    ours, ref, x, h, c, want_step = _one_step(kind, batch, input_size, hidden)
    state = (h, c) if kind == "LSTM" else h
    seq = getattr(seqfast.nn, kind)(input_size, hidden).to(BF16)
    seq.load_state_dict({f"{k}_l0": v for k, v in ours.state_dict().items()})
    upcasts, original = [], _rules.upcast_bfloat16
    monkeypatch.setattr(_rules, "upcast_bfloat16", lambda *a: upcasts.append(original(*a)) or upcasts[-1])
    with torch.no_grad():
        got = _flat(ours(x, state))
        want_torch = _flat(ref(x, state))
        seq_state = (h[None], c[None]) if kind == "LSTM" else h[None]
        got_seq = _flat(seq(x[None], seq_state)[1])
        assert True not in upcasts  # no float32 copies made
        with cpp_config(bf16_rnn_step=False):
            got_off = _flat(ours(x, state))
        assert upcasts[-1] is True  # the copies, with the steps switched off
    for g, s, gs, t, o in zip(got, want_step, got_seq, want_torch, got_off):
        assert g.dtype == BF16 and g.shape == t.shape
        assert torch.equal(g, s) and torch.equal(gs[0], s)
        torch.testing.assert_close(g.float(), t.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(o.float(), t.float(), rtol=2e-2, atol=2e-2)
