"""The cells' and layers' C++ backward computes only the input gradients autograd needs (needs_input_grad: an input
or a state without gradients, frozen weights) and skips the rest: the skipped ones come back None from the entries,
the others bit for bit what a full backward gives, and the modules' gradients stay torch's."""
import pytest
import torch

import seqfast
from seqfast import _ext

C = _ext.module()
pytestmark = pytest.mark.skipif(C is None or not C.rnn_kernels_supported(),
                                reason="seqfast._C not built or its kernels do not run on this CPU")

FLAGS = [(False, True, True, True), (True, False, True, True), (True, True, False, True), (True, True, True, False),
         (False, False, False, False)]


def _check(full, part, flags, positions):
    """part's tensors at ``positions`` (one per flag) are None where the flag is off and equal full's elsewhere; the
    rest equal full's."""
    skipped = {p for p, f in zip(positions, flags) if not f}
    for i, (a, b) in enumerate(zip(full, part)):
        if i in skipped:
            assert b is None, i
        else:
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=str(i))


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 5, 40])
def test_entries_skip_what_is_not_needed(flags, dtype, B):
    torch.manual_seed(0)
    I, H = 6, 7
    x, h, c = (torch.randn(B, n, dtype=dtype) for n in (I, H, H))
    g = torch.randn(B, H, dtype=dtype)
    w4 = torch.randn(4 * H, I, dtype=dtype), torch.randn(4 * H, H, dtype=dtype)
    hy, cy, gates = C.lstm_cell_forward(x, h, c, *w4, None, None)
    args = (g, torch.randn_like(g), x, h, c, *w4, gates, cy)
    _check(C.lstm_cell_backward(*args), C.lstm_cell_backward(*args, *flags), flags, (0, 1, 3, 4))
    w3 = torch.randn(3 * H, I, dtype=dtype), torch.randn(3 * H, H, dtype=dtype)
    _, ws = C.gru_cell_forward(x, h, *w3, None, None)
    args = (g, x, h, *w3, ws)
    _check(C.gru_cell_backward(*args), C.gru_cell_backward(*args, *flags), flags, (0, 1, 2, 3))
    w1 = torch.randn(H, I, dtype=dtype), torch.randn(H, H, dtype=dtype)
    hy = C.rnn_cell_forward(x, h, *w1, None, None, False)
    args = (g, x, h, *w1, hy, False)
    _check(C.rnn_cell_backward(*args), C.rnn_cell_backward(*args, *flags), flags, (0, 1, 2, 3))


def test_bfloat16_weights_skip_too():
    if not C.bf16_cell_weights_supported():
        pytest.skip("no AVX2 bfloat16-weight kernels on this CPU")
    torch.manual_seed(0)
    x, h, g = torch.randn(3, 6), torch.randn(3, 7), torch.randn(3, 7)
    w = torch.randn(7, 6).bfloat16(), torch.randn(7, 7).bfloat16()
    hy = C.rnn_cell_forward(x, h, *w, None, None, False)
    args = (g, x, h, *w, hy, False)
    flags = (True, False, False, True)
    _check(C.rnn_cell_backward(*args), C.rnn_cell_backward(*args, *flags), flags, (0, 1, 2, 3))


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("case", ["input_no_grad", "state_no_grad", "frozen_ih", "frozen_hh", "only_state"])
def test_modules_match_torch_with_partial_gradients(kind, case):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(6, 7).double()
    ours = getattr(seqfast.nn, kind)(6, 7).double()
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        m.weight_ih.requires_grad_(case not in ("frozen_ih", "only_state"))
        m.weight_hh.requires_grad_(case not in ("frozen_hh", "only_state"))
        if case == "only_state":
            m.bias_ih.requires_grad_(False)
            m.bias_hh.requires_grad_(False)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=case not in ("input_no_grad", "only_state"))
    h = torch.randn(4, 7, dtype=torch.float64, requires_grad=case != "state_no_grad")
    results = []
    for m in (ref, ours):
        xs, hs = x.detach().requires_grad_(x.requires_grad), h.detach().requires_grad_(h.requires_grad)
        state = (hs, torch.zeros_like(hs)) if kind == "LSTMCell" else hs
        out = m(xs, state)
        (out[0] if isinstance(out, tuple) else out).pow(2).sum().backward()
        results.append([xs.grad, hs.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


LAYER_FLAGS = [(False, True, True), (True, False, True), (True, True, False), (False, False, False)]


@pytest.mark.parametrize("flags", LAYER_FLAGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_layer_entries_skip_what_is_not_needed(flags, dtype):
    """The layers' backward (dx, dw_ih, dw_hh skippable; dh0 / dc0 always), packed steps 3, 3, 2, reverse too."""
    torch.manual_seed(0)
    I, H = 5, 6
    bs = torch.tensor([3, 3, 2])
    x = torch.randn(8, I).to(dtype)
    h0, c0 = torch.randn(3, H).to(dtype), torch.randn(3, H).to(dtype)
    for reverse in (False, True):
        w = torch.randn(4 * H, I).to(dtype), torch.randn(4 * H, H).to(dtype)
        out, hn, cn, gates, cs = C.lstm_layer_forward(x, bs, h0, c0, *w, None, None, reverse)
        args = (torch.randn_like(out), torch.randn_like(hn), torch.randn_like(cn), x, bs, h0, c0, *w, out, gates, cs,
                reverse)
        _check(C.lstm_layer_backward(*args), C.lstm_layer_backward(*args, *flags), flags, (0, 3, 4))
        w = torch.randn(3 * H, I).to(dtype), torch.randn(3 * H, H).to(dtype)
        out, hn, ws = C.gru_layer_forward(x, bs, h0, *w, None, None, reverse)
        args = (torch.randn_like(out), torch.randn_like(hn), x, bs, h0, *w, out, ws, reverse)
        _check(C.gru_layer_backward(*args), C.gru_layer_backward(*args, *flags), flags, (0, 2, 3))
        w = torch.randn(H, I).to(dtype), torch.randn(H, H).to(dtype)
        out, hn = C.rnn_layer_forward(x, bs, h0, *w, None, None, False, reverse)
        args = (torch.randn_like(out), torch.randn_like(hn), x, bs, h0, *w, out, False, reverse)
        _check(C.rnn_layer_backward(*args), C.rnn_layer_backward(*args, *flags), flags, (0, 2, 3))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("case", ["input_no_grad", "frozen_first_layer", "frozen_hh"])
def test_sequence_modules_match_torch_with_partial_gradients(kind, case):
    """Two bidirectional layers over 6 steps (the sequence kernels): an input without gradients (features), the
    first layer frozen, or every W_hh frozen."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(5, 7, num_layers=2, bidirectional=True).double()
    ours = getattr(seqfast.nn, kind)(5, 7, num_layers=2, bidirectional=True).double()
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        for name, p in m.named_parameters():
            p.requires_grad_(not ((case == "frozen_first_layer" and name.endswith(("_l0", "_l0_reverse")))
                                  or (case == "frozen_hh" and name.startswith("weight_hh"))))
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=case != "input_no_grad")
    results = []
    for m in (ref, ours):
        xs = x.detach().requires_grad_(x.requires_grad)
        out = m(xs)
        (out[0].pow(2).sum() + (out[1][0] if kind == "LSTM" else out[1]).sum()).backward()
        results.append([xs.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
