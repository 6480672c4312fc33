"""The cell modules behave as torch's: constructor, parameters, state_dict both ways, unbatched input, omitted
states, errors; the C++ path passes float64 gradcheck; the custom ops pass torch.library.opcheck."""
import pytest
import torch

import seqfast
from conftest import assert_raises_like_torch
from seqfast.ops import rnn_cell as cell_ops

PAIRS = [(seqfast.nn.LSTMCell, torch.nn.LSTMCell), (seqfast.nn.GRUCell, torch.nn.GRUCell),
         (seqfast.nn.RNNCell, torch.nn.RNNCell)]


@pytest.mark.parametrize("ours_cls,torch_cls", PAIRS)
def test_state_dict_both_ways_and_isinstance(ours_cls, torch_cls):
    ours, theirs = ours_cls(6, 9, bias=False), torch_cls(6, 9, bias=False)
    assert isinstance(ours, torch_cls)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("ours_cls,torch_cls", PAIRS)
def test_unbatched_and_default_state(ours_cls, torch_cls):
    ours, theirs = ours_cls(4, 5), torch_cls(4, 5)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4)
    for args in [(x,), (torch.randn(2, 4),)]:
        a, b = ours(*args), theirs(*args)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert u.shape == v.shape
            torch.testing.assert_close(u, v)
    state = (torch.randn(5), torch.randn(5)) if torch_cls is torch.nn.LSTMCell else torch.randn(5)
    a, b = ours(x, state), theirs(x, state)
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("ours_cls,torch_cls", PAIRS)
@pytest.mark.parametrize("how", ["parametrize", "weight_norm"])
def test_reparametrized_weights(ours_cls, torch_cls, how):
    """The cell reads its weights as nn.Module would: a parametrization (torch.nn.utils.parametrize, which moves the
    parameter out of _parameters) or an old-style weight_norm hook (which sets a plain attribute before forward)
    gives the same result and gradients as torch's cell with the same reparametrization."""
    torch.manual_seed(0)
    ours, theirs = ours_cls(4, 5).double(), torch_cls(4, 5).double()
    ours.load_state_dict(theirs.state_dict())

    class Scale(torch.nn.Module):
        def forward(self, w):
            return 0.5 * w

    for module in (ours, theirs):
        if how == "parametrize":
            torch.nn.utils.parametrize.register_parametrization(module, "weight_hh", Scale())
        else:
            torch.nn.utils.weight_norm(module, "weight_ih")
    x = torch.randn(3, 4, dtype=torch.float64)
    a, b = ours(x), theirs(x)
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)
    sum(u.sum() for u in a).backward()
    sum(v.sum() for v in b).backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def _bad_calls(torch_cls):
    h = lambda *s: (torch.randn(*s), torch.randn(*s)) if torch_cls is torch.nn.LSTMCell else torch.randn(*s)  # noqa
    return [
        (torch.randn(2, 5), None),            # wrong input size
        (torch.randn(2, 8), h(3, 16)),        # batch mismatch
        (torch.randn(2, 8), h(2, 4)),         # wrong hidden size
        (torch.randn(2, 3, 8), None),         # 3-D input
        (torch.randn(8), h(2, 16)),           # unbatched input, batched state
        (torch.randn(2, 8), h(2, 16, 1)),     # 3-D state
        (torch.randn(2, 8, dtype=torch.float64), None),  # dtype mismatch with the weights
    ]


@pytest.mark.parametrize("ours_cls,torch_cls", PAIRS)
@pytest.mark.parametrize("case", range(7))
def test_errors_match_torch(ours_cls, torch_cls, case):
    ours, theirs = ours_cls(8, 16), torch_cls(8, 16)
    x, state = _bad_calls(torch_cls)[case]
    # the shape messages are torch's own; the dtype one names the argument instead
    assert_raises_like_torch(theirs, ours, (x,) if state is None else (x, state), same_message=case < 6)


def test_lstm_cell_needs_two_states():
    with pytest.raises(RuntimeError, match="two hidden states"):
        seqfast.nn.LSTMCell(3, 4)(torch.randn(2, 3), (torch.randn(2, 4),))


