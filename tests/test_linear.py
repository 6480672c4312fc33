"""seqfast.functional._linear.linear (seqfast._C.linear: the own GEMM, forward and backward, for the projections of
seqfast's attention modules) against torch.nn.functional.linear: values, every gradient, double backward, and the
cases it leaves to torch's op (whose results and errors must come back unchanged)."""
import pytest
import torch
import torch.nn.functional as F

import seqfast
from seqfast import _ext
from seqfast.functional._linear import linear
from seqfast.nn._linear import Linear

pytestmark = pytest.mark.skipif(_ext.module() is None, reason="needs the C++ extension")

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _node_names(y):
    """The autograd nodes behind y, by name."""
    names, todo = [], [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None:
            names.append(fn.name())
            todo.extend(f for f, _ in fn.next_functions)
    return names


def _own_node(y):
    return any("LinearNode" in n for n in _node_names(y))


# rows on both sides of the own GEMM's row thresholds (cpu/gemm.cpp), odd K / N, 2-4 dimensions
SHAPES = [((1, 7), 9), ((8, 37), 129), ((13, 64), 48), ((3, 100, 33), 65), ((300, 70), 257), ((2, 3, 40, 16), 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,out_features", SHAPES)
def test_values_and_gradients_match_torch(shape, out_features, bias, dtype):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    w = torch.randn(out_features, shape[-1], dtype=dtype, requires_grad=True)
    b = torch.randn(out_features, dtype=dtype, requires_grad=True) if bias else None
    y, ref = linear(x, w, b), F.linear(x, w, b)
    assert _own_node(y)
    torch.testing.assert_close(y, ref, **TOL[dtype])
    g = torch.randn_like(ref)
    params = [x, w] + ([b] if bias else [])
    for got, want in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("wants", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)])
def test_partial_requires_grad(wants):
    """A frozen weight, a frozen input, only the bias: each gradient asked for is torch's, the others stay None."""
    x, w, b = torch.randn(5, 300, 24), torch.randn(40, 24), torch.randn(40)
    for t, want in zip((x, w, b), wants):
        t.requires_grad_(want)
    y, ref = linear(x, w, b), F.linear(x, w, b)
    y.square().sum().backward()
    got = [None if t.grad is None else t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ref.square().sum().backward()
    for t, g in zip((x, w, b), got):
        if t.requires_grad:
            # the weight's gradient sums 1500 rows: float32 rounding scales with its largest entries (~1e4), so an
            # entry that cancels to ~1 is compared at that scale, not at its own
            torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-5 * float(t.grad.abs().max()))
        else:
            assert g is None and t.grad is None


def test_non_contiguous_input_and_weight():
    """A transposed input (MultiheadAttention's batch_first query) and a transposed weight view."""
    x = torch.randn(64, 8, 32).transpose(0, 1).requires_grad_()
    w = torch.randn(32, 48).t().requires_grad_()
    y, ref = linear(x, w, None), F.linear(x, w, None)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_no_grad_result_is_plain():
    x, w, b = torch.randn(300, 64, requires_grad=True), torch.randn(32, 64, requires_grad=True), torch.randn(32)
    with torch.no_grad():
        y = linear(x, w, b)
    assert not y.requires_grad and y.grad_fn is None
    torch.testing.assert_close(y, F.linear(x, w, b).detach(), **TOL[torch.float32])


def test_gradcheck_and_double_backward():
    opts = dict(dtype=torch.float64, requires_grad=True)
    x, w, b = torch.randn(4, 3, 5, **opts), torch.randn(6, 5, **opts), torch.randn(6, **opts)
    assert torch.autograd.gradcheck(linear, (x, w, b))
    assert torch.autograd.gradgradcheck(linear, (x, w, b))
    assert torch.autograd.gradgradcheck(linear, (x, w))
    # a gradient penalty: d/dw |dy/dx|^2 against torch's
    got, want = [], []
    for fn, out in ((linear, got), (F.linear, want)):
        (gx,) = torch.autograd.grad(fn(x, w, b).sum(), x, create_graph=True)
        out.append(torch.autograd.grad(gx.square().sum(), w)[0])
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float64])


