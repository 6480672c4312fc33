"""seqfast::lstm_layer / gru_layer / rnn_layer (and lstm_proj_layer, C++ only): every backend's kernels against the
reference, forward and backward, padded and packed, both directions, and each internal Triton path forced by its
launcher argument."""
import pytest
import torch

from conftest import HAVE_TRITON
from seqfast.ops import rnn_sequence as ops

from .parity import BACKENDS, CPP_PATHS, check_op, forced_cpp_path

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
# batch_sizes per step: padded (4 steps of 3), packed (decreasing, ends at 1), one step of one row
LAYOUTS = {"padded": [3, 3, 3, 3], "packed": [3, 3, 2, 1], "one-step": [1]}


def _args(kind, layout, I, H, reverse, bias=True):
    G = GATES[kind]
    bs = torch.tensor(LAYOUTS[layout], dtype=torch.int64)
    N, B = int(bs.sum()), int(bs[0])
    x, h0 = torch.randn(N, I), torch.randn(B, H)
    w = (torch.randn(G * H, I) * 0.4, torch.randn(G * H, H) * 0.4)
    b = (torch.randn(G * H), torch.randn(G * H)) if bias else (None, None)
    if kind == "lstm":
        return (x, bs, h0, torch.randn(B, H), *w, *b, reverse)
    return (x, bs, h0, *w, *b) + ((False,) if kind == "rnn" else ()) + (reverse,)


def _lstm_bwd(args, out, grads):
    x, bs, h0, c0, w_ih, w_hh = args[:6]
    o, hn, cn, gates, cs = out
    return (*grads[:3], x, bs, h0, c0, w_ih, w_hh, o, gates, cs, args[-1])


def _gru_bwd(args, out, grads):
    x, bs, h0, w_ih, w_hh = args[:5]
    return (*grads[:2], x, bs, h0, w_ih, w_hh, out[0], out[2], args[-1])


def _rnn_bwd(args, out, grads):
    x, bs, h0, w_ih, w_hh = args[:5]
    return (*grads[:2], x, bs, h0, w_ih, w_hh, out[0], args[-2], args[-1])


CASES = {  # kind -> (op, outputs compared, backward builder, input gradients compared)
    "lstm": (ops.lstm_layer, 3, _lstm_bwd, 6),
    "gru": (ops.gru_layer, 2, _gru_bwd, 6),
    "rnn": (ops.rnn_layer, 2, _rnn_bwd, 5),
}


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=lambda v: str(v).replace("torch.", ""))
def test_layer_kernels_match_reference(backend, dtype, kind, layout, reverse):
    op, n_out, bwd, n_grads = CASES[kind]
    check_op(op, backend, dtype, _args(kind, layout, 5, 6, reverse), n_out=n_out, backward_args=bwd,
             n_grads=n_grads, grad_scale=4.0)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_layer_kernels_without_bias(kind):
    op, n_out, bwd, n_grads = CASES[kind]
    check_op(op, "cpp", torch.float64, _args(kind, "packed", 4, 3, False, bias=False), n_out=n_out,
             backward_args=bwd, n_grads=n_grads)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
@pytest.mark.parametrize("path", [dict(persistent=True), dict(persistent=False), dict(persistent=False, block_m=16)],
                         ids=["persistent", "per-step", "per-step-block16"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_triton_sequence_paths_match_reference(kind, path):
    """Each internal path of the Triton sequence kernels, forced by the launcher's arguments."""
    op, n_out, bwd, n_grads = CASES[kind]
    check_op(op, "triton", torch.float32, _args(kind, "packed", 3, 5, True), n_out=n_out, backward_args=bwd,
             n_grads=n_grads, forward_kwargs=path, backward_kwargs=path, grad_scale=4.0)


@pytest.mark.parametrize("path", [p for p in CPP_PATHS if p != "default"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cpp_layer_paths_match_reference(kind, path):
    """Each internal path of the C++ sequence kernels, forced by an explicit set_config()."""
    op, n_out, bwd, n_grads = CASES[kind]
    for layout in ("padded", "packed"):
        with forced_cpp_path(path):
            check_op(op, "cpp", torch.float32, _args(kind, layout, 5, 6, True), n_out=n_out, backward_args=bwd,
                     n_grads=n_grads, grad_scale=4.0)


def _proj_args(layout, I, H, P, reverse, bias=True):
    bs = torch.tensor(LAYOUTS[layout], dtype=torch.int64)
    N, B = int(bs.sum()), int(bs[0])
    w = (torch.randn(4 * H, I) * 0.4, torch.randn(4 * H, P) * 0.4)
    b = (torch.randn(4 * H), torch.randn(4 * H)) if bias else (None, None)
    return (torch.randn(N, I), bs, torch.randn(B, P), torch.randn(B, H), *w, *b, torch.randn(P, H) * 0.4, reverse)


def _proj_bwd(args, out, grads):
    x, bs, h0, c0, w_ih, w_hh = args[:6]
    o, hn, cn, gates, cs, hs = out
    return (*grads[:3], x, bs, h0, c0, w_ih, w_hh, args[8], o, gates, cs, hs, args[-1])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_proj_layer_kernels_match_reference(dtype, layout, reverse, bias):
    """The C++ projected LSTM layer: outputs (out, hn, cn) and all seven gradients (dx, dh0, dc0, dW_ih, dW_hh, db,
    dW_hr)."""
    check_op(ops.lstm_proj_layer, "cpp", dtype, _proj_args(layout, 5, 6, 3, reverse, bias), n_out=3,
             backward_args=_proj_bwd, n_grads=7, grad_scale=4.0)
