"""Every tensor a seqfast._C kernel reads through a raw pointer is checked (shape, dtype: RuntimeError naming the
argument) and made contiguous: strided or expand()-ed biases and weights give the same results as dense ones (before,
GRU/RNN layers and every cell read them as dense and were off), and short biases / weights, inconsistent batch sizes
and unbroadcastable masks raise instead of reading out of bounds."""
import pytest
import torch

from seqfast import _ext

_C = _ext.module()
pytestmark = pytest.mark.skipif(_C is None, reason="seqfast._C not built")

I, H, B, T = 5, 12, 3, 4
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _weights(kind, g):
    G = GATES[kind]
    return torch.randn(G * H, I, generator=g), torch.randn(G * H, H, generator=g), torch.randn(G * H, generator=g)


def _layouts(w_ih, w_hh, b):
    """(name, w_ih, w_hh, b_ih, b_hh) with the same values in non-dense layouts."""
    G = b.numel()
    strided_b = torch.stack([b, torch.zeros_like(b)], 1)[:, 0]          # stride 2
    expanded_b = b[:1].expand(G)                                         # stride 0
    return [
        ("strided_bias", w_ih, w_hh, strided_b, strided_b, b, b),
        ("expanded_bias", w_ih, w_hh, expanded_b, expanded_b, b[:1].repeat(G), b[:1].repeat(G)),
        ("transposed_weights", w_ih.t().contiguous().t(), w_hh.t().contiguous().t(), b, b, b, b),
    ]


def _cell(kind, x, h, c, w_ih, w_hh, b_ih, b_hh):
    if kind == "lstm":
        return _C.lstm_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh)[:2]
    if kind == "gru":
        return _C.gru_cell_forward(x, h, w_ih, w_hh, b_ih, b_hh)[:1]
    return (_C.rnn_cell_forward(x, h, w_ih, w_hh, b_ih, b_hh, False),)


def _layer(kind, x, bs, h, c, w_ih, w_hh, b_ih, b_hh):
    if kind == "lstm":
        return _C.lstm_layer_forward(x, bs, h, c, w_ih, w_hh, b_ih, b_hh, False)[:3]
    if kind == "gru":
        return _C.gru_layer_forward(x, bs, h, w_ih, w_hh, b_ih, b_hh, False)[:2]
    return _C.rnn_layer_forward(x, bs, h, w_ih, w_hh, b_ih, b_hh, False, False)


@pytest.mark.parametrize("kind", GATES)
@pytest.mark.parametrize("batch", [1, 3, 20])
def test_non_dense_biases_and_weights_match_dense(kind, batch):
    g = torch.Generator().manual_seed(0)
    w_ih, w_hh, b = _weights(kind, g)
    x, h, c = torch.randn(batch, I, generator=g), torch.randn(batch, H, generator=g), torch.randn(batch, H, generator=g)
    xs = torch.randn(T * batch, I, generator=g)
    bs = torch.full((T,), batch, dtype=torch.long)
    for name, wi, wh, bi, bh, bi_dense, bh_dense in _layouts(w_ih, w_hh, b):
        want = _cell(kind, x, h, c, wi.contiguous(), wh.contiguous(), bi_dense, bh_dense)
        got = _cell(kind, x, h, c, wi, wh, bi, bh)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, msg=f"{kind} cell, {name}")
        want = _layer(kind, xs, bs, h, c, wi.contiguous(), wh.contiguous(), bi_dense, bh_dense)
        got = _layer(kind, xs, bs, h, c, wi, wh, bi, bh)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, msg=f"{kind} layer, {name}")


