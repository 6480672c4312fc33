"""The bfloat16 layer backward with its weight-sized products in bfloat16 (csrc/rnn/rnn_sequence.cpp: bf16_products,
on CPUs with AVX512_BF16; config bf16_products).

Its arithmetic against the float32 backward on upcast copies (the route of CPUs without native bfloat16, config off):
the time loop is the same float32 code on the same inputs, so dh0 / dc0 and the bias gradients are equal bit for bit;
dx, dW_ih and dW_hh come from the float32 gate gradients rounded to bfloat16 once, multiplied with float32 accumulation
and rounded once, so they stay within a few bfloat16 steps of the upcast route's (and differ from it: the bfloat16
products are the ones that ran). Over packed and reversed sequences, odd sizes, and the skipped-gradient flags."""
import pytest
import torch

from seqfast import _ext

from conftest import cpp_config

C = _ext.module()
pytestmark = pytest.mark.skipif(C is None or not C.bf16_rnn_step_available(),
                                reason="the bfloat16 products run on CPUs with AVX512_BF16")
BF16 = torch.bfloat16
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _layer(kind, sizes, I, H, reverse, seed):
    """Inputs of a layer's forward and backward (bfloat16), and the backward as a function of the need flags."""
    g = torch.Generator().manual_seed(seed)
    bs = torch.tensor(sizes, dtype=torch.int64)
    B, N, G = sizes[0], sum(sizes), GATES[kind]
    rnd = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(BF16)  # noqa: E731
    x, h0, c0 = rnd(N, I), rnd(B, H), rnd(B, H)
    w_ih, w_hh = rnd(G * H, I, s=I ** -0.5), rnd(G * H, H, s=H ** -0.5)
    b_ih, b_hh = rnd(G * H, s=0.1), rnd(G * H, s=0.1)
    go, ghn, gcn = rnd(N, H), rnd(B, H), rnd(B, H)
    if kind == "lstm":
        out, hn, cn, gates, cs = C.lstm_layer_forward(x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)
        backward = lambda *need: C.lstm_layer_backward(go, ghn, gcn, x, bs, h0, c0, w_ih, w_hh, out, gates, cs,  # noqa
                                                       reverse, *need)
    elif kind == "gru":
        out, hn, ws = C.gru_layer_forward(x, bs, h0, w_ih, w_hh, b_ih, b_hh, reverse)
        backward = lambda *need: C.gru_layer_backward(go, ghn, x, bs, h0, w_ih, w_hh, out, ws, reverse, *need)  # noqa
    else:
        out, hn = C.rnn_layer_forward(x, bs, h0, w_ih, w_hh, b_ih, b_hh, False, reverse)
        backward = lambda *need: C.rnn_layer_backward(go, ghn, x, bs, h0, w_ih, w_hh, out, False, reverse,  # noqa
                                                      *need)
    return backward


# (kind, batch sizes per step, I, H)
CASES = [("lstm", [10] * 6, 9, 20), ("lstm", [13, 13, 9, 4, 1], 33, 17), ("gru", [8] * 5, 16, 40),
         ("gru", [7, 5, 5, 2], 7, 130), ("rnn", [12] * 4, 64, 48), ("rnn", [9, 6, 3], 5, 33)]


@pytest.mark.parametrize("kind,sizes,I,H", CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_products_in_bfloat16_against_the_upcast_backward(kind, sizes, I, H, reverse):
    backward = _layer(kind, sizes, I, H, reverse, seed=len(sizes) * 100 + H)
    with cpp_config(bf16_products=True):
        got = backward()
    with cpp_config(bf16_products=False):
        want = backward()
    assert len(got) == len(want)
    # LSTM: (dx, dh0, dc0, dW_ih, dW_hh, db); GRU: (dx, dh0, dW_ih, dW_hh, db_ih, db_hh); RNN: (dx, dh0, dW_ih, dW_hh, db)
    products = {0, 3, 4} if kind == "lstm" else {0, 2, 3}
    differ = 0
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == BF16 and g.shape == w.shape, i
        if i in products:
            scale = w.float().abs().max().item() + 1e-3
            torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2 * scale)
            differ += int((g != w).any())
        else:  # the float32 time loop and the bias sums: the same code on the same inputs
            assert torch.equal(g, w), i
    assert differ > 0, "the bfloat16 products must be the ones that ran"


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_skipped_gradients_stay_undefined(kind):
    # the need flags (dx, dW_ih, dW_hh) hold on the bfloat16 route: skipped gradients are None, the rest unchanged
    backward = _layer(kind, [6, 6, 4], 11, 24, False, seed=3)
    with cpp_config(bf16_products=True):
        full = backward()
        part = backward(False, True, False)
    products = (0, 3, 4) if kind == "lstm" else (0, 2, 3)
    assert part[products[0]] is None and part[products[2]] is None
    assert torch.equal(part[products[1]], full[products[1]])
