"""Test set-up: Triton kernels run through Triton's interpreter on CPU tensors when there is no GPU. The variable must
be set before triton is first imported, hence here, before anything imports seqfast.kernels."""
import contextlib
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Pin the reference side's precision: float32 parity must not be judged against TF32 results on a GPU.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

import seqfast  # noqa: E402  (after TRITON_INTERPRET)

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend_device(backend):
    """Where a backend's tests run: cpp on CPU; triton on CUDA when present, else the interpreter on CPU."""
    return "cpu" if backend == "cpp" else DEVICE


# (backend, dtype) pairs each compiled path implements; the reference covers the rest.
BACKEND_DTYPES = [
    ("reference", torch.float64), ("reference", torch.float32),
    ("cpp", torch.float64), ("cpp", torch.float32),
    ("triton", torch.float32), ("triton", torch.float16), ("triton", torch.bfloat16),
]

# Tolerances (rtol, atol) against float64 torch.nn on the same (rounded) inputs. fp16/bf16 carry their storage
# rounding of gates and states (~2^-11 and 2^-8 relative) through a few ops, as Liger/flash-attn tests allow.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


@pytest.fixture(autouse=True)
def _seed(request):
    # random inputs every test, reproducible per test
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "triton" in item.nodeid and not HAVE_TRITON:
            item.add_marker(pytest.mark.skip(reason="triton not installed"))
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def assert_raises_like_torch(torch_module, our_module, args, same_message=True):
    """Our module raises the exception type torch's raises on the same bad call (and, by default, its message)."""
    with pytest.raises(Exception) as expected:
        torch_module(*args)
    with pytest.raises(expected.type) as got:
        our_module(*args)
    if same_message:
        assert str(got.value) == str(expected.value)


@pytest.fixture
def no_grad_kernel_calls(monkeypatch):
    """The op names of the cell steps that ran a no-grad kernel straight after the native checks, in call order: a
    module's C++ step (seqfast.nn.rnn_cell._fast_step) or the functional's no-grad path (seqfast.functional._rnn_cell
    ._no_grad_kernel)."""
    from seqfast.functional import _rnn_cell
    from seqfast.nn import rnn_cell as nn_cell
    calls = []
    fast_step = nn_cell._fast_step

    def counting_step(module, family, input, hx):
        result = fast_step(module, family, input, hx)
        # (a recorded step, which the C++ step also takes, leaves a graph: not a no-grad kernel call)
        if result is not None and (result[0] if isinstance(result, tuple) else result).grad_fn is None:
            calls.append(family)
        return result
    monkeypatch.setattr(nn_cell, "_fast_step", counting_step)
    original = _rnn_cell._no_grad_kernel

    def counting(op, input):
        kernel = original(op, input)
        if kernel is None:
            return None

        def run(*args):
            calls.append(op.name)
            return kernel(*args)
        return run
    monkeypatch.setattr(_rnn_cell, "_no_grad_kernel", counting)
    return calls


def bfloat16_and_float64(kind, *args, **kw):
    """seqfast's nn module ``kind`` in bfloat16 and torch's float64 twin holding the same (bfloat16-rounded) values."""
    ours = getattr(seqfast.nn, kind)(*args, **kw).to(torch.bfloat16)
    ref = getattr(torch.nn, kind)(*args, **kw).double()
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, ref


def float32_and_float64(kind, *args, **kw):
    """seqfast's nn module ``kind`` in float32 and torch's float64 twin holding the same values."""
    ref = getattr(torch.nn, kind)(*args, **kw).double()
    ours = getattr(seqfast.nn, kind)(*args, **kw)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def compare_inference_with_torch(ours, ref, x, **tol):
    """A float32 seqfast RNN module's no-grad call on the C++ backend against its float64 torch twin on input ``x``:
    the output and every final state."""
    with torch.no_grad(), seqfast.use_backend("cpp"):
        out, state = ours(x)
    with torch.no_grad():
        out_r, state_r = ref(x.double())
    states, states_r = (state, state_r) if isinstance(state, tuple) else ((state,), (state_r,))
    for got, want in zip((out, *states), (out_r, *states_r)):
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.fixture
def no_rules():
    """An empty rule table inside the test (seqfast's own paths wherever they take the call), restored after it. On a
    CPU with native bfloat16 the table sends bfloat16 LSTM layers to torch's op before any float32 path is tried."""
    from seqfast import _rules
    saved = list(_rules.RULES)
    _rules.set_rules([])
    yield
    _rules.set_rules(saved)


def bfloat16_paths_taken(monkeypatch, rule):
    """seqfast._rules' float32 paths for bfloat16 (upcast_bfloat16, bf16_weights_in_place) allowed on this CPU class,
    and the decision ``rule`` (one of them, by name) spied on; -> the list of the row counts it let through."""
    from seqfast import _rules
    monkeypatch.setattr(_rules, "_UPCAST_BF16_CPUS", (_rules.cpu_class(),))
    taken, original = [], getattr(_rules, rule)

    def spy(tensors, rows, *shape):
        verdict = original(tensors, rows, *shape)
        if verdict:
            taken.append(rows)
        return verdict
    monkeypatch.setattr(_rules, rule, spy)
    return taken


