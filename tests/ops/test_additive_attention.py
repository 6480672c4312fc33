"""seqfast::additive_attention: every backend's kernels against the reference, forward and backward."""
import pytest
import torch

from seqfast.ops import additive_attention as ops

from .parity import BACKENDS, check_op


def _args(N, S, A, Dv, mask):
    m = None
    if mask:
        m = torch.rand(N, S) > 0.3
        m[0] = False  # a fully masked row: zero weights and context
        m[-1, 0] = True
    return (torch.randn(N, A), torch.randn(N, S, A), torch.randn(A), torch.randn(N, S, Dv), m)


def _bwd(args, out, grads):
    qp, kp, v, values, mask = args
    return (grads[0], grads[1], qp, kp, v, values, mask, out[1])


@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (3, 17, 9, 1), (1, 1, 1, 2)],
                         ids=lambda s: "N{}-S{}-A{}-Dv{}".format(*s))
@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=lambda v: str(v).replace("torch.", ""))
def test_additive_attention_kernels_match_reference(backend, dtype, shape, mask):
    check_op(ops.additive_attention, backend, dtype, _args(*shape, mask), n_out=2, backward_args=_bwd, n_grads=4)


@pytest.mark.skipif(not any(b == "triton" for b, _ in BACKENDS), reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_triton_additive_attention_16bit(dtype):
    """The Triton kernels in 16-bit, with a mask and value columns walked in two blocks (block_dv=16)."""
    kw = dict(block_dv=16)
    check_op(ops.additive_attention, "triton", dtype, _args(3, 9, 6, 20, True), n_out=2, backward_args=_bwd, n_grads=4,
             forward_kwargs=kw, backward_kwargs=kw)
