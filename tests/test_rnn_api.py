"""seqfast.nn.LSTM / GRU / RNN behave as torch's: state_dict both ways, flatten_parameters, dropout between layers
only in training, errors; the C++ layer ops pass float64 gradcheck (padded and packed, both directions)."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqfast
from conftest import assert_raises_like_torch
from seqfast.ops import rnn_sequence

PAIRS = [(seqfast.nn.LSTM, torch.nn.LSTM), (seqfast.nn.GRU, torch.nn.GRU), (seqfast.nn.RNN, torch.nn.RNN)]


@pytest.mark.parametrize("ours_cls,torch_cls", PAIRS)
def test_state_dict_both_ways(ours_cls, torch_cls):
    kw = dict(num_layers=2, bidirectional=True, bias=False)
    ours, theirs = ours_cls(4, 6, **kw), torch_cls(4, 6, **kw)
    assert isinstance(ours, torch_cls) and repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])


def test_flatten_parameters_and_proj_state_dict():
    ours, theirs = seqfast.nn.LSTM(4, 6, proj_size=3), torch.nn.LSTM(4, 6, proj_size=3)
    ours.flatten_parameters()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(5, 2, 4)
    for a, b in zip(ours(x)[1], theirs(x)[1]):
        torch.testing.assert_close(a, b)


def test_dropout_only_between_layers_in_training():
    torch.manual_seed(0)
    m = seqfast.nn.GRU(4, 8, num_layers=2, dropout=0.5)
    x = torch.randn(6, 3, 4)
    m.eval()
    ref = m(x)[0]
    torch.testing.assert_close(m(x)[0], ref)          # eval: deterministic, no dropout
    m.train()
    a, b = m(x)[0], m(x)[0]
    assert not torch.allclose(a, b) and not torch.allclose(a, ref)   # training: fresh masks between layers
    one = seqfast.nn.GRU(4, 8, num_layers=1, dropout=0.0)
    one.train()
    torch.testing.assert_close(one(x)[0], one(x)[0])  # no dropout after the last layer


def _bad_calls(cls):
    lstm = cls is torch.nn.LSTM
    h = (lambda *s: (torch.randn(*s), torch.randn(*s))) if lstm else (lambda *s: torch.randn(*s))
    return [
        (torch.randn(5, 3, 7), None),          # wrong input size
        (torch.randn(5, 3, 4), h(1, 2, 6)),    # wrong batch in the state
        (torch.randn(5, 3, 4), h(2, 3, 6)),    # wrong number of layers in the state
        (torch.randn(5, 3, 4), h(3, 6)),       # 2-D state for batched input
        (torch.randn(5, 4), h(1, 3, 6)),       # 3-D state for unbatched input
        (torch.randn(2, 5, 3, 4), None),       # 4-D input
    ]


@pytest.mark.parametrize("ours_cls,torch_cls", PAIRS)
@pytest.mark.parametrize("case", range(6))
def test_errors_match_torch(ours_cls, torch_cls, case):
    ours, theirs = ours_cls(4, 6), torch_cls(4, 6)
    x, state = _bad_calls(torch_cls)[case]
    assert_raises_like_torch(theirs, ours, (x,) if state is None else (x, state))


def _layer_args(kind, packed, reverse):
    g = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    H, I, B = 3, 2, 3
    batch_sizes = torch.tensor([3, 2, 2, 1]) if packed else torch.tensor([3, 3, 3])
    N = int(batch_sizes.sum())
    d = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(N, I, **d)
    h0 = [torch.randn(B, H, **d) for _ in range(2 if kind == "lstm" else 1)]
    w = [torch.randn(g * H, I, **d), torch.randn(g * H, H, **d), torch.randn(g * H, **d), torch.randn(g * H, **d)]
    return [x, batch_sizes, *h0, *w] + ([False] if kind == "rnn" else []) + [reverse]


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gradcheck_cpp_layer_float64(kind, packed, reverse):
    op = getattr(rnn_sequence, f"{kind}_layer")
    args = _layer_args(kind, packed, reverse)
    n_out = {"lstm": 3, "gru": 2, "rnn": 2}[kind]

    def f(*a):
        return op(*a)[:n_out]

    with seqfast.use_backend("cpp"):
        assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_opcheck_layer_ops(kind):
    op = getattr(rnn_sequence, f"{kind}_layer").op
    args = [a.detach().float().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in _layer_args(kind, True, False)]
    torch.library.opcheck(op, tuple(args))


def test_packed_output_matches_torch_with_enforce_sorted_false():
    ours, theirs = seqfast.nn.LSTM(3, 4, batch_first=True), torch.nn.LSTM(3, 4, batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 6, 3)
    packed = pack_padded_sequence(x, torch.tensor([3, 6, 1, 4]), batch_first=True, enforce_sorted=False)
    (po, (h, c)), (pt, (ht, ct)) = ours(packed), theirs(packed)
    assert torch.equal(po.batch_sizes, pt.batch_sizes)
    assert torch.equal(po.sorted_indices, pt.sorted_indices) and torch.equal(po.unsorted_indices, pt.unsorted_indices)
    torch.testing.assert_close(po.data, pt.data)
    torch.testing.assert_close(h, ht)
    torch.testing.assert_close(c, ct)


_H = torch.zeros(1, 1, 3)


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("hx", [_H, (_H,), (_H, _H, _H), (_H, 5), 5], ids=["tensor", "one", "three", "int-in", "int"])
def test_packed_lstm_states_of_the_wrong_form_raise_like_torch(hx, enforce_sorted):
    """An LSTM's hx that is not two tensors, with packed input: torch's exception type (its op's argument parser, or
    permute_hidden first where the pack is unsorted), not an error about hx[0]'s shape or an IndexError; where torch
    runs (an unsorted pack's permute_hidden keeps the first two of three), the same result."""
    ours, theirs = seqfast.nn.LSTM(4, 3), torch.nn.LSTM(4, 3)
    ours.load_state_dict(theirs.state_dict())
    packed = pack_padded_sequence(torch.randn(2, 1, 4), torch.tensor([2]), enforce_sorted=enforce_sorted)
    try:
        expected = theirs(packed, hx)
    except Exception as e:
        with pytest.raises(type(e)):
            ours(packed, hx)
        return
    got = ours(packed, hx)
    torch.testing.assert_close(got[0].data, expected[0].data)
    torch.testing.assert_close(got[1], expected[1])


def test_parametrized_weight_matches_torch():
    """A parametrized weight (torch.nn.utils.parametrize moves it out of the parameter dict) is read as torch reads
    it: same output and gradients as torch's LSTM with the same parametrization."""
    torch.manual_seed(0)
    ours, theirs = seqfast.nn.LSTM(3, 4, num_layers=2).double(), torch.nn.LSTM(3, 4, num_layers=2).double()
    ours.load_state_dict(theirs.state_dict())

    class Scale(torch.nn.Module):
        def forward(self, w):
            return 0.5 * w

    for module in (ours, theirs):
        torch.nn.utils.parametrize.register_parametrization(module, "weight_hh_l1", Scale())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    a, b = ours(x)[0], theirs(x)[0]
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("shape", [(2, 3), (3,)], ids=["2d", "1d"])
def test_packed_lstm_states_of_too_few_dims_raise_like_torch(shape, enforce_sorted):
    """torch's packed LSTM gives its states to its op without torch.nn's shape checks: its IndexError."""
    ours, theirs = seqfast.nn.LSTM(4, 3), torch.nn.LSTM(4, 3)
    packed = pack_padded_sequence(torch.randn(5, 2, 4), torch.tensor([5, 3]), enforce_sorted=enforce_sorted)
    h = torch.zeros(*shape)
    assert_raises_like_torch(theirs, ours, (packed, (h, h)))


def test_packed_lstm_states_of_four_dims_raise():
    """(torch's own op crashes the process on these: not run here)"""
    packed = pack_padded_sequence(torch.randn(5, 2, 4), torch.tensor([5, 3]))
    h = torch.zeros(1, 1, 2, 3)
    with pytest.raises(RuntimeError, match="must be 3-D"):
        seqfast.nn.LSTM(4, 3)(packed, (h, h))


def test_lstm_states_stacked_in_one_tensor_raise_like_torch():
    """One tensor stacking h and c passes torch.nn's own checks (it indexes hx[0] and hx[1]); torch's ops then refuse
    it (TypeError), where unpacking it would run the step on it."""
    x, h = torch.randn(2, 4), torch.randn(2, 3)
    cells = torch.nn.LSTMCell(4, 3), seqfast.nn.LSTMCell(4, 3)
    layers = torch.nn.LSTM(4, 3), seqfast.nn.LSTM(4, 3)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for hx in (h, torch.stack([h, h])):
                assert_raises_like_torch(*cells, (x, hx), same_message=False)
            assert_raises_like_torch(*layers, (x[None], torch.stack([h[None], h[None]])), same_message=False)
    with pytest.raises(TypeError):
        seqfast.functional.lstm_cell(x, torch.stack([h, h]), cells[1].weight_ih, cells[1].weight_hh)
