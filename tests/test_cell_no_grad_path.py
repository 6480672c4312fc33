"""The no-grad cell step (seqfast.functional._rnn_cell._no_grad_kernel): a decoder step under no_grad /
inference_mode calls the C++ forward straight after the native checks. It must give torch's results, take the
regular path wherever that path decides something (grad mode, autocast, a rule preferring torch's op, a forced
backend, another dtype), and leave torch's errors as they were."""
import pytest
import torch

import seqfast
from conftest import CELL_KINDS as CELLS
from conftest import TensorSubclass, assert_raises_like_torch, convert_by_swapping, copies, cpp_config
from conftest import cell_pair as _pair
from conftest import cell_states as _states
from conftest import flat_outputs as _flat
from seqfast import _ext, _rules

pytestmark = pytest.mark.skipif(_ext.module() is None or not _ext.module().rnn_kernels_supported(),
                                reason="seqfast._C not built or its RNN kernels do not run on this CPU")


@pytest.mark.parametrize("kind,kw", CELLS)
@pytest.mark.parametrize("batch", [1, 3, 40, 0])  # 0: unbatched
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch(kind, kw, batch, bias, dtype, no_grad_kernel_calls):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw, dtype, bias)
    x = torch.randn((batch, 5) if batch else (5,), dtype=dtype)
    hx = _states(kind, batch, dtype=dtype)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            before = len(no_grad_kernel_calls)
            got, want = _flat(mod(x, hx)), _flat(ref(x, hx))
            assert len(no_grad_kernel_calls) == before + 1  # this call took the no-grad path
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_strided_states_and_weights(no_grad_kernel_calls):
    """Arguments as they come (transposed views, a stride-0 bias): the C++ entry makes them dense."""
    torch.manual_seed(0)
    w_ih, w_hh = torch.randn(5, 28).t(), torch.randn(7, 28).t()
    b_ih, b_hh = torch.randn(1).expand(28), torch.randn(28)
    x, h, c = torch.randn(5, 3).t(), torch.randn(7, 3).t(), torch.randn(3, 14)[:, ::2]
    with torch.no_grad():
        got = seqfast.functional.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
        want = torch._VF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    assert no_grad_kernel_calls == ["lstm_cell"]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_regular_path_where_it_decides(no_grad_kernel_calls):
    torch.manual_seed(0)
    ref, mod = _pair("LSTMCell", {})
    x, hx = torch.randn(3, 5), _states("LSTMCell", 3)
    # grad mode: autograd records the op
    out = mod(x, hx)
    assert out[0].requires_grad and no_grad_kernel_calls == []
    with torch.no_grad():
        # float64 input against float32 weights: the regular path raises torch's error
        assert_raises_like_torch(ref, mod, (x.double(), tuple(h.double() for h in hx)), same_message=False)
        # a rule preferring torch's op for this cell in inference
        saved = list(_rules.RULES)
        try:
            _rules.set_rules([_rules.Rule("lstm_cell", torch.float32, (_rules.cpu_class(),), training=False,
                                          source="test")])
            torch.testing.assert_close(mod(x, hx), ref(x, hx))
        finally:
            _rules.set_rules(saved)
        assert no_grad_kernel_calls == []
        # a forced backend
        with seqfast.use_backend("reference"):
            torch.testing.assert_close(mod(x, hx), ref(x, hx))
        assert no_grad_kernel_calls == []
        # autocast: the op picks its dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mod(x, hx)
        assert no_grad_kernel_calls == []
        mod(x, hx)
        assert no_grad_kernel_calls == ["lstm_cell"]


@pytest.mark.parametrize("kind,kw", CELLS)
def test_errors_as_torch(kind, kw):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw)
    lstm = kind == "LSTMCell"
    bad = [
        (torch.randn(3, 4), _states(kind, 3)),  # input size
        (torch.randn(3, 5), _states(kind, 2)),  # batch
        (torch.randn(3, 5), (torch.randn(3, 6), torch.randn(3, 7)) if lstm else torch.randn(3, 6)),  # hidden size
        (torch.randn(3, 5), (torch.randn(3, 7), torch.randn(3, 6)) if lstm else torch.randn(3, 8)),
    ]
    with torch.no_grad():
        for args in bad:
            assert_raises_like_torch(ref, mod, args)


# ---- seqfast._C.CellCall: the module's C++ step, asked first by forward ----

