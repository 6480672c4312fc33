"""seqfast::lstm_cell / gru_cell / rnn_cell: every backend's kernels against the reference, forward and backward."""
import pytest
import torch

from seqfast.ops import rnn_cell as ops

from .parity import BACKENDS, CPP_PATHS, check_op, forced_cpp_path

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
# (batch, input, hidden): one row (the C++ GEMV step), two rows, odd sizes, hidden 1
SHAPES = [(1, 5, 7), (2, 3, 4), (5, 6, 3), (3, 2, 1)]


def _args(kind, B, I, H, bias, relu=False):
    G = GATES[kind]
    x, h = torch.randn(B, I), torch.randn(B, H)
    w_ih, w_hh = torch.randn(G * H, I) * 0.4, torch.randn(G * H, H) * 0.4
    b = (torch.randn(G * H), torch.randn(G * H)) if bias else (None, None)
    if kind == "lstm":
        return (x, h, torch.randn(B, H), w_ih, w_hh, *b)
    return (x, h, w_ih, w_hh, *b) + ((relu,) if kind == "rnn" else ())


def _lstm_bwd(args, out, grads):
    x, hx, cx, w_ih, w_hh = args[:5]
    hy, cy, gates = out
    return (grads[0], grads[1], x, hx, cx, w_ih, w_hh, gates, cy)


def _gru_bwd(args, out, grads):
    x, hx, w_ih, w_hh = args[:4]
    return (grads[0], x, hx, w_ih, w_hh, out[1])


def _rnn_bwd(args, out, grads):
    x, hx, w_ih, w_hh = args[:4]
    return (grads[0], x, hx, w_ih, w_hh, out[0], args[-1])


CASES = {  # kind -> (op, outputs compared, backward builder, input gradients compared)
    "lstm": (ops.lstm_cell, 2, _lstm_bwd, 6),
    "gru": (ops.gru_cell, 1, _gru_bwd, 6),
    "rnn": (ops.rnn_cell, 1, _rnn_bwd, 5),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-I{}-H{}".format(*s))
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=lambda v: str(v).replace("torch.", ""))
def test_cell_kernels_match_reference(backend, dtype, kind, shape, bias):
    op, n_out, bwd, n_grads = CASES[kind]
    if backend == "triton" and shape != SHAPES[0] and not bias:
        pytest.skip("interpreter time: bias=False runs on one shape")
    check_op(op, backend, dtype, _args(kind, *shape, bias), n_out=n_out, backward_args=bwd, n_grads=n_grads)


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=lambda v: str(v).replace("torch.", ""))
def test_rnn_cell_relu_kernels_match_reference(backend, dtype):
    op, n_out, bwd, n_grads = CASES["rnn"]
    check_op(op, backend, dtype, _args("rnn", 4, 3, 5, True, relu=True), n_out=n_out, backward_args=bwd,
             n_grads=n_grads)


@pytest.mark.parametrize("path", [p for p in CPP_PATHS if p != "default"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_cpp_cell_paths_match_reference(kind, path):
    """Each internal path of the C++ cell kernels, forced by an explicit set_config()."""
    op, n_out, bwd, n_grads = CASES[kind]
    for shape in ((1, 5, 7), (9, 6, 20)):
        with forced_cpp_path(path):
            check_op(op, "cpp", torch.float32, _args(kind, *shape, True), n_out=n_out, backward_args=bwd,
                     n_grads=n_grads)
