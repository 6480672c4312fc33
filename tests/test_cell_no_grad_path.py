"""The no-grad cell step (seqfast.functional._rnn_cell._no_grad_kernel): a decoder step under no_grad /
inference_mode calls the C++ forward straight after the native checks. It must give torch's results, take the
regular path wherever that path decides something (grad mode, autocast, a rule preferring torch's op, a forced
backend, another dtype), and leave torch's errors as they were."""
import pytest
import torch

import seqfast
from conftest import assert_raises_like_torch
from seqfast import _ext, _rules

pytestmark = pytest.mark.skipif(_ext.module() is None or not _ext.module().rnn_kernels_supported(),
                                reason="seqfast._C not built or its RNN kernels do not run on this CPU")

CELLS = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {}), ("RNNCell", {"nonlinearity": "relu"})]


def _pair(kind, kw, dtype=torch.float32, bias=True, input_size=5, hidden=7):
    ref = getattr(torch.nn, kind)(input_size, hidden, bias=bias, **kw).to(dtype)
    mod = getattr(seqfast.nn, kind)(input_size, hidden, bias=bias, **kw).to(dtype)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def _states(kind, batch, hidden=7, dtype=torch.float32):
    shape = (batch, hidden) if batch else (hidden,)
    if kind == "LSTMCell":
        return (torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype))
    return torch.randn(shape, dtype=dtype)


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("kind,kw", CELLS)
@pytest.mark.parametrize("batch", [1, 3, 40, 0])  # 0: unbatched
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch(kind, kw, batch, bias, dtype, no_grad_kernel_calls):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw, dtype, bias)
    x = torch.randn((batch, 5) if batch else (5,), dtype=dtype)
    hx = _states(kind, batch, dtype=dtype)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            before = len(no_grad_kernel_calls)
            got, want = _flat(mod(x, hx)), _flat(ref(x, hx))
            assert len(no_grad_kernel_calls) == before + 1  # this call took the no-grad path
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_strided_states_and_weights(no_grad_kernel_calls):
    """Arguments as they come (transposed views, a stride-0 bias): the C++ entry makes them dense."""
    torch.manual_seed(0)
    w_ih, w_hh = torch.randn(5, 28).t(), torch.randn(7, 28).t()
    b_ih, b_hh = torch.randn(1).expand(28), torch.randn(28)
    x, h, c = torch.randn(5, 3).t(), torch.randn(7, 3).t(), torch.randn(3, 14)[:, ::2]
    with torch.no_grad():
        got = seqfast.functional.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
        want = torch._VF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    assert no_grad_kernel_calls == ["lstm_cell"]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_regular_path_where_it_decides(no_grad_kernel_calls):
    torch.manual_seed(0)
    ref, mod = _pair("LSTMCell", {})
    x, hx = torch.randn(3, 5), _states("LSTMCell", 3)
    # grad mode: autograd records the op
    out = mod(x, hx)
    assert out[0].requires_grad and no_grad_kernel_calls == []
    with torch.no_grad():
        # float64 input against float32 weights: the regular path raises torch's error
        assert_raises_like_torch(ref, mod, (x.double(), tuple(h.double() for h in hx)), same_message=False)
        # a rule preferring torch's op for this cell in inference
        saved = list(_rules.RULES)
        try:
            _rules.set_rules([_rules.Rule("lstm_cell", torch.float32, (_rules.cpu_class(),), training=False,
                                          source="test")])
            torch.testing.assert_close(mod(x, hx), ref(x, hx))
        finally:
            _rules.set_rules(saved)
        assert no_grad_kernel_calls == []
        # a forced backend
        with seqfast.use_backend("reference"):
            torch.testing.assert_close(mod(x, hx), ref(x, hx))
        assert no_grad_kernel_calls == []
        # autocast: the op picks its dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mod(x, hx)
        assert no_grad_kernel_calls == []
        mod(x, hx)
        assert no_grad_kernel_calls == ["lstm_cell"]


@pytest.mark.parametrize("kind,kw", CELLS)
def test_errors_as_torch(kind, kw):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw)
    lstm = kind == "LSTMCell"
    bad = [
        (torch.randn(3, 4), _states(kind, 3)),  # input size
        (torch.randn(3, 5), _states(kind, 2)),  # batch
        (torch.randn(3, 5), (torch.randn(3, 6), torch.randn(3, 7)) if lstm else torch.randn(3, 6)),  # hidden size
        (torch.randn(3, 5), (torch.randn(3, 7), torch.randn(3, 6)) if lstm else torch.randn(3, 8)),
    ]
    with torch.no_grad():
        for args in bad:
            assert_raises_like_torch(ref, mod, args)
