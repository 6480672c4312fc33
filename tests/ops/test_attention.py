"""seqfast::sdpa: every backend's kernels against the reference, forward and backward (causal, masks, GQA, odd
sizes, the decode path), each internal Triton path forced by its launcher argument, and the fully masked row
contract (output 0, gradients 0, lse -inf) on every backend."""
import math

import pytest
import torch

from conftest import HAVE_TRITON
from seqfast.ops import attention as ops

from .parity import BACKENDS, CPP_PATHS, check_op, forced_cpp_path


def _args(N, Hq, Hk, L, S, D, Dv, causal=False, mask=None):
    q, k, v = torch.randn(N, Hq, L, D), torch.randn(N, Hk, S, D), torch.randn(N, Hk, S, Dv)
    bias = None
    if mask == "float":
        bias = torch.randn(N, Hq, L, S)
    elif mask == "padding":  # [N, 1, 1, S] broadcast view, -inf on padded keys
        keep = torch.rand(N, 1, 1, S) > 0.3
        keep[..., 0] = True
        bias = torch.zeros(N, 1, 1, S).masked_fill(~keep, float("-inf")).expand(N, Hq, L, S)
    return (q, k, v, bias, causal, 1 / math.sqrt(D))


def _bwd(args, out, grads):
    q, k, v, bias, causal, scale = args
    return (grads[0], q, k, v, out[0], out[1], bias, causal, scale)


SHAPES = {  # name -> (N, Hq, Hk, L, S, D, Dv)
    "square": (2, 2, 2, 9, 9, 8, 8),
    "gqa-odd": (1, 4, 2, 5, 7, 6, 3),
    "decode": (3, 2, 1, 1, 11, 16, 8),
    "long-key": (1, 1, 1, 3, 37, 4, 5),
}


@pytest.mark.parametrize("mask", [None, "float", "padding"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=lambda v: str(v).replace("torch.", ""))
def test_sdpa_kernels_match_reference(backend, dtype, shape, causal, mask):
    if backend == "triton" and mask == "float" and shape != "square":
        pytest.skip("interpreter time: the float mask runs on one shape")
    args = _args(*SHAPES[shape], causal=causal, mask=mask)
    check_op(ops.sdpa, backend, dtype, args, n_out=1, backward_args=_bwd, n_grads=3)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
@pytest.mark.parametrize("path", [dict(block_m=16, block_n=16), dict(block_m=32, block_n=16)],
                         ids=["blocks16x16", "blocks32x16"])
def test_triton_sdpa_block_sizes_match_reference(path):
    """Several query and key blocks per head (the multi-block loops), forced by the launcher's block sizes."""
    args = _args(1, 2, 1, 40, 37, 8, 8, causal=True)
    check_op(ops.sdpa, "triton", torch.float32, args, n_out=1, backward_args=_bwd, n_grads=3, forward_kwargs=path,
             backward_kwargs=path)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
@pytest.mark.parametrize("splits", [2, 3])
def test_triton_decode_splits_match_reference(splits):
    """The split-KV decoder step with its combine kernel (one split is all a CPU run picks by itself)."""
    args = _args(2, 2, 2, 1, 45, 8, 8, mask="padding")
    check_op(ops.sdpa, "triton", torch.float32, args, n_out=1, backward_args=_bwd, n_grads=3,
             forward_kwargs=dict(num_splits=splits, block_n=16))


@pytest.mark.parametrize("backend", ["reference"] + sorted({b for b, _ in BACKENDS}))
def test_fully_masked_rows_give_zero_and_minus_inf_lse(backend):
    """The one contract (seqfast/reference/attention.py): output 0, gradients 0, lse -inf, on every backend."""
    q, k, v, _, _, scale = _args(1, 2, 2, 3, 4, 8, 8)
    bias = torch.zeros(1, 2, 3, 4)
    bias[0, :, 1] = float("-inf")  # query row 1 sees no key
    kernels = ops.sdpa.kernels(backend)
    out, lse = kernels.forward(q, k, v, bias, False, scale)
    assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1]))
    assert torch.isneginf(lse[0, :, 1]).all(), lse[0, :, 1]
    assert torch.isfinite(lse[0, :, [0, 2]]).all()
    dq, dk, dv = kernels.backward(torch.randn_like(out), q, k, v, out, lse, bias, False, scale)
    assert torch.equal(dq[0, :, 1], torch.zeros_like(dq[0, :, 1]))


@pytest.mark.parametrize("path", [p for p in CPP_PATHS if p != "default"])
@pytest.mark.parametrize("shape", ["square", "decode"])
def test_cpp_sdpa_paths_match_reference(shape, path):
    """Each internal path of the C++ attention kernels, forced by an explicit set_config()."""
    with forced_cpp_path(path):
        check_op(ops.sdpa, "cpp", torch.float32, _args(*SHAPES[shape], causal=True, mask="padding"), n_out=1,
                 backward_args=_bwd, n_grads=3)


@pytest.mark.parametrize("mask", [None, "float", "padding"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(3, 2, 1, 1, 11, 16, 8), (1, 4, 2, 1, 7, 5, 3), (2, 1, 1, 1, 1, 8, 8)],
                         ids=["decode", "decode-gqa-odd", "one-key"])
def test_cpp_bfloat16_decoder_step_matches_reference(shape, causal, mask):
    """The C++ bfloat16 decoder step (one query row: K and V streamed as bfloat16 into float math) and the backward
    after it, against the float64 reference on the same bfloat16 values."""
    torch.manual_seed(0)
    check_op(ops.sdpa, "cpp", torch.bfloat16, _args(*shape, causal=causal, mask=mask), n_out=1, backward_args=_bwd,
             n_grads=3)


def test_cpp_bfloat16_decoder_step_strided_and_masked_rows():
    """K / V as strided views (keys not contiguous), a head whose keys are all masked (output 0, lse -inf) and a NaN
    key (its head's output NaN), as the float32 step does."""
    from seqfast import _ext
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 8).bfloat16()
    k = torch.randn(2, 2, 8, 13).bfloat16().transpose(2, 3)  # [2, 2, 13, 8], key rows 1 element apart
    v = torch.randn(2, 13, 2, 6).bfloat16().transpose(1, 2)  # [2, 2, 13, 6]
    bias = torch.zeros(2, 4, 1, 13).bfloat16()
    bias[1, 3] = float("-inf")
    out, lse = _ext.module().sdpa_forward(q, k, v, bias, False, 0.3)
    want, want_lse = ops.sdpa.kernels("reference").forward(*(t.double() for t in (q, k, v, bias)), False, 0.3)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(lse[~torch.isinf(want_lse)].double(), want_lse[~torch.isinf(want_lse)], rtol=1e-2,
                               atol=1e-2)
    assert torch.equal(out[1, 3], torch.zeros_like(out[1, 3])) and torch.isneginf(lse[1, 3]).all()
    k = k.clone()
    k[0, 1, 4, 2] = float("nan")
    out, _ = _ext.module().sdpa_forward(q, k, v, None, False, 0.3)
    assert out[0, 2:].isnan().all() and not out[0, :2].isnan().any()