@pytest.mark.parametrize("kind,kw", CELLS)
def test_cell_call_declines_what_it_does_not_serve(kind, kw):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw)
    x, hx = torch.randn(3, 5), _states(kind, 3)
    with torch.no_grad():
        mod(x, hx)
    call = mod._seqfast_call
    recorded = _flat(call(x, hx))  # grad mode on, parameters requiring grad: the step recorded from C++
    assert all(o.grad_fn is not None for o in recorded)
    lstm = kind == "LSTMCell"
    with torch.no_grad():
        assert call(x, hx) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert call(x, hx) is None
        others = [(x.double(), hx), (torch.randn(5), hx), (x.as_subclass(TensorSubclass), hx), (x, None)]
        others.append((x, list(hx)) if lstm else (x, hx.as_subclass(TensorSubclass)))
        for args in others:
            assert call(*args) is None
            if args[1] is not None and args[0].dim() == 2 and args[0].dtype == x.dtype and type(args[0]) is torch.Tensor:
                torch.testing.assert_close(_flat(mod(*args)), _flat(ref(*args)))  # the Python path serves it
        assert not call.stale()
        mod.weight_ih = torch.nn.Parameter(torch.randn_like(mod.weight_ih))  # a replaced parameter
        ref.weight_ih = torch.nn.Parameter(mod.weight_ih.detach().clone())
        assert call(x, hx) is None and call.stale()
        torch.testing.assert_close(_flat(mod(x, hx)), _flat(ref(x, hx)))
        assert mod._seqfast_call is not call  # rebuilt
        call = mod._seqfast_call
        mod.double()  # the same parameter objects, another dtype
        ref.double()
        assert call.stale()
        x64, hx64 = x.double(), (tuple(h.double() for h in hx) if lstm else hx.double())
        torch.testing.assert_close(_flat(mod(x64, hx64)), _flat(ref(x64, hx64)))
        assert mod._seqfast_call(x64, hx64) is not None


def test_cell_call_follows_the_rule_table():
    torch.manual_seed(0)
    ref, mod = _pair("GRUCell", {})
    x, hx = torch.randn(3, 5), _states("GRUCell", 3)
    with torch.no_grad():
        mod(x, hx)
        call = mod._seqfast_call
        saved = list(_rules.RULES)
        try:
            _rules.set_rules([_rules.Rule("gru_cell", torch.float32, (_rules.cpu_class(),), training=False,
                                          batch=(3, 3), source="test")])
            assert call.stale() and call(x, hx) is None
            torch.testing.assert_close(mod(x, hx), ref(x, hx), rtol=0, atol=0)  # batch 3: torch's op
            assert mod._seqfast_call(x, hx) is None and not mod._seqfast_call.stale()
            x2, hx2 = torch.randn(2, 5), _states("GRUCell", 2)
            assert mod._seqfast_call(x2, hx2) is not None
        finally:
            _rules.set_rules(saved)


_FUNCTIONAL = {"LSTMCell": "lstm_cell", "GRUCell": "gru_cell", "RNNCell": "rnn_cell"}


@pytest.mark.parametrize("kind,kw", CELLS)
def test_cell_call_runs_torchs_op_without_a_cpp_kernel(kind, kw, monkeypatch):
    # bfloat16 cells have no C++ cell kernel: on a CPU with native bfloat16, seqfast.functional runs torch's cell op,
    # and the call runs it itself (where the fused bfloat16 steps run, the call takes its no-grad steps past the
    # float32 bound there: switched off here, checked in test_bf16_rnn_step.py)
    monkeypatch.setattr(_rules, "_UPCAST_BF16_CPUS", ())
    monkeypatch.setattr(_rules, "_FLOAT32_BF16_CPUS", ())
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw, torch.bfloat16)
    x, hx = torch.randn(3, 5, dtype=torch.bfloat16), _states(kind, 3, dtype=torch.bfloat16)
    with torch.no_grad(), cpp_config(bf16_rnn_step=False):
        torch.testing.assert_close(_flat(mod(x, hx)), _flat(ref(x, hx)), rtol=0, atol=0)  # torch's op: bit for bit
        call = mod._seqfast_call
        torch.testing.assert_close(_flat(call(x, hx)), _flat(ref(x, hx)), rtol=0, atol=0)
        for args in [(torch.randn(3, 4, dtype=torch.bfloat16), hx),  # torch's own errors
                     (x, _states(kind, 2, dtype=torch.bfloat16))]:
            assert_raises_like_torch(ref, mod, args)
    # where the functional computes bfloat16 in float32 (on a CPU without native bfloat16: seqfast._rules), the call
    # runs the steps that read the weights in place as the functional does (bf16_weights_in_place: up to 16 rows),
    # and leaves the upcast ones (upcast_bfloat16) to it, except where the fused bfloat16 step runs: that takes them
    monkeypatch.setattr(_rules, "_UPCAST_BF16_CPUS", (_rules.cpu_class(),))
    ref, mod = _pair(kind, kw, torch.bfloat16)
    with torch.no_grad():
        mod(x, hx)
        call = mod._seqfast_call
        if seqfast._C.bf16_cell_weights_supported():
            want = _flat(getattr(seqfast.functional, _FUNCTIONAL[kind])(x, hx, *mod.parameters(), **kw))
            torch.testing.assert_close(_flat(call(x, hx)), want, rtol=0, atol=0)  # 3 rows: in place, as the functional
        rows = _rules.BF16_IN_PLACE_MAX_ROWS + 1
        args = (torch.randn(rows, 5, dtype=torch.bfloat16), _states(kind, rows, dtype=torch.bfloat16))
        with cpp_config(bf16_rnn_step=False):
            assert call(*args) is None
        if _ext.module().bf16_rnn_step_available():  # float32 sums of bfloat16 products, rounded once
            torch.testing.assert_close(_flat(call(*args)), _flat(ref(*args)), rtol=3e-2, atol=3e-2)


