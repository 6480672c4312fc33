"""Inputs at the edges, each a case a careful user meets: strided / expanded parameters, broadcast masks, second-order
gradients, empty and degenerate sizes, mismatched dtypes. Each compares with torch or with torch's error."""
import pytest
import torch
from torch.func import functional_call

import seqfast

CELLS = ["LSTMCell", "GRUCell", "RNNCell"]
LAYERS = ["LSTM", "GRU", "RNN"]


def _pair(name, *args, dtype=torch.float64, **kw):
    ref = getattr(torch.nn, name)(*args, **kw).to(dtype)
    ours = getattr(seqfast.nn, name)(*args, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _expanded_biases(module):
    """The module's parameters with every bias replaced by one value expanded over its length (stride 0)."""
    return {n: (p[:1].expand(p.shape) if n.startswith("bias") else p) for n, p in module.named_parameters()}


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("name", CELLS)
def test_cells_with_expanded_and_strided_biases(name, backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    ref, ours = _pair(name, 3, 5, dtype=dtype)
    params = _expanded_biases(ours)
    x, h = torch.randn(4, 3, dtype=dtype), torch.randn(4, 5, dtype=dtype)
    hx = (h, h) if name == "LSTMCell" else h
    want = functional_call(ref, params, (x, hx))
    with seqfast.use_backend(backend):
        got = functional_call(ours, params, (x, hx))
        strided = {n: (torch.stack([p, p], -1)[..., 0] if n.startswith("bias") else p) for n, p in params.items()}
        got_strided = functional_call(ours, strided, (x, hx))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_strided, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LAYERS)
def test_layers_with_expanded_biases(name):
    ref, ours = _pair(name, 3, 5, num_layers=2, bidirectional=True)
    params = _expanded_biases(ours)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    want = functional_call(ref, params, (x,))
    got = functional_call(ours, params, (x,))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fn", ["lstm_cell", "gru_cell", "rnn_cell"])
def test_functional_cells_reject_short_weights_and_biases_as_torch(fn):
    G = {"lstm_cell": 4, "gru_cell": 3, "rnn_cell": 1}[fn]
    torch_fn = getattr(torch._VF, "rnn_tanh_cell" if fn == "rnn_cell" else fn)
    ours = getattr(seqfast.functional, fn)
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    hx = (h, h) if fn == "lstm_cell" else h
    w_ih, w_hh, b = torch.randn(G * 4, 3), torch.randn(G * 4, 4), torch.randn(G * 4)
    for args in [(x, hx, w_ih, w_hh[:-1], b, b), (x, hx, w_ih, w_hh, b[:-1], b), (x, hx, w_ih, w_hh, b, b[:-2]),
                 (x, hx, w_ih[:-1], w_hh, b, b)]:
        with pytest.raises(RuntimeError) as expected:
            torch_fn(*args)
        with pytest.raises(RuntimeError) as got:
            ours(*args)
        assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("cls", ["BahdanauAttention", "LuongAttention"])
@pytest.mark.parametrize("shape", [(1, 7), (3, 1), (1, 1)], ids=["1xS", "Bx1", "1x1"])
def test_decoder_attention_masks_broadcast(cls, shape):
    torch.manual_seed(0)
    attn = getattr(seqfast.nn, cls)(6, 6, 4) if cls == "BahdanauAttention" else seqfast.nn.LuongAttention(6)
    q, keys = torch.randn(3, 6), torch.randn(3, 7, 6)
    mask = torch.rand(shape) > 0.3
    mask.view(-1)[0] = True
    context, weights = attn(q, keys, mask)
    full_context, full_weights = attn(q, keys, mask.expand(3, 7).clone())
    torch.testing.assert_close(context, full_context)
    torch.testing.assert_close(weights, full_weights)
    assert (weights[~mask.expand(3, 7)] == 0).all()


@pytest.mark.parametrize("cls", ["BahdanauAttention", "LuongAttention"])
def test_decoder_attention_rejects_mask_of_another_length(cls):
    attn = getattr(seqfast.nn, cls)(6, 6, 4) if cls == "BahdanauAttention" else seqfast.nn.LuongAttention(6)
    q, keys = torch.randn(3, 6), torch.randn(3, 8, 6)
    with pytest.raises(ValueError, match="mask"):
        attn(q, keys, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        attn(q, keys, torch.ones(2, 8, dtype=torch.bool))


def _penalised_grads(module, x):
    module.zero_grad()
    x.grad = None
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    params = list(module.parameters())
    grads = torch.autograd.grad(out.pow(2).sum(), params + [x], create_graph=True)
    sum(g.pow(2).sum() for g in grads).backward()
    return [p.grad for p in params] + [x.grad]


@pytest.mark.parametrize("name,shape", [("LSTM", (4, 2, 3)), ("GRU", (4, 2, 3)), ("RNN", (4, 2, 3)),
                                        ("LSTMCell", (2, 3)), ("GRUCell", (2, 3)), ("RNNCell", (2, 3))])
def test_double_backward_gradient_penalty_matches_torch(name, shape):
    kw = {"num_layers": 2, "bidirectional": True} if name in LAYERS else {}
    ref, ours = _pair(name, 3, 4, **kw)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    want = _penalised_grads(ref, x)
    got = _penalised_grads(ours, x)
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, w)


def test_sdpa_double_backward_matches_the_math():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)

    def math_sdpa(q):  # torch's CPU flash kernel has no double backward: the plain formula
        s = (q @ q.transpose(-1, -2)) / 8 ** 0.5
        s = s.masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), float("-inf"))
        return s.softmax(-1) @ q

    results = []
    for f in (math_sdpa, lambda t: seqfast.functional.scaled_dot_product_attention(t, t, t, is_causal=True)):
        q.grad = None
        g, = torch.autograd.grad(f(q).pow(2).sum(), q, create_graph=True)
        g.pow(2).sum().backward()
        results.append(q.grad.clone())
    torch.testing.assert_close(*results)