@pytest.mark.parametrize("grad", [False, True])
def test_lstm_cell_unbatched_state_tuples_as_torch(grad):
    # torch's LSTMCell reads hx[0] and hx[1] of an unbatched call: one state raises IndexError, a third is ignored
    ours, theirs = seqfast.nn.LSTMCell(3, 4), torch.nn.LSTMCell(3, 4)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3)
    with torch.set_grad_enabled(grad):
        with pytest.raises(IndexError):
            theirs(x, (torch.randn(4),))
        with pytest.raises(IndexError):
            ours(x, (torch.randn(4),))
        states = (torch.randn(4), torch.randn(4), torch.randn(5))
        for got, want in zip(ours(x, states), theirs(x, states)):
            torch.testing.assert_close(got, want)


def test_unknown_nonlinearity():
    with pytest.raises(RuntimeError, match="Unknown nonlinearity"):  # torch checks at forward time too
        seqfast.nn.RNNCell(3, 4, nonlinearity="gelu")(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="Unknown nonlinearity"):
        seqfast.functional.rnn_cell(torch.randn(1, 3), torch.randn(1, 4), torch.randn(4, 3), torch.randn(4, 4),
                                    nonlinearity="gelu")


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        with seqfast.use_backend("cuda"):
            pass


def _cell_args(kind, dtype=torch.float64, batch=3, input_size=4, hidden=5, bias=True):
    g = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    x = torch.randn(batch, input_size, dtype=dtype, requires_grad=True)
    states = [torch.randn(batch, hidden, dtype=dtype, requires_grad=True) for _ in range(2 if kind == "lstm" else 1)]
    w_ih = torch.randn(g * hidden, input_size, dtype=dtype, requires_grad=True)
    w_hh = torch.randn(g * hidden, hidden, dtype=dtype, requires_grad=True)
    b = [torch.randn(g * hidden, dtype=dtype, requires_grad=True) if bias else None for _ in range(2)]
    return [x, *states, w_ih, w_hh, *b] + ([True] if kind == "rnn" else [])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_cpp_float64(kind, bias):
    op = getattr(cell_ops, f"{kind}_cell")
    args = _cell_args(kind, bias=bias)
    if kind == "rnn":
        args[-1] = False  # tanh: smooth everywhere, gradcheck-friendly

    def f(*a):
        out = op(*a)
        return out[: (2 if kind == "lstm" else 1)] if isinstance(out, tuple) else out

    with seqfast.use_backend("cpp"):
        assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_opcheck_custom_ops(kind):
    """Schema, fake implementation, and autograd registration of the torch.compile path."""
    op = getattr(cell_ops, f"{kind}_cell").op
    for bias in (True, False):
        torch.library.opcheck(op, tuple(_cell_args(kind, torch.float32, bias=bias)))


def test_backends_run_their_own_kernels():
    """Forcing a backend runs that backend's kernel for every fused op: no silent fall back to the reference."""
    from seqfast import _ext
    from seqfast.ops import additive_attention, attention, rnn_sequence
    from conftest import HAVE_TRITON, backend_device
    assert _ext.available(), "seqfast._C did not load: `make build`"
    ops = [cell_ops.lstm_cell, cell_ops.gru_cell, cell_ops.rnn_cell, rnn_sequence.lstm_layer, rnn_sequence.gru_layer,
           rnn_sequence.rnn_layer, attention.sdpa, additive_attention.additive_attention]
    for backend in ["cpp"] + (["triton"] if HAVE_TRITON else []):
        t = torch.zeros(1, device=backend_device(backend))
        with seqfast.use_backend(backend):
            for op in ops:
                ours, reference = op.kernels_for(t), op.kernels("reference")
                assert ours.forward is not reference.forward, (backend, op.name)
                assert ours.backward is not reference.backward, (backend, op.name)


