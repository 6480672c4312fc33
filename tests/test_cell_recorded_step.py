"""A cell module's training step recorded from C++ (csrc/rnn/rnn_cell_autograd.cpp): seqfast._C.CellCall runs the C++
kernels under a C++ autograd node instead of the Python path's autograd Function. Its outputs and gradients must be
torch.nn's (every gradient, partial requires_grad, an unused output, an input passed twice, double backward, float64
gradcheck), and whatever needs more than the kernels (a forward-mode tangent, a functorch transform) must still get
torch's results."""
import contextlib

import pytest
import torch

import seqfast

from conftest import CELL_KINDS as CELLS
from conftest import cell_pair as _pair
from conftest import cell_states as _states
from conftest import flat_outputs as _flat
from seqfast import _ext

pytestmark = pytest.mark.skipif(_ext.module() is None or not _ext.module().rnn_kernels_supported(),
                                reason="seqfast._C not built or its RNN kernels do not run on this CPU")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _recorded_here(out):
    """Whether the step was recorded by the C++ node (not torch's op, not the Python path's Function)."""
    return "CellStep" in _flat(out)[0].grad_fn.name()


@pytest.mark.parametrize("kind,kw", CELLS)
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_torch(kind, kw, batch, bias, dtype):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw, dtype, bias)
    x = torch.randn(batch, 5, dtype=dtype, requires_grad=True)
    hx = _states(kind, batch, dtype=dtype, grad=True)
    got, want = mod(x, hx), ref(x, hx)
    assert _recorded_here(got)
    states = list(hx) if kind == "LSTMCell" else [hx]
    inputs = [x] + states + list(ref.parameters())
    ours = [x] + states + list(mod.parameters())
    # every output used, with different weights, so each one's gradient counts
    g_out = [torch.randn_like(o) for o in _flat(want)]
    want_g = torch.autograd.grad(_flat(want), inputs, g_out)
    got_g = torch.autograd.grad(_flat(got), ours, g_out)
    for g, w in zip(_flat(got), _flat(want)):
        torch.testing.assert_close(g, w, **TOL[dtype])
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("kind,kw", CELLS)
def test_partial_requires_grad_and_unused_outputs(kind, kw):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw)
    for frozen in ([], ["weight_ih", "bias_ih"], ["weight_hh", "weight_ih", "bias_ih", "bias_hh"]):
        for name in frozen:
            getattr(mod, name).requires_grad_(False)
            getattr(ref, name).requires_grad_(False)
        for x_grad, h_grad in ((True, False), (False, True), (False, False)):
            if not x_grad and not h_grad and len(frozen) == 4:
                continue  # nothing requires grad: the no-grad step (test_cell_no_grad_path.py)
            x = torch.randn(3, 5, requires_grad=x_grad)
            hx = _states(kind, 3, grad=h_grad)
            got, want = mod(x, hx), ref(x, hx)
            assert _recorded_here(got)
            leaves = [t for t in [x] + (list(hx) if kind == "LSTMCell" else [hx]) if t.requires_grad]
            ours = leaves + [p for p in mod.parameters() if p.requires_grad]
            theirs = leaves + [p for p in ref.parameters() if p.requires_grad]
            # the first output only: an LSTM's c' gets no gradient (autograd passes none for it)
            got_g = torch.autograd.grad(_flat(got)[0].square().sum(), ours)
            want_g = torch.autograd.grad(_flat(want)[0].square().sum(), theirs)
            for g, w in zip(got_g, want_g):
                torch.testing.assert_close(g, w, **TOL[torch.float32])
        for p in list(mod.parameters()) + list(ref.parameters()):
            p.requires_grad_(True)


@pytest.mark.parametrize("kind,kw", CELLS)
def test_input_passed_as_state(kind, kw):
    """One tensor as the input and the state (input size = hidden size): its gradient sums both uses."""
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw, input_size=7)
    x = torch.randn(2, 7, requires_grad=True)
    hx = (x, x) if kind == "LSTMCell" else x
    got, want = mod(x, hx), ref(x, hx)
    assert _recorded_here(got)
    (gx,) = torch.autograd.grad(_flat(got)[0].sum(), x)
    (wx,) = torch.autograd.grad(_flat(want)[0].sum(), x)
    torch.testing.assert_close(gx, wx, **TOL[torch.float32])


