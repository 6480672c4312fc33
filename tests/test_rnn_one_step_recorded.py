"""One-step training calls of nn.LSTM / GRU / RNN (a seq2seq decoder trained one token per call): the module's C++
call runs them as cell steps recorded from C++ (csrc/rnn/rnn_module_call.cpp: recorded_step). Outputs, states and
every gradient must be torch.nn's, in every layout the call accepts (layers, directions, batch_first, unbatched,
given or zero states, no biases), with double backward and float64 gradcheck."""
import pytest
import torch

import seqfast
from conftest import assert_raises_like_torch, recorded_as_cell_steps
from seqfast import _ext

pytestmark = pytest.mark.skipif(_ext.module() is None or not _ext.module().rnn_kernels_supported(),
                                reason="seqfast._C not built or its RNN kernels do not run on this CPU")

KINDS = [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _pair(kind, kw, dtype=torch.float32, **options):
    ref = getattr(torch.nn, kind)(5, 6, **kw, **options).to(dtype)
    mod = getattr(seqfast.nn, kind)(5, 6, **kw, **options).to(dtype)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def _leaves(out):
    """The output and the final states as one flat list."""
    output, states = out
    return [output] + (list(states) if isinstance(states, tuple) else [states])


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("batch", [1, 3, 0])  # 0: unbatched
@pytest.mark.parametrize("given_state", [True, False])
def test_matches_torch(kind, kw, layers, bidirectional, batch_first, batch, given_state):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    slices = layers * (2 if bidirectional else 1)
    if batch:
        x = torch.randn((batch, 1, 5) if batch_first else (1, batch, 5), requires_grad=True)
    else:
        x = torch.randn(1, 5, requires_grad=True)
    states = None
    if given_state:
        def one():
            return torch.randn((slices, batch, 6) if batch else (slices, 6), requires_grad=True)
        states = (one(), one()) if kind == "LSTM" else one()
    got, want = mod(x, states), ref(x, states)
    assert recorded_as_cell_steps(got[0])
    for g, w in zip(_leaves(got), _leaves(want)):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **TOL[torch.float32])
    inputs = [x] + ([] if states is None else list(states) if kind == "LSTM" else [states])
    weights = [torch.randn_like(t) for t in _leaves(want)]
    got_g = torch.autograd.grad(_leaves(got), inputs + list(mod.parameters()), weights)
    want_g = torch.autograd.grad(_leaves(want), inputs + list(ref.parameters()), weights)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


@pytest.mark.parametrize("kind,kw", KINDS)
def test_no_biases_and_frozen_layers(kind, kw):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw, num_layers=2, bias=False)
    for module in (ref, mod):
        for name, p in module.named_parameters():
            p.requires_grad_(name.endswith("l1"))  # the first layer frozen: only the input and layer 1 train
    x = torch.randn(1, 4, 5, requires_grad=True)
    got, want = mod(x), ref(x)
    assert recorded_as_cell_steps(got[0])
    got_g = torch.autograd.grad(got[0].sum(), [x] + [p for p in mod.parameters() if p.requires_grad])
    want_g = torch.autograd.grad(want[0].sum(), [x] + [p for p in ref.parameters() if p.requires_grad])
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


@pytest.mark.parametrize("kind,kw", KINDS)
def test_double_backward_and_gradcheck(kind, kw):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw, torch.float64, num_layers=2, bidirectional=True)
    x = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)
    penalties = []
    for module in (mod, ref):
        out = _leaves(module(x))
        grads = torch.autograd.grad(sum(o.square().sum() for o in out), [x] + list(module.parameters()),
                                    create_graph=True)
        penalties.append(torch.autograd.grad(sum(g.square().sum() for g in grads), [x] + list(module.parameters())))
    for g, w in zip(*penalties):
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    assert torch.autograd.gradcheck(lambda x: tuple(_leaves(mod(x))), [x])


def test_two_steps_and_dropout_keep_their_paths():
    """Calls of two steps, and training calls with dropout, are not one-step calls: torch's results as before."""
    torch.manual_seed(0)
    ref, mod = _pair("GRU", {}, num_layers=2)
    x = torch.randn(2, 3, 5, requires_grad=True)
    got, want = mod(x), ref(x)
    assert not recorded_as_cell_steps(got[0])
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    ref, mod = _pair("GRU", {}, num_layers=2, dropout=0.5)
    torch.manual_seed(1)
    got = mod(x[:1])
    assert not recorded_as_cell_steps(got[0])
    mod.eval()  # dropout off outside training: the one-step path again
    assert recorded_as_cell_steps(mod(x[:1])[0])


@pytest.mark.parametrize("kind,kw", KINDS)
def test_bad_input_in_grad_mode_raises_as_torch(kind, kw):
    """A 0-D or 1-D input in grad mode (the one-step check reads the input's shape before the module's own checks):
    torch's error, not an IndexError."""
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw)
    for x in (torch.tensor(1.0, requires_grad=True), torch.randn(5, requires_grad=True)):
        assert_raises_like_torch(ref, mod, (x,))