@pytest.mark.parametrize("kind", GATES)
def test_short_bias_or_weight_raises(kind):
    g = torch.Generator().manual_seed(0)
    w_ih, w_hh, b = _weights(kind, g)
    x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
    with pytest.raises(RuntimeError, match="bias_ih"):
        _cell(kind, x, h, c, w_ih, w_hh, b[:-1], b)
    with pytest.raises(RuntimeError, match="weight_hh"):
        _cell(kind, x, h, c, w_ih, w_hh[:-1], b, b)
    with pytest.raises(RuntimeError, match="weight_ih"):
        _cell(kind, x, h, c, w_ih[:, :-1], w_hh, b, b)
    bs = torch.full((T,), B, dtype=torch.long)
    with pytest.raises(RuntimeError, match="bias_hh"):
        _layer(kind, torch.randn(T * B, I), bs, h, c, w_ih, w_hh, b, b[:2])
    with pytest.raises(RuntimeError, match="weight_hh"):
        _layer(kind, torch.randn(T * B, I), bs, h, c, w_ih, w_hh[:, :-1], b, b)


@pytest.mark.parametrize("batch_sizes, rows", [
    ([3, 3, 3, 9], 18),   # increasing
    ([3, 3, 3], 12),      # sums past the rows of x
    ([3, 3, 3], 6),       # sums short of them
    ([5, 2], 7),          # first size above h0's rows
    ([3, -1, 1], 3),      # negative
])
@pytest.mark.parametrize("kind", GATES)
def test_inconsistent_batch_sizes_raise(kind, batch_sizes, rows):
    g = torch.Generator().manual_seed(0)
    w_ih, w_hh, b = _weights(kind, g)
    with pytest.raises(RuntimeError, match="batch_sizes"):
        _layer(kind, torch.randn(rows, I), torch.tensor(batch_sizes), torch.randn(B, H), torch.randn(B, H),
               w_ih, w_hh, b, b)


def test_sdpa_rejects_mismatched_shapes():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(RuntimeError, match="k's last dimension"):
        _C.sdpa_forward(q, k[..., :4], v, None, False, 1.0)
    with pytest.raises(RuntimeError, match="v must have as many keys"):
        _C.sdpa_forward(q, k, v[:, :, :3], None, False, 1.0)
    with pytest.raises(RuntimeError, match="heads"):
        _C.sdpa_forward(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8), None, False, 1.0)
    with pytest.raises(RuntimeError, match="bias must be"):
        _C.sdpa_forward(q, k, v, torch.zeros(1, 4, 5, 3), False, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        _C.sdpa_forward(q, k, v, torch.zeros(1, 4, 5, 6, dtype=torch.float64), False, 1.0)
    out, lse = _C.sdpa_forward(q, k, v, torch.zeros(1, 1, 1, 1).expand(1, 4, 5, 6), False, 1.0)  # expanded: fine
    with pytest.raises(RuntimeError, match="grad_out"):
        _C.sdpa_backward(out[..., :4], q, k, v, out, lse, None, False, 1.0)


@pytest.mark.parametrize("mask_shape", [(1, 9), (4, 1), (9,)])
def test_additive_attention_broadcasts_masks(mask_shape):
    g = torch.Generator().manual_seed(0)
    N, S, A, Dv = 4, 9, 6, 5
    qp, kp, v, values = (torch.randn(N, A, generator=g), torch.randn(N, S, A, generator=g), torch.randn(A, generator=g),
                         torch.randn(N, S, Dv, generator=g))
    mask = torch.rand(mask_shape, generator=g) > 0.3
    mask.view(-1)[0] = True
    ctx, w = _C.additive_attention_forward(qp, kp, v, values, mask)
    ctx_full, w_full = _C.additive_attention_forward(qp, kp, v, values, mask.expand(N, S).contiguous())
    torch.testing.assert_close(ctx, ctx_full)
    torch.testing.assert_close(w, w_full)


@pytest.mark.parametrize("mask_shape", [(4, 4), (2, 9), (1, 4000)])
def test_additive_attention_rejects_unbroadcastable_masks(mask_shape):
    N, S, A, Dv = 4, 9, 6, 5
    with pytest.raises(RuntimeError, match="mask"):
        _C.additive_attention_forward(torch.randn(N, A), torch.randn(N, S, A), torch.randn(A), torch.randn(N, S, Dv),
                                      torch.ones(mask_shape, dtype=torch.bool))
