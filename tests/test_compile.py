"""torch.compile(fullgraph=True) through seqfast modules (no graph breaks, same values and gradients, no recompile
per sequence length), and torch.autocast: seqfast runs in the autocast dtype where torch's modules do.

The compile tests use the aot_eager backend (Dynamo + AOTAutograd: every custom op's fake implementation and
registered autograd formula are exercised) plus one inductor run; fullgraph=True turns any graph break into an
error."""
import copy
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import seqfast
from seqfast.patching import replace_modules

try:
    from seqfast.nn.attention import BahdanauAttention, LuongAttention, MultiheadAttention
except ImportError:
    BahdanauAttention = LuongAttention = MultiheadAttention = None

needs_attention = pytest.mark.skipif(MultiheadAttention is None, reason="seqfast attention modules not available")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class RecurrentNet(torch.nn.Module):
    """Sequence modules (LSTM, bidirectional GRU, RNN) and a decoder loop over the three cells."""

    def __init__(self, i=5, h=8, steps=3):
        super().__init__()
        self.steps = steps
        self.lstm = torch.nn.LSTM(i, h, batch_first=True)
        self.gru = torch.nn.GRU(h, h, bidirectional=True)
        self.rnn = torch.nn.RNN(2 * h, h, num_layers=2)
        self.lstm_cell = torch.nn.LSTMCell(h, h)
        self.gru_cell = torch.nn.GRUCell(h, h)
        self.rnn_cell = torch.nn.RNNCell(h, h, nonlinearity="relu")
        self.head = torch.nn.Linear(h, 3)

    def forward(self, x):  # x [B, T, i]
        y, (hn, cn) = self.lstm(x)
        y, _ = self.gru(y.transpose(0, 1))
        y, _ = self.rnn(y)
        h, c = hn[0], cn[0]
        outs = []
        for _ in range(self.steps):
            h, c = self.lstm_cell(y[-1], (h, c))
            h = self.gru_cell(h, h)
            h = self.rnn_cell(h)
            outs.append(self.head(h))
        return torch.stack(outs, 1), y


def _pair(cls=RecurrentNet, **kwargs):
    torch_model = cls(**kwargs)
    return torch_model, replace_modules(copy.deepcopy(torch_model))