def test_cpu_without_the_kernels_isa_runs_the_reference(monkeypatch):
    """On an x86 CPU without AVX2+FMA the C++ RNN kernels refuse to run: the op then takes the reference."""
    from seqfast import _ext
    from seqfast.ops.fused_op import FusedOp

    class NoAVX2:
        lstm_cell_forward = staticmethod(_ext.module().lstm_cell_forward)

        @staticmethod
        def rnn_kernels_supported():
            return False

    build = FusedOp._cpp_builder(lambda C: C.lstm_cell_forward, "rnn_kernels_supported")
    assert build() is _ext.module().lstm_cell_forward
    monkeypatch.setattr(_ext, "_C", NoAVX2)
    assert build() is None  # FusedOp.kernels() then gives the reference's table


def _functional_calls():
    """(gates, (input, h, c, w_ih, w_hh, b_ih, b_hh)) for the functional cells: good, bad and odd layouts."""
    r = torch.randn
    calls = []
    for gates in (4, 3, 1):
        g = gates * 4
        c = r(2, 4) if gates == 4 else None
        good = (r(2, 3), r(2, 4), c, r(g, 3), r(g, 4), r(g), r(g))
        cases = [
            good,
            (r(2, 5),) + good[1:],                                    # input size
            (r(2, 3), r(3, 4), c) + good[3:],                         # batch
            (r(2, 3), r(2, 5), c) + good[3:],                         # hidden size
            (r(2, 3), r(2, 4, 1), c) + good[3:],                      # 3-D state
            (r(2, 3), r(2), c) + good[3:],                            # 1-D state (IndexError)
            (r(3),) + good[1:],                                       # 1-D input (IndexError)
            good[:3] + (r(g + 1, 3),) + good[4:],                     # weight rows: torch's op decides
            good[:5] + (r(g, 1), r(g)),                               # 2-D bias: torch's op decides
            good[:5] + (None, None),                                  # no biases
            good[:3] + (r(g, 3, dtype=torch.float64),) + good[4:],    # weight dtype
            good[:5] + (r(g), r(g, dtype=torch.float64)),             # bias dtype
            (r(2, 3), r(2, 4, dtype=torch.float64), c) + good[3:],    # state dtype
        ]
        if gates == 4:
            cases.append((r(2, 3), r(2, 4), r(3, 4)) + good[3:])     # cell-state batch
        calls += [(gates, args) for args in cases]
    return calls


@pytest.mark.skipif(not seqfast._ext.available(), reason="needs the C++ extension")
@pytest.mark.parametrize("index", range(len(_functional_calls())))
def test_cpp_cell_checks_match_python_twin(index):
    """seqfast.functional's cells check their arguments in C++ where the extension loaded: the same outcome (True /
    False) or the same exception type and message as the Python twin, which serves without the extension."""
    from seqfast.functional import _rnn_cell as checks
    gates, (input, h, c, w_ih, w_hh, b_ih, b_hh) = _functional_calls()[index]

    def outcome(fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the comparison is the point
            return type(exc), str(exc)

    native = outcome(lambda: checks._check(gates, input, h, c, w_ih, w_hh, b_ih, b_hh))
    assert checks._native_check  # the C++ twin ran
    python = outcome(lambda: checks._check_cell(checks._NAMES[gates], gates, input, (h,) if c is None else (h, c),
                                                w_ih, w_hh, b_ih, b_hh))
    if isinstance(python, tuple) and python[0] is IndexError:
        assert native[0] is IndexError  # a missing dimension: the messages are Python's and c10's own
    else:
        assert native == python


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("c_dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_lstm_cell_state_of_another_float_dtype_promotes_as_torch(c_dtype, grad):
    """torch's LSTMCell mixes a cell state of another floating dtype into its pointwise part (float64 outputs for a
    float64 c, float32 for a bfloat16 / float16 one) instead of raising."""
    ref = torch.nn.LSTMCell(8, 4)
    mod = seqfast.nn.LSTMCell(8, 4)
    mod.load_state_dict(ref.state_dict())
    x, h, c = torch.randn(3, 8), torch.randn(3, 4), torch.randn(3, 4).to(c_dtype)
    with torch.set_grad_enabled(grad):
        want, got = ref(x, (h, c)), mod(x, (h, c))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