@pytest.mark.parametrize("kind,kw", CELLS)
def test_double_backward(kind, kw):
    """A gradient penalty: backward with create_graph=True, then a backward through those gradients."""
    torch.manual_seed(0)
    results = []
    for module in _pair(kind, kw, torch.float64):
        torch.manual_seed(1)
        x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        hx = _states(kind, 3, dtype=torch.float64, grad=True)
        out = _flat(module(x, hx))
        assert isinstance(module, torch.nn.modules.rnn.RNNCellBase) and (
            type(module).__module__.startswith("torch") or _recorded_here(out[0]))
        params = list(module.parameters())
        grads = torch.autograd.grad(sum(o.square().sum() for o in out), [x] + params, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        results.append(torch.autograd.grad(penalty, [x] + params))
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


@pytest.mark.parametrize("kind,kw", CELLS)
def test_gradcheck(kind, kw):
    torch.manual_seed(0)
    _, mod = _pair(kind, kw, torch.float64, hidden=4, input_size=3)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    hx = _states(kind, 2, hidden=4, dtype=torch.float64, grad=True)
    states = list(hx) if kind == "LSTMCell" else [hx]
    assert _recorded_here(mod(x, hx))

    def step(x, *states):
        return mod(x, tuple(states) if kind == "LSTMCell" else states[0])
    assert torch.autograd.gradcheck(step, [x] + states)


def test_saved_tensor_modified_in_place_raises_as_torch():
    torch.manual_seed(0)
    ref, mod = _pair("GRUCell", {})
    for module in (ref, mod):
        x = torch.randn(3, 5, requires_grad=True)
        h = torch.randn(3, 7)
        out = module(x, h)
        assert module is ref or _recorded_here(out)
        with torch.no_grad():
            h.add_(1)  # saved for backward
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def _edit_input(kind, x, states, outs):
    x.add_(1)


def _edit_state(kind, x, states, outs):
    states[0].add_(1)


def _edit_cell_output(kind, x, states, outs):
    outs[-1].mul_(0.5)  # the LSTM's returned cy (an RNN / GRU cell's hy: saved by torch's tanh / relu as well)


def _inference_input(kind, x, states, outs):
    pass  # x was made under inference_mode


# (what happens after the forward, which parameters are frozen, whether x is an inference tensor)
SAVED_CASES = [
    (_edit_input, ("weight_ih",), False), (_edit_input, (), False), (_edit_state, ("weight_hh",), False),
    (_edit_state, (), False), (_edit_cell_output, (), False), (_inference_input, ("weight_ih",), True),
]


@pytest.mark.parametrize("python_path", [False, True])
@pytest.mark.parametrize("kind,kw", CELLS)
@pytest.mark.parametrize("edit,frozen,inference", SAVED_CASES)
def test_saved_operands_as_torchs(kind, kw, edit, frozen, inference, python_path):
    """The node keeps for its backward's values what torch's cell saves (x only where W_ih needs a gradient, not the
    returned cy, ...): an in-place change of an operand torch does not save, or an input made under inference_mode,
    raises nothing, and one torch does save raises torch's error. python_path: the same for the Python path's
    autograd op (seqfast.ops.rnn_cell: a forced backend, torch.compile)."""
    with seqfast.use_backend("cpp") if python_path else contextlib.nullcontext():
        _saved_case(kind, kw, edit, frozen, inference, python_path)


def _saved_case(kind, kw, edit, frozen, inference, python_path):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw)
    outcomes = []
    for module in (ref, mod):
        for name in frozen:
            getattr(module, name).requires_grad_(False)
        torch.manual_seed(1)  # the same inputs for both
        if inference:
            with torch.inference_mode():
                x = torch.randn(3, 5)
        else:
            x = torch.randn(3, 5)
        hx = _states(kind, 3)
        states = list(hx) if kind == "LSTMCell" else [hx]
        out = module(x, hx)
        assert module is ref or _recorded_here(out) != python_path
        outs = _flat(out)
        loss = outs[0].sum()
        with torch.no_grad():
            edit(kind, x, states, outs)
        try:
            loss.backward()
            outcomes.append("ok")
        except RuntimeError as e:
            assert "modified by an inplace operation" in str(e)
            outcomes.append("raised")
    assert outcomes[1] == outcomes[0]
    if outcomes[0] == "ok":
        for a, b in zip(ref.parameters(), mod.parameters()):
            assert (a.grad is None) == (b.grad is None)
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, **TOL[torch.float32])


@pytest.mark.parametrize("kind,kw", CELLS)
def test_transforms_get_torchs_results(kind, kw):
    """A forward-mode tangent and torch.func.grad: the C++ step declines, and the module's results are torch's."""
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw)
    x, hx = torch.randn(3, 5), _states(kind, 3)
    with torch.no_grad():
        mod(x, hx)  # builds the C++ step
    tangent = torch.randn_like(x)
    outs = []
    for module in (mod, ref):
        with fwAD.dual_level():
            outs.append([fwAD.unpack_dual(o).tangent for o in _flat(module(fwAD.make_dual(x, tangent), hx))])
    for g, w in zip(*outs):
        torch.testing.assert_close(g, w, **TOL[torch.float32])

    def loss(module):
        return lambda params, x: _flat(torch.func.functional_call(module, params, (x, hx)))[0].square().sum()
    got = torch.func.grad(loss(mod))(dict(mod.named_parameters()), x)
    want = torch.func.grad(loss(ref))(dict(ref.named_parameters()), x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL[torch.float32])