def _grads(model):
    model = getattr(model, "_orig_mod", model)  # a compiled module's parameters are the original's
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _run(model, x):
    model.zero_grad()
    out = model(x)
    loss = sum((o.float() ** 2).mean() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    return out, _grads(model)


def _assert_same(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_fullgraph_same_values_and_gradients():
    torch_model, model = _pair()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(2, 6, 5)
    out_ref, grads_ref = _run(torch_model, x)
    out_eager, grads_eager = _run(model, x)
    out, grads = _run(compiled, x)
    assert counter.frame_count == 1
    _assert_same(out, out_eager)
    _assert_same(grads, grads_eager)
    _assert_same(out, out_ref)
    _assert_same(grads, grads_ref)
    # the graph holds seqfast's custom ops, not a fallback
    targets = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("seqfast" in t for t in targets), targets


def test_dynamic_sequence_length_compiles_once():
    _, model = _pair(steps=1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    for T in (3, 4, 7, 9):
        x = torch.randn(2, T, 5)
        out, grads = _run(compiled, x)
        out_eager, grads_eager = _run(model, x)
        _assert_same(out, out_eager)
        _assert_same(grads, grads_eager)
        if T == 3:
            # (dynamic=True makes the modules' float dropout symbolic and Dynamo restarts its analysis once to
            # specialise it: the backend may be called twice for the first frame, which is not a recompile)
            first = counter.frame_count
    assert counter.frame_count == first, "recompiled for a new sequence length"


def test_automatic_dynamic_does_not_recompile_per_length():
    # default dynamic=None: the first new length recompiles with a symbolic length, the rest reuse it
    _, model = _pair(steps=1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        for T in (3, 4, 5, 6, 8, 11):
            x = torch.randn(2, T, 5)
            _assert_same(compiled(x), model(x))
    assert counter.frame_count <= 2


def test_inductor_same_values_and_gradients():
    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 8, batch_first=True)
            self.cell = torch.nn.GRUCell(8, 8)

        def forward(self, x):
            y, (h, _) = self.lstm(x)
            return self.cell(y[:, -1], h[0])

    torch_model, model = _pair(Small)
    compiled = torch.compile(model, fullgraph=True)  # default backend: inductor
    x = torch.randn(3, 5, 4)
    out_ref, grads_ref = _run(torch_model, x)
    out, grads = _run(compiled, x)
    _assert_same(out, out_ref, rtol=1e-4, atol=1e-5)
    _assert_same(grads, grads_ref, rtol=1e-4, atol=1e-5)


def test_functional_ops_compile():
    x, h, c = torch.randn(3, 4), torch.randn(3, 6), torch.randn(3, 6)
    w_ih, w_hh, b = torch.randn(24, 4), torch.randn(24, 6), torch.randn(24)

    def step(x, h, c):
        return seqfast.functional.lstm_cell(x, (h, c), w_ih, w_hh, b, b)

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, h, c)
    _assert_same(out, torch._VF.lstm_cell(x, (h, c), w_ih, w_hh, b, b))


class AttentionNet(torch.nn.Module):
    def __init__(self, e=8, heads=2):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(e, heads, batch_first=True)
        self.proj = torch.nn.Linear(e, e)

    def forward(self, x, mask):
        y, _ = self.mha(x, x, x, key_padding_mask=mask, need_weights=False)
        q = self.proj(y).unflatten(-1, (2, -1)).transpose(1, 2)
        z = seqfast.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return y, z


@needs_attention
def test_first_rule_lookup_inside_a_trace(monkeypatch):
    """The rule table's CPU-class memo may first be filled while Dynamo traces (a compiled model as a process's first
    seqfast call): torch.cpu's feature checks cannot be traced, so the dispatch must not reach them then."""
    from seqfast import _rules
    monkeypatch.setattr(_rules, "_covered", None)
    _rules.cpu_class.cache_clear()
    q = torch.randn(1, 2, 5, 8)
    compiled = torch.compile(lambda t: seqfast.functional.scaled_dot_product_attention(t, t, t, is_causal=True),
                             fullgraph=True, backend="aot_eager")
    _assert_same(compiled(q), torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    bf = torch.randn(4, 9, 6).bfloat16()  # the bfloat16 upcast check reads the CPU class too
    rnn = seqfast.nn.GRU(6, 8).bfloat16()
    torch.compile(rnn, fullgraph=True, backend="aot_eager")(bf)


@needs_attention
def test_attention_fullgraph_and_dynamic():
    torch_model, model = _pair(AttentionNet)
    assert type(model.mha) is MultiheadAttention
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    first = None
    for S in (5, 7, 4):
        x = torch.randn(2, S, 8)
        mask = torch.zeros(2, S, dtype=torch.bool)
        mask[1, -2:] = True
        model.zero_grad()
        y, z = compiled(x, mask)
        ((y ** 2).mean() + (z ** 2).mean()).backward()
        grads = _grads(model)
        torch_model.zero_grad()
        y_ref, _ = torch_model.mha(x, x, x, key_padding_mask=mask, need_weights=False)
        q = torch_model.proj(y_ref).unflatten(-1, (2, -1)).transpose(1, 2)
        z_ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        ((y_ref ** 2).mean() + (z_ref ** 2).mean()).backward()
        _assert_same((y, z), (y_ref, z_ref))
        _assert_same(grads, _grads(torch_model))
        first = counter.frame_count if first is None else first
    assert counter.frame_count == first, "recompiled for a new sequence length"


@needs_attention
def test_decoder_attention_fullgraph():
    luong, bahdanau = LuongAttention(8, 6, score="general"), BahdanauAttention(8, 6, 5)

    def step(q, keys, mask):
        c1, w1 = luong(q, keys, mask)
        c2, w2 = bahdanau(q, keys, mask)
        return c1 + c2, w1 * w2

    q, keys = torch.randn(3, 8, requires_grad=True), torch.randn(3, 4, 6, requires_grad=True)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 3] = False
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(q, keys, mask)
    ref = step(q, keys, mask)
    _assert_same(out, ref)
    g = torch.autograd.grad(sum(o.sum() for o in out), (q, keys))
    g_ref = torch.autograd.grad(sum(o.sum() for o in ref), (q, keys))
    _assert_same(g, g_ref)


# ---------------------------------------------------------------------------------------------------------------
# autocast: the output dtype of each seqfast module equals torch's under the same autocast, and the values are
# within bf16 rounding of the float32 result.

def _cases():
    cases = [
        ("LSTM", lambda: torch.nn.LSTM(8, 8), lambda m, x: m(x)[0]),
        ("GRU", lambda: torch.nn.GRU(8, 8), lambda m, x: m(x)[0]),
        ("RNN", lambda: torch.nn.RNN(8, 8), lambda m, x: m(x)[0]),
        ("LSTMCell", lambda: torch.nn.LSTMCell(8, 8), lambda m, x: m(x[0])[0]),
        ("GRUCell", lambda: torch.nn.GRUCell(8, 8), lambda m, x: m(x[0])),
        ("RNNCell", lambda: torch.nn.RNNCell(8, 8), lambda m, x: m(x[0])),
    ]
    if MultiheadAttention is not None:
        cases.append(("MultiheadAttention", lambda: torch.nn.MultiheadAttention(8, 2),
                      lambda m, x: m(x, x, x, need_weights=False)[0]))
    return cases


@pytest.mark.parametrize("name, build, call", _cases(), ids=[c[0] for c in _cases()])
def test_autocast_cpu_bfloat16_dtype_matches_torch(name, build, call):
    torch_module = build()
    module = replace_modules(copy.deepcopy(torch_module))
    x = torch.randn(5, 3, 8)
    expected32 = call(torch_module, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(module, x)
            try:
                ref_dtype = call(torch_module, x).dtype
            except RuntimeError as exc:
                # torch's oneDNN LSTM has no bfloat16 primitive on CPUs without AVX512_BF16 (seen on AMD Zen 3):
                # torch fails there; seqfast runs, in the dtype torch gives where it works
                if "primitive descriptor" not in str(exc):
                    raise
                ref_dtype = torch.bfloat16
    assert out.dtype == ref_dtype, f"{name}: seqfast gives {out.dtype} under autocast, torch {ref_dtype}"
    torch.testing.assert_close(out.float(), expected32, rtol=5e-2, atol=5e-2)


def test_autocast_cpu_sdpa_dtype_matches_torch():
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = seqfast.functional.scaled_dot_product_attention(q, k, v)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=5e-2, atol=5e-2)


def test_autocast_backward_gives_float32_parameter_grads():
    torch_model, model = _pair(steps=1)
    x = torch.randn(2, 4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (torch_model, model):
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out, _ = m(x)
            except RuntimeError as exc:
                # torch's oneDNN LSTM has no bfloat16 primitive on CPUs without AVX512_BF16 (seen on AMD Zen 3):
                # compare with torch's float32 gradients instead (within the same bfloat16 tolerance)
                if m is model or "primitive descriptor" not in str(exc):
                    raise
                out, _ = m(x)
            out.float().pow(2).mean().backward()
    for (name, p), q in zip(torch_model.named_parameters(), model.parameters()):
        assert q.grad.dtype == p.grad.dtype == torch.float32, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-1, atol=5e-2, msg=name)
