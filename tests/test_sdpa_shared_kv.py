"""SDPA with one tensor as both k and v (a Luong step's keys as its values): the C++ backward sums dK + dV where it
computes them and returns the sum as k's gradient alone (seqfast/ops/attention.py: _sdpa_grad). The gradient must
equal the two gradients of distinct k and v added, on every path of the backward (one query row, the blocks, the
bfloat16 upcast), and the module-level step must pass float64 gradcheck."""
import pytest
import torch

import seqfast
from seqfast import _ext
from seqfast.ops import attention as ops

C = _ext.module()
pytestmark = pytest.mark.skipif(C is None, reason="the C++ extension is not built")


def _grads(q, kv, bias, shared, causal=False):
    """(dq, d kv) through seqfast's op, kv passed once as both k and v (shared) or as two distinct leaves."""
    q = q.detach().requires_grad_()
    kv = kv.detach().requires_grad_()
    if shared:
        k = v = kv
    else:
        k, v = kv.clone(), kv.clone()  # distinct tensors, gradients flowing back into kv and summed by autograd
    with seqfast.use_backend("cpp"):
        out, _ = ops.sdpa(q, k, v, bias, causal, q.shape[-1] ** -0.5)
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return q.grad, kv.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("N,H,L,S,D", [(3, 2, 1, 37, 16), (2, 1, 1, 300, 24), (1, 2, 5, 70, 8), (2, 2, 33, 130, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_shared_kv_gradient_is_the_sum(dtype, N, H, L, S, D, masked):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, H, L, D, generator=g).to(dtype)
    kv = torch.randn(N, H, S, D, generator=g).to(dtype)
    bias = None
    if masked:  # a key-padding bias with one fully masked row
        keep = torch.arange(S)[None, :] < torch.tensor([S // 2, 0, S][:N])[:, None]
        bias = torch.zeros(N, 1, 1, S, dtype=dtype).masked_fill(~keep[:, None, None, :], float("-inf"))
        bias = bias.expand(N, H, L, S)
    dq_s, dkv_s = _grads(q, kv, bias, shared=True)
    dq_d, dkv_d = _grads(q, kv, bias, shared=False)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype is torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq_s, dq_d, **tol)
    torch.testing.assert_close(dkv_s, dkv_d, **tol)
    if masked and N > 1:
        assert torch.all(dkv_s[1] == 0)  # the fully masked row's keys get no gradient


def test_cpp_backward_folds_only_one_tensor():
    q, kv = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 20, 8)
    out, lse = C.sdpa_forward(q, kv, kv, None, False, 0.5)
    go = torch.randn_like(out)
    dq, dkv, dv = C.sdpa_backward(go, q, kv, kv, out, lse, None, False, 0.5, True)
    assert dv is None
    dq2, dk2, dv2 = C.sdpa_backward(go, q, kv, kv, out, lse, None, False, 0.5)  # the flag off: both, as before
    torch.testing.assert_close(dq, dq2)
    torch.testing.assert_close(dkv, dk2 + dv2)
    # two tensors with equal values are not one tensor: no fold
    dq3, dk3, dv3 = C.sdpa_backward(go, q, kv, kv.clone(), out, lse, None, False, 0.5, True)
    assert dv3 is not None
    torch.testing.assert_close(dk3, dk2)


def test_luong_keys_as_values_gradcheck():
    module = seqfast.nn.LuongAttention(6, 5, score="general").double()
    q = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 1])[:, None]
    with seqfast.use_backend("cpp"):
        assert torch.autograd.gradcheck(lambda a, b: module(a, b, mask), (q, keys))
        # and a second-order gradient still works (create_graph: autograd through the reference)
        assert torch.autograd.gradgradcheck(lambda a, b: module(a, b, mask)[0], (q, keys))
