"""bfloat16 cell steps of 1-16 rows on a CPU without native bfloat16 (seqfast._rules.bf16_weights_in_place): the float32
C++ cell kernels on float32 copies of the activations and biases, the bfloat16 weights read in place
(csrc/cpu/bf16_weight_gemv.h), the results rounded to bfloat16 once. Checked here: the C++ entries with bfloat16
weights against the plain-PyTorch reference on the same values (forward, backward, the weight gradients rounded as
torch rounds), the modules against float64 torch (outputs and gradients), the no-grad module call, and the regular
path (torch's op and errors) wherever a step does not qualify. The path is forced onto this CPU's class, so it is
tested on any machine with the kernels."""
import pytest
import torch

import seqfast
from conftest import assert_raises_like_torch, bfloat16_paths_taken
from seqfast import _ext, _rules
from seqfast.reference import rnn_cell as reference

C = _ext.module()
pytestmark = pytest.mark.skipif(C is None or not C.bf16_cell_weights_supported(),
                                reason="seqfast._C not built or no AVX2 + FMA on this CPU")

BF16 = torch.bfloat16
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


@pytest.fixture
def in_place(monkeypatch):
    """The in-place path allowed on this CPU class; -> the row counts of the steps that took it."""
    return bfloat16_paths_taken(monkeypatch, "bf16_weights_in_place")


def _kernel_args(family, B, I, H, gen, bias_dtype=torch.float32):
    G = GATES[family]
    x, h, c = (torch.randn(B, n, generator=gen) for n in (I, H, H))
    w_ih = torch.randn(G * H, I, generator=gen).to(BF16)
    w_hh = torch.randn(G * H, H, generator=gen).to(BF16)
    b_ih, b_hh = (torch.randn(G * H, generator=gen).to(bias_dtype) for _ in range(2))
    return x, h, c, w_ih, w_hh, b_ih, b_hh


def _forward_backward(family, impl, args, grads):
    """(forward outputs, backward outputs) of one backend (impl: seqfast._C or the reference module)."""
    x, h, c, w_ih, w_hh, b_ih, b_hh = args
    if family == "lstm":
        hy, cy, gates = out = impl.lstm_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh)
        return out, impl.lstm_cell_backward(grads[0], grads[1], x, h, c, w_ih, w_hh, gates, cy)
    if family == "gru":
        out = impl.gru_cell_forward(x, h, w_ih, w_hh, b_ih, b_hh)
        return out, impl.gru_cell_backward(grads[0], x, h, w_ih, w_hh, out[1])
    hy = impl.rnn_cell_forward(x, h, w_ih, w_hh, b_ih, b_hh, False)
    return (hy,), impl.rnn_cell_backward(grads[0], x, h, w_ih, w_hh, hy, False)


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("B,I,H", [(1, 64, 128), (3, 37, 29), (7, 100, 64), (16, 9, 17), (2, 1, 1), (0, 5, 8)])
@pytest.mark.parametrize("bias_dtype", [torch.float32, BF16])  # the modules pass their bfloat16 biases as they are
def test_kernels_match_the_reference(family, B, I, H, bias_dtype):
    """Odd sizes cover the kernels' partial vectors and row tails; 16 rows, their largest batch (four passes)."""
    gen = torch.Generator().manual_seed(B * 1000 + I + H)
    args = _kernel_args(family, B, I, H, gen, bias_dtype)
    grads = (torch.randn(B, H, generator=gen), torch.randn(B, H, generator=gen))
    got_f, got_b = _forward_backward(family, C, args, grads)
    want_f, want_b = _forward_backward(family, reference, args, grads)
    for g, w in zip(got_f, want_f):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for i, (g, w) in enumerate(zip(got_b, want_b)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        if g.dtype == BF16:
            # a weight gradient, summed in float32 and rounded once: another summation order may round one ulp the
            # other way (bfloat16 keeps 8 bits)
            torch.testing.assert_close(g.float(), w.float(), rtol=2 ** -7, atol=1e-5)
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_weight_gradient_rounding_is_torchs():
    """outer(): round to nearest even, NaN, infinities, denormals and -0 as torch's float32 -> bfloat16 Tensor.to."""
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    special = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.4e38, float("nan"), float("-inf"), 1e-40, -0.0,
               1 + 2 ** -9]
    dp = torch.tensor([special])  # an Elman step's gate gradient, as the backward's dW = dp^T x sees it
    w = torch.zeros(9, 9, dtype=BF16)
    h = torch.zeros(1, 9)
    hy = torch.zeros(1, 9)  # relu with hy = 0 would zero dp: use tanh, where dp = grad * (1 - hy^2) = grad
    got = C.rnn_cell_backward(dp, x, h, w, w, hy, False)[2]
    want = (dp.t() @ x).to(BF16)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # bit for bit, NaN's pattern included