def test_no_cell_call_is_retried_on_every_step(monkeypatch):
    from seqfast.nn import rnn_cell as nn_cell
    builds = []
    build = nn_cell._build_call
    monkeypatch.setattr(nn_cell, "_build_call", lambda *a: builds.append(a) or build(*a))
    torch.manual_seed(0)
    ref, mod = _pair("GRUCell", {})
    for m in (ref, mod):  # a parametrized weight is computed on every call: no call can hold it
        torch.nn.utils.parametrize.register_parametrization(m, "weight_hh", _Halved())
    x, hx = torch.randn(2, 5), _states("GRUCell", 2)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(mod(x, hx), ref(x, hx))
        assert mod.__dict__.get("_seqfast_call") is False and len(builds) == 1  # tried once, not on every step
        torch.nn.utils.parametrize.remove_parametrizations(mod, "weight_hh")  # a new parameter set: tried again
        torch.nn.utils.parametrize.remove_parametrizations(ref, "weight_hh")
        torch.testing.assert_close(mod(x, hx), ref(x, hx))
        assert mod.__dict__["_seqfast_call"] and len(builds) == 2


class _Halved(torch.nn.Module):
    def forward(self, w):
        return 0.5 * w


def test_cell_copies_build_their_own_call():
    torch.manual_seed(0)
    _, mod = _pair("RNNCell", {})
    x, hx = torch.randn(3, 5), _states("RNNCell", 3)
    with torch.no_grad():
        mod(x, hx)
    for twin in copies(mod):
        assert "_seqfast_call" not in twin.__dict__
        with torch.no_grad():
            torch.testing.assert_close(twin(x, hx), mod(x, hx))
            twin.weight_hh.mul_(2.0)  # the twin's call reads the twin's parameters
            assert not torch.allclose(twin(x, hx), mod(x, hx))


@pytest.mark.parametrize("kind,kw", CELLS)
def test_cell_swapped_parameters(kind, kw):
    # module.to() under torch.__future__.set_swap_module_params_on_conversion swaps each parameter's contents in
    # place (same Parameter objects): it must succeed after no-grad steps, and later steps read the new contents
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw)
    x, hx = torch.randn(3, 5), _states(kind, 3)
    with torch.no_grad():
        mod(x, hx)
        convert_by_swapping(mod, torch.float64, torch.float32)
        for p in mod.parameters():
            p.mul_(0.5)
        ref.load_state_dict(mod.state_dict())
        torch.testing.assert_close(_flat(mod(x, hx)), _flat(ref(x, hx)))
        assert mod._seqfast_call(x, hx) is not None


@pytest.mark.parametrize("kind,kw", CELLS)
def test_frozen_cell_in_grad_mode_takes_the_call(kind, kw, no_grad_kernel_calls):
    """Grad mode on, but nothing the step reads requires grad (a model frozen with requires_grad_(False)): torch's
    output does not require grad, so the C++ step serves it, with torch's results. A parameter, the input or a state
    that requires grad makes it a recorded step (the C++ node), and a forward-mode tangent sends it back to the
    regular path."""
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw)
    ref.requires_grad_(False)
    mod.requires_grad_(False)
    x, hx = torch.randn(3, 5), _states(kind, 3)
    got, want = _flat(mod(x, hx)), _flat(ref(x, hx))
    assert len(no_grad_kernel_calls) == 1  # built and served in grad mode
    for g, w in zip(got, want):
        assert not g.requires_grad and not w.requires_grad
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    call = mod._seqfast_call
    xg = x.clone().requires_grad_()
    assert _flat(call(xg, hx))[0].grad_fn is not None  # recorded (the C++ node)
    out, ref_out = _flat(mod(xg, hx))[0], _flat(ref(xg, hx))[0]
    (gx,) = torch.autograd.grad(out.sum(), xg)
    (wx,) = torch.autograd.grad(ref_out.sum(), xg)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-6)
    states = tuple(s.clone().requires_grad_() for s in hx) if kind == "LSTMCell" else hx.clone().requires_grad_()
    assert _flat(call(x, states))[0].grad_fn is not None
    assert _flat(mod(x, states))[0].requires_grad
    for name in ("weight_ih", "bias_hh"):
        getattr(mod, name).requires_grad_(True)
        assert _flat(call(x, hx))[0].grad_fn is not None
        assert _flat(mod(x, hx))[0].requires_grad
        getattr(mod, name).requires_grad_(False)
    assert len(no_grad_kernel_calls) == 1
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), torch.no_grad():
        assert call(fwAD.make_dual(x, torch.ones_like(x)), hx) is None