@pytest.fixture
def two_threads():
    """torch.set_num_threads(2) for the test, restored after it: the kernels' team paths."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def team_config(**fields):
    """cpp_config with ``fields`` and a team of two for every step however small (par_min_work 1), with no back-off
    to one thread."""
    return cpp_config(par_min_work=1, contention_backoff=False, **fields)


@contextlib.contextmanager
def cpp_config(**fields):
    """seqfast._C's configuration with ``fields`` set inside the block (an internal path forced or switched off), the
    previous values restored after it."""
    from seqfast import _ext
    c = _ext.module()
    saved = {name: c.get_config()[name] for name in fields}
    c.set_config(**fields)
    try:
        yield
    finally:
        c.set_config(**saved)

def compare_rnn_with_torch(ours, ref, x, lengths=None, **tol):
    """A float32 seqfast RNN module on the C++ backend against its float64 torch twin, on input ``x`` (padded, or
    packed with ``lengths``): no-grad and grad-mode outputs and final states, then the gradients of the input and of
    every parameter for the same random gradients of the outputs."""
    from torch.nn.utils.rnn import pack_padded_sequence
    xs, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    if lengths is not None:
        ins = pack_padded_sequence(xs, lengths, enforce_sorted=False)
        inr = pack_padded_sequence(xr, lengths, enforce_sorted=False)
    else:
        ins, inr = xs, xr
    with seqfast.use_backend("cpp"):
        with torch.no_grad():
            out_ng = ours(ins)[0]
        out, state = ours(ins)
    out_r, state_r = ref(inr)
    if lengths is not None:
        out, out_r, out_ng = out.data, out_r.data, out_ng.data
    states, states_r = (state, state_r) if isinstance(state, tuple) else ((state,), (state_r,))
    torch.testing.assert_close(out_ng.double(), out_r.detach(), **tol)
    for got, want in zip((out, *states), (out_r, *states_r)):
        torch.testing.assert_close(got.double(), want.detach(), **tol)
    grads = [torch.randn_like(t) for t in (out_r, *states_r)]
    torch.autograd.backward([out, *states], [g.float() for g in grads])
    torch.autograd.backward([out_r, *states_r], grads)
    torch.testing.assert_close(xs.grad.double(), xr.grad, **tol)
    for (name, p), pr in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), pr.grad, **tol, msg=name)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """torch.set_num_threads(1) and (2) for the test, restored after it: the kernels' one-thread and team paths."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


# ---- for the no-grad C++ calls (seqfast._C.ModuleCall / CellCall / SdpaCall) ----

class TensorSubclass(torch.Tensor):
    """A plain torch.Tensor subclass: the no-grad C++ calls leave subclasses (which may override torch functions) to
    the Python path."""


def copies(module):
    """A deep copy and a torch.save / torch.load round trip of ``module``."""
    import copy
    import io
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return [copy.deepcopy(module), torch.load(buffer, weights_only=False)]


def convert_by_swapping(module, *dtypes):
    """module.to(dtype) for each of ``dtypes`` in turn, with torch swapping each parameter's contents in place (same
    Parameter objects; torch.__future__.set_swap_module_params_on_conversion), the flag restored after."""
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for dtype in dtypes:
            module.to(dtype)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


# ---- cell modules against torch.nn's (test_cell_no_grad_path.py, test_cell_recorded_step.py) ----
CELL_KINDS = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {}), ("RNNCell", {"nonlinearity": "relu"})]


def cell_pair(kind, kw, dtype=torch.float32, bias=True, input_size=5, hidden=7):
    """(torch.nn's cell, seqfast.nn's twin holding the same weights)."""
    ref = getattr(torch.nn, kind)(input_size, hidden, bias=bias, **kw).to(dtype)
    mod = getattr(seqfast.nn, kind)(input_size, hidden, bias=bias, **kw).to(dtype)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def cell_states(kind, batch, hidden=7, dtype=torch.float32, grad=False):
    """A cell's states as its forward takes them (batch 0: unbatched)."""
    def one():
        return torch.randn((batch, hidden) if batch else (hidden,), dtype=dtype, requires_grad=grad)
    return (one(), one()) if kind == "LSTMCell" else one()


def flat_outputs(out):
    return list(out) if isinstance(out, tuple) else [out]


def recorded_as_cell_steps(tensor):
    """Whether a C++ cell-step node (csrc/rnn/rnn_cell_autograd.cpp) lies among the first nodes of tensor's graph:
    the step was recorded from C++, not by the Python path."""
    nodes, seen = [tensor.grad_fn], 0
    while nodes and seen < 16:
        node = nodes.pop(0)
        seen += 1
        if node is None:
            continue
        if "CellStep" in node.name():
            return True
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return False