@pytest.mark.parametrize("kind,kw", [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize("grad", [False, True])
def test_modules_match_float64_torch(in_place, kind, kw, batch, grad):
    torch.manual_seed(batch)
    ours = getattr(seqfast.nn, kind)(13, 24, **kw).to(BF16)
    ref = getattr(torch.nn, kind)(13, 24, **kw).double()
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(batch, 13).to(BF16).requires_grad_(grad)
    h = torch.randn(batch, 24).to(BF16)
    hx = (h, torch.randn(batch, 24).to(BF16)) if kind == "LSTMCell" else h
    hx64 = tuple(t.double() for t in hx) if kind == "LSTMCell" else h.double()
    x64 = x.detach().double().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        got, want = ours(x, hx), ref(x64, hx64)
    got, want = (list(got), list(want)) if kind == "LSTMCell" else ([got], [want])
    if grad:  # the kernels, except where a training rule gives the step to torch's op (RNNCell at batch 1)
        family = {"LSTMCell": "lstm_cell", "GRUCell": "gru_cell", "RNNCell": "rnn_cell"}[kind]
        assert in_place == ([] if _rules.prefer_torch_when(family, x, batch, 24, True) else [batch])
    else:  # a no-grad module step runs its C++ call (test_no_grad_module_call_matches_the_functional)
        assert ours._seqfast_call and in_place == []
    for g, w in zip(got, want):
        assert g.dtype == BF16
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2)
    if grad:
        weights = torch.randn(got[0].shape)
        (got[0].double() * weights).sum().backward()
        (want[0] * weights).sum().backward()
        assert x.grad.dtype == BF16
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=5e-2, atol=5e-2)
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert p.grad.dtype == BF16, name
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=5e-2, atol=5e-2)


def test_no_grad_module_call_matches_the_functional(in_place):
    """The module's C++ step (seqfast._C.CellCall) takes the same path in C++: the same bits as the functional."""
    torch.manual_seed(0)
    cell = seqfast.nn.LSTMCell(6, 10).to(BF16)
    x, hx = torch.randn(4, 6).to(BF16), (torch.randn(4, 10).to(BF16), torch.randn(4, 10).to(BF16))
    with torch.no_grad():
        got = cell(x, hx)
        assert cell._seqfast_call and cell._seqfast_call(x, hx) is not None
        want = seqfast.functional.lstm_cell(x, hx, *cell.parameters())
    assert in_place == [4]  # the functional's step
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_double_backward_through_the_reference(in_place):
    """create_graph=True differentiates the reference forward on the same mixed-dtype arguments."""
    torch.manual_seed(0)
    cell = seqfast.nn.GRUCell(4, 6).to(BF16)
    x = torch.randn(2, 4).to(BF16).requires_grad_()
    (gx,) = torch.autograd.grad(cell(x, torch.randn(2, 6).to(BF16)).sum(), x, create_graph=True)
    gx.float().sum().backward()
    assert in_place and cell.weight_ih.grad is not None and cell.weight_ih.grad.dtype == BF16


def test_regular_path_where_the_step_does_not_qualify(in_place):
    torch.manual_seed(0)
    ours = seqfast.nn.LSTMCell(6, 8).to(BF16)
    ref = torch.nn.LSTMCell(6, 8).to(BF16)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6).to(BF16)
    with torch.no_grad():
        with seqfast.use_backend("torch"):  # a forced backend
            torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
        with torch.autocast("cpu", dtype=BF16):  # autocast casts itself
            ours(x)
        ours(torch.randn(_rules.BF16_IN_PLACE_MAX_ROWS + 1, 6).to(BF16))  # the upcast path's rows
    assert in_place == []
    # a float32 state with a bfloat16 input: torch's error
    assert_raises_like_torch(ref, ours, (x, (torch.randn(3, 8), torch.randn(3, 8))), same_message=False)
    assert in_place == []
    # a wrong input size: the step qualifies, and its checks raise torch's error
    assert_raises_like_torch(ref, ours, (torch.randn(3, 5).to(BF16),))


def test_entries_reject_what_the_kernels_cannot_read():
    gen = torch.Generator().manual_seed(0)
    x, h, c, w_ih, w_hh, b_ih, b_hh = _kernel_args("lstm", 17, 5, 8, gen)
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        C.lstm_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh)
    x, h, c, w_ih, w_hh, b_ih, b_hh = _kernel_args("lstm", 2, 5, 8, gen)
    with pytest.raises(RuntimeError, match="weight_hh must have dtype BFloat16"):
        C.lstm_cell_forward(x, h, c, w_ih, w_hh.float(), b_ih, b_hh)
    with pytest.raises(RuntimeError, match="bias_ih must have dtype Float"):  # float32 or the weights' bfloat16
        C.lstm_cell_forward(x, h, c, w_ih, w_hh, b_ih.double(), b_hh)
    with pytest.raises(RuntimeError, match="weight_(ih|hh) must have dtype Double"):  # only under float32 input
        C.lstm_cell_forward(x.double(), h.double(), c.double(), w_ih, w_hh, b_ih.double(), b_hh.double())