# the tolerance against torch.nn outside the rule's batches, where seqfast's own path runs (bfloat16: float32 kernels
# on the bfloat16 weights, rounded once, against torch's bfloat16 ops)
_OWN_PATH_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("kind,kw", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cell_call_runs_torchs_op_for_training_rules(kind, kw, dtype):
    """A step that autograd records, at a batch where the rule table prefers torch's op for training: the C++ call runs
    torch's cell op, recorded as torch records it (the module's output and gradients are torch.nn's, bit for bit);
    at other batches seqfast's kernels run, recorded from C++ (bfloat16: the call declines and seqfast.functional
    decides within the float32 bound, and runs torch's op past it). bfloat16 is
    a dtype whose no-grad steps the call runs as torch's op or on the float32 kernels."""
    family = {"LSTMCell": "lstm_cell", "GRUCell": "gru_cell", "RNNCell": "rnn_cell"}[kind]
    saved = list(_rules.RULES)
    try:
        _rules.set_rules([_rules.Rule(family, dtype, (_rules.cpu_class(),), training=True, batch=(3, 3),
                                      source="test")])
        torch.manual_seed(0)
        ref, mod = _pair(kind, kw, dtype=dtype)
        x, hx = torch.randn(3, 5, dtype=dtype, requires_grad=True), _states(kind, 3, dtype=dtype)
        got, want = _flat(mod(x, hx)), _flat(ref(x, hx))
        call = mod._seqfast_call
        assert call and all(o.requires_grad and o.dtype == dtype for o in _flat(call(x, hx)))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        params = list(mod.parameters()) + [x]
        grads = torch.autograd.grad(sum(g.float().square().sum() for g in got), params)
        ref_grads = torch.autograd.grad(sum(w.float().square().sum() for w in want), list(ref.parameters()) + [x])
        for g, w in zip(grads, ref_grads):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        x4, hx4 = torch.randn(4, 5, dtype=dtype, requires_grad=True), _states(kind, 4, dtype=dtype)
        # outside the rule's batches: seqfast's kernels, recorded from C++ (bfloat16: seqfast.functional decides
        # within the float32 bound; past it, on a CPU whose bound is 0 (AMX), the call runs torch's op itself)
        bf16_declines = dtype is torch.bfloat16 and _rules.float32_bfloat16_max_batch(family, 7) >= 4
        assert (call(x4, hx4) is None) == bf16_declines
        for g, w in zip(_flat(mod(x4, hx4)), _flat(ref(x4, hx4))):
            assert g.requires_grad and g.dtype == dtype
            torch.testing.assert_close(g.float(), w.float(), **_OWN_PATH_TOL[dtype])
        # a state of another batch: torch's error, as the module raises it
        bad = (x, tuple(h[:2] for h in hx)) if kind == "LSTMCell" else (x, hx[:2])
        assert_raises_like_torch(ref, mod, bad)
    finally:
        _rules.set_rules(saved)



@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("batch,hidden", [(1, 64), (2, 300), (1, 1400), (2, 1100)])
def test_gate_scratch_from_two_threads(kind, batch, hidden):
    # no-grad steps keep their gate workspace in a per-thread scratch where it fits (32 KB: the first two shapes)
    # and allocate it where it does not (GRU B1 H1400: 33.6 KB of pre-activations; LSTM B2 H1100: 35.2 KB); two
    # Python threads stepping at once (the GIL released in the kernel) each get torch's results, step after step
    import threading
    torch.manual_seed(batch * hidden)
    ref = getattr(torch.nn, kind)(hidden, hidden).double()
    mod = getattr(seqfast.nn, kind)(hidden, hidden)
    mod.load_state_dict(ref.state_dict())
    errors = []

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, hidden, generator=g)
        state = tuple(torch.randn(batch, hidden, generator=g) for _ in range(2 if kind == "LSTMCell" else 1))
        state = state if len(state) == 2 else state[0]
        want = tuple(s.double() for s in state) if isinstance(state, tuple) else state.double()
        try:
            for _ in range(20):
                with torch.no_grad():
                    state = mod(x, state)
                    want = ref(x.double(), want)
                got, exp = (state[0], want[0]) if isinstance(state, tuple) else (state, want)
                torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5)
        except AssertionError as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