def test_sdpa_head_dim_zero_gives_torch_result():
    q = torch.randn(1, 2, 3, 0)
    want = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    got = seqfast.functional.scaled_dot_product_attention(q, q, q)
    assert got.shape == want.shape


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_zero_heads_gives_empty_outputs_and_grads(backend, causal):
    """No heads at all (an empty batch of heads) is an empty call for torch: empty output, empty grads."""
    q, k, v = (torch.randn(1, 0, 70, 16, requires_grad=True) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    with seqfast.use_backend(backend):
        got = seqfast.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        got.sum().backward()
    assert got.shape == want.shape
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_sdpa_rejects_mask_of_another_float_dtype():
    q = torch.randn(1, 2, 3, 4)
    mask = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError) as expected:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    with pytest.raises(RuntimeError) as got:
        seqfast.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("name", LAYERS)
def test_zero_length_sequence_raises_as_torch(name):
    ref, ours = _pair(name, 3, 4)
    x = torch.zeros(0, 2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError) as expected:
        ref(x)
    with pytest.raises(RuntimeError) as got:
        ours(x)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("name", LAYERS)
def test_state_of_another_dtype_raises(name):
    ref, ours = _pair(name, 3, 4, dtype=torch.bfloat16)
    x, h = torch.randn(5, 2, 3, dtype=torch.bfloat16), torch.zeros(1, 2, 4)
    hx = (h, h) if name == "LSTM" else h
    with pytest.raises(RuntimeError):
        ref(x, hx)
    with pytest.raises(RuntimeError, match="dtype"):
        ours(x, hx)


@pytest.mark.parametrize("name", LAYERS)
def test_half_precision_runs_torchs_own_op(name):
    """No seqfast kernel (float16 on CPU): torch's native op runs, so results are torch's."""
    ref, ours = _pair(name, 3, 4, dtype=torch.float32)
    x = torch.randn(5, 2, 3)
    ref16, ours16 = ref.half(), ours.half()
    torch.testing.assert_close(ours16(x.half())[0], ref16(x.half())[0], rtol=0, atol=0)


def test_sequence_after_inference_mode_trains():
    """A padded sequence run first under torch.inference_mode, then in training: the per-shape tensors seqfast keeps
    between calls are normal tensors (an inference tensor cannot be saved for backward)."""
    lstm = seqfast.nn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    with torch.inference_mode():
        lstm(x)
    out, _ = lstm(x.requires_grad_())
    out.sum().backward()
    assert x.grad is not None and lstm.weight_hh_l0.grad is not None