def test_in_place_change_of_a_saved_input_raises_torchs_error():
    x, w = torch.randn(300, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    h = x * 1
    y = linear(h, w, None)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_same_tensor_as_input_and_weight():
    a = torch.randn(16, 16, requires_grad=True)
    (ga,) = torch.autograd.grad(linear(a, a, None).sum(), a)
    (want,) = torch.autograd.grad(F.linear(a, a, None).sum(), a)
    torch.testing.assert_close(ga, want, **TOL[torch.float32])


@pytest.mark.parametrize("make", [
    lambda: (torch.randn(7, requires_grad=True), torch.randn(5, 7), torch.randn(5)),  # 1-D input
    lambda: (torch.randn(3, 7, dtype=torch.bfloat16), torch.randn(5, 7, dtype=torch.bfloat16), None),
    lambda: (torch.randn(0, 7), torch.randn(5, 7), None),  # no rows
    lambda: (torch.randn(3, 7), torch.randn(0, 7), torch.randn(0)),  # no outputs
    lambda: (torch.randn(3, 7), torch.randn(5, 7), torch.randn(1)),  # a broadcast bias
    lambda: (torch.randn(3, 7).int(), torch.randn(5, 7).int(), None),  # integer tensors
])
def test_cases_left_to_torch_give_torchs_results(make):
    x, w, b = make()
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("make", [
    lambda: (torch.randn(3, 7), torch.randn(5, 6), None),  # K mismatch
    lambda: (torch.randn(3, 7), torch.randn(5, 7), torch.randn(4)),  # bias size
    lambda: (torch.randn(3, 7), torch.randn(5, 7, dtype=torch.float64), None),  # dtypes differ
    lambda: (torch.randn(3, 7), torch.randn(5, 7), torch.randn(5, dtype=torch.float64)),
    lambda: (torch.randn(3, 7), torch.randn(5, 7).unsqueeze(0), None),  # 3-D weight
    lambda: (torch.randn(3, 7), torch.randn(5, 7), torch.randn(5, 1)),  # a 2-D bias
    lambda: (torch.randn(3, 7), "not a tensor", None),
])
def test_bad_input_raises_torchs_error(make):
    x, w, b = make()
    with pytest.raises(Exception) as want:
        F.linear(x, w, b)
    with pytest.raises(want.type):
        linear(x, w, b)


def test_forward_ad_and_autocast_take_torchs_op():
    import torch.autograd.forward_ad as fwAD
    x, w, t = torch.randn(300, 8), torch.randn(4, 8), torch.randn(300, 8)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(linear(fwAD.make_dual(x, t), w, None)).tangent
    torch.testing.assert_close(got, F.linear(t, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = linear(x, w, None), F.linear(x, w, None)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)


def test_func_grad_takes_torchs_op():
    x, w = torch.randn(300, 8), torch.randn(4, 8)
    got = torch.func.grad(lambda w: linear(x, w, None).square().sum())(w)
    want = torch.func.grad(lambda w: F.linear(x, w, None).square().sum())(w)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_forced_backends_run_torchs_op(backend):
    x, w = torch.randn(300, 8, requires_grad=True), torch.randn(4, 8)
    with seqfast.use_backend(backend):
        y = linear(x, w, None)
    assert not _own_node(y)


def test_score_layers_are_torch_linears():
    """LuongAttention / BahdanauAttention's W and U: torch.nn.Linear's class (state_dict keys, hooks), own GEMM."""
    luong, bahdanau = seqfast.nn.LuongAttention(8, 6, score="general"), seqfast.nn.BahdanauAttention(8, 6, 5)
    for layer in (luong.W, bahdanau.W, bahdanau.U):
        assert isinstance(layer, torch.nn.Linear)
    assert set(bahdanau.state_dict()) == {"W.weight", "U.weight", "U.bias", "v"}
    seen = []
    bahdanau.U.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    keys = torch.randn(3, 300, 6, requires_grad=True)
    out = bahdanau(torch.randn(3, 8), keys)
    assert seen == [torch.Size([3, 300, 5])]
    assert _own_node(out[0])


@pytest.mark.parametrize("case", ["x changed, W frozen", "W changed, x without grad", "inference x, W frozen"])
def test_saved_operands_as_torchs(case):
    """x is kept for the backward only where W needs a gradient, W only where x does (as torch's linear): an in-place
    change of the other, or an inference-mode x under a frozen W, raises nothing."""
    outcomes = []
    for fn in (F.linear, linear):
        torch.manual_seed(0)
        if case == "inference x, W frozen":
            with torch.inference_mode():
                x = torch.randn(300, 16)
        else:
            x = torch.randn(300, 16, requires_grad=case == "x changed, W frozen")
        w = torch.randn(8, 16, requires_grad=case == "W changed, x without grad")
        b = torch.randn(8, requires_grad=True)
        y = fn(x, w, b)
        with torch.no_grad():
            if case == "x changed, W frozen":
                x.add_(1)
            elif case == "W changed, x without grad":
                w.add_(1)
        y.square().sum().backward()
        outcomes.append([t.grad for t in (x, w, b) if t.requires_grad])
    for got, want in zip(*reversed(outcomes)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_vmap_gets_torchs_results():
    """torch.func.vmap's batched tensors are not plain tensors: torch's op runs them (the C++ call read their data
    pointer before)."""
    x, w, b = torch.randn(3, 4, 5), torch.randn(6, 5), torch.randn(6)
    got = torch.func.vmap(lambda t: linear(t, w, b))(x)
    torch.testing.assert_close(got, torch.func.vmap(lambda t: F.linear(t, w, b))(x))
