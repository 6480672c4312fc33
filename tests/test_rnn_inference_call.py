"""The one-call no-grad forward of seqfast.nn.LSTM / GRU / RNN (seqfast._C.rnn_module_inference, taken by
_SeqfastRNNMixin._inference_call): torch's outputs on every module option, and the regular path (with torch's
errors) wherever the call needs more than that path gives."""
import pytest
import torch

import seqfast
from conftest import TensorSubclass, assert_raises_like_torch, convert_by_swapping, copies
from seqfast import _ext, _rules

pytestmark = pytest.mark.skipif(_ext.module() is None or not _ext.module().rnn_kernels_supported(),
                                reason="seqfast._C not built or its RNN kernels do not run on this CPU")

KINDS = [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})]


def _pair(kind, kw, dtype=torch.float32, **options):
    ref = getattr(torch.nn, kind)(5, 7, **kw, **options).to(dtype)
    mod = getattr(seqfast.nn, kind)(5, 7, **kw, **options).to(dtype)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def _flat(result):
    out, states = result
    return [out] + (list(states) if isinstance(states, tuple) else [states])


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True), (3, False)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 5), (1, 1, 5), (6, 5)])  # the last is unbatched
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch(kind, kw, num_layers, bidirectional, batch_first, bias, shape, dtype):
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw, dtype, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                     bias=bias)
    x = torch.randn(shape, dtype=dtype)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert mod._inference_call(x) is not None  # the one-call path serves this case
            assert mod._seqfast_call(x) is not None  # and so does its C++ twin, which forward asks first
            got, want = _flat(mod(x)), _flat(ref(x))
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _states(kind, num_layers, bidirectional, shape, hidden=7, dtype=torch.float32):
    """Random initial states for input ``shape`` (3-D batched, else unbatched), as the module takes them."""
    slices = num_layers * (2 if bidirectional else 1)
    size = (slices, shape[1], hidden) if len(shape) == 3 else (slices, hidden)
    h = torch.randn(size, dtype=dtype)
    return (h, torch.randn(size, dtype=dtype)) if kind == "LSTM" else h


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("shape", [(4, 3, 5), (1, 1, 5), (6, 5)])  # the last is unbatched
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_given_states_match_torch(kind, kw, num_layers, bidirectional, batch_first, shape, dtype):
    # a decoder calling the module one step at a time passes its state on every call: the C++ call serves that too
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw, dtype, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    x = torch.randn(shape, dtype=dtype)
    # batch_first moves the batch of the input, not of the states: their shape is as for time-major input
    time_major = (shape[1], shape[0], shape[2]) if len(shape) == 3 and batch_first else shape
    hx = _states(kind, num_layers, bidirectional, time_major, dtype=dtype)
    with torch.no_grad():
        got, want = _flat(mod(x, hx)), _flat(ref(x, hx))  # (the first call builds the C++ call)
        assert mod._seqfast_call(x, hx) is not None
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for g, h in zip(got[1:], hx if isinstance(hx, tuple) else (hx,)):
        assert g.data_ptr() != h.data_ptr()  # new final states, not the given ones


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_given_states_the_call_declines(kind):
    torch.manual_seed(0)
    ref, mod = _pair(kind, {}, num_layers=2)
    x = torch.randn(4, 3, 5)
    good = _states(kind, 2, False, x.shape)
    lstm = kind == "LSTM"
    bad = [_states(kind, 1, False, x.shape), _states(kind, 2, False, (4, 2, 5)), _states(kind, 2, False, (6, 5)),
           _states(kind, 2, False, x.shape, hidden=6), _states(kind, 2, False, x.shape, dtype=torch.float64)]
    bad.append(list(good) if lstm else good.as_subclass(TensorSubclass))
    if lstm:
        bad.append((good[0], good[1][:, :2]))
    with torch.no_grad():
        mod(x, good)
        call = mod._seqfast_call
        assert call(x, good) is not None
        for hx in bad:
            assert call(x, hx) is None
            try:  # the regular path: torch's result or torch's error
                want = ref(x, hx)
            except Exception as error:
                with pytest.raises(type(error)):
                    mod(x, hx)
            else:
                torch.testing.assert_close(_flat(mod(x, hx)), _flat(want))


def test_regular_path_where_the_call_needs_more():
    torch.manual_seed(0)
    ref, mod = _pair("LSTM", {}, num_layers=2, dropout=0.5)
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        assert mod._inference_call(x) is None  # training with dropout: masks to draw
        mod.dropout = 0.0
        assert mod._inference_call(x) is not None
        mod.dropout = 0.5  # changed after a call: still read on every call
        assert mod._inference_call(x) is None
        mod.eval()
        assert mod._inference_call(x) is not None
        with seqfast.use_backend("reference"):
            assert mod._inference_call(x) is None  # a forced backend
        assert mod._inference_call(x.to(torch.float16)) is None
    assert mod._inference_call(x) is not None  # (forward asks only without grad; the helper itself does not look)
    projected = seqfast.nn.LSTM(5, 7, proj_size=3).eval()
    with torch.no_grad():
        assert projected._inference_call(x) is None


def test_plan_follows_the_parameters():
    torch.manual_seed(0)
    ref, mod = _pair("GRU", {})
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(mod(x)[0], ref(x)[0])
        # a replaced parameter (new object) and a dtype change in place (.to keeps the Parameter objects)
        new = torch.nn.Parameter(torch.randn_like(mod.weight_hh_l0))
        mod.weight_hh_l0 = new
        ref.weight_hh_l0 = torch.nn.Parameter(new.detach().clone())
        torch.testing.assert_close(mod(x)[0], ref(x)[0])
        mod.double()
        ref.double()
        torch.testing.assert_close(mod(x.double())[0], ref(x.double())[0])


def test_computed_weights_are_never_kept():
    # a parametrization computes weight_hh_l0 from its original on every call: after the original changes in place
    # (an optimizer step), the next no-grad call must use the new weight
    torch.manual_seed(0)
    ref, mod = _pair("LSTM", {})
    for m in (ref, mod):
        torch.nn.utils.parametrize.register_parametrization(m, "weight_hh_l0", _Doubled())
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(mod(x)[0], ref(x)[0])
        for m in (ref, mod):
            m.parametrizations.weight_hh_l0.original.mul_(0.5)
        torch.testing.assert_close(mod(x)[0], ref(x)[0])
        # the same for an old-style weight_norm, which sets the weight attribute in a forward pre-hook
        wn_ref = torch.nn.utils.weight_norm(torch.nn.GRU(5, 7), "weight_ih_l0")
        wn_mod = torch.nn.utils.weight_norm(seqfast.nn.GRU(5, 7), "weight_ih_l0")
        wn_mod.load_state_dict(wn_ref.state_dict())
        torch.testing.assert_close(wn_mod(x)[0], wn_ref(x)[0])
        for m in (wn_ref, wn_mod):
            m.weight_ih_l0_g.mul_(2.0)
        torch.testing.assert_close(wn_mod(x)[0], wn_ref(x)[0])


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("args", [(torch.randn(4, 3, 6),), (torch.randn(4, 3, 5, dtype=torch.float64),),
                                  (torch.randn(0, 3, 5),), (torch.randn(2, 3, 4, 5),)])
def test_errors_as_torch(args):
    ref, mod = _pair("LSTM", {})
    with torch.no_grad():
        assert_raises_like_torch(ref, mod, args)


def test_empty_batch_as_torch():
    ref, mod = _pair("GRU", {})
    x = torch.randn(4, 0, 5)
    with torch.no_grad():
        for g, w in zip(_flat(mod(x)), _flat(ref(x))):
            assert g.shape == w.shape


# ---- seqfast._C.ModuleCall: the C++ twin of _inference_call that forward asks first ----

def _built(kind="LSTM", **options):
    """A module pair after one no-grad call (which builds the module's C++ call), and that call."""
    torch.manual_seed(0)
    ref, mod = _pair(kind, {}, **options)
    with torch.no_grad():
        mod(torch.randn(4, 3, 5))
    return ref, mod, mod._seqfast_call


def test_module_call_declines_what_it_does_not_serve():
    ref, mod, call = _built()
    x = torch.randn(4, 3, 5)
    assert call(x) is None  # grad mode on, parameters requiring grad: autograd must record the op
    with torch.no_grad():
        assert call(x) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert call(x) is None
        for other in (x.double(), torch.randn(4, 3, 6), torch.randn(2, 4, 3, 5), torch.randn(5), torch.randn(0, 3, 5),
                      torch.randn(4, 0, 5), x.as_subclass(TensorSubclass), [x]):
            assert call(other) is None
        mod.weight_hh_l0 = torch.nn.Parameter(torch.randn_like(mod.weight_hh_l0))  # a replaced parameter
        assert call(x) is None
        ref.weight_hh_l0 = torch.nn.Parameter(mod.weight_hh_l0.detach().clone())
        torch.testing.assert_close(_flat(mod(x)), _flat(ref(x)))  # the module built a new call
        call = mod._seqfast_call
        assert call(x) is not None
        mod.double()  # the same parameter objects, another dtype
        assert call(x) is None and call(x.double()) is None
        ref.double()
        torch.testing.assert_close(_flat(mod(x.double())), _flat(ref(x.double())))


def test_forward_asks_the_call_only_where_python_allows():
    _, mod = _pair("LSTM", {}, num_layers=2, dropout=0.5)
    with torch.no_grad():
        mod.eval()(torch.randn(4, 3, 5))  # (in training mode, with dropout, no call is built)
    call = mod._seqfast_call
    asked = []
    mod.__dict__["_seqfast_call"] = lambda x, hx=None, training=False: asked.append(x) or call(x, hx, training)
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        mod.eval()
        mod(x)
        assert len(asked) == 1
        mod(x, (torch.zeros(2, 3, 7), torch.zeros(2, 3, 7)))  # a given state: asked too
        assert len(asked) == 2
        mod.train()  # dropout to draw
        mod(x)
        with seqfast.use_backend("reference"):
            mod.eval()
            mod(x)
        assert len(asked) == 2


def test_module_call_follows_the_rule_table():
    """A rule for inference (batch 3, 2-4 steps) built into the C++ call: inside it the call runs torch's op itself
    (torch's results bit for bit, with and without a state, unbatched too when the rule covers batch 1); outside it
    (2 rows, 5 steps) seqfast's kernel."""
    ref, mod, call = _built()
    x = torch.randn(4, 3, 5)
    saved = list(_rules.RULES)
    try:
        _rules.set_rules([_rules.Rule("lstm", torch.float32, (_rules.cpu_class(),), training=False, batch=(3, 3),
                                      steps=(2, 4), source="test")])
        with torch.no_grad():
            assert call(x) is None  # built from the old table
            torch.testing.assert_close(_flat(mod(x)), _flat(ref(x)), rtol=0, atol=0)  # batch 3: torch's op
            new = mod._seqfast_call
            hx = (torch.randn(1, 3, 7), torch.randn(1, 3, 7))
            for args in ((x,), (x, hx)):
                got = new(*args)
                assert got is not None  # the new call runs torch's op for batch 3
                torch.testing.assert_close(_flat(got), _flat(ref(*args)), rtol=0, atol=0)
            for other in (torch.randn(4, 2, 5), torch.randn(5, 3, 5)):  # another batch, another length
                assert new(other) is not None
                torch.testing.assert_close(_flat(mod(other)), _flat(ref(other)))
            _rules.set_rules([_rules.Rule("lstm", torch.float32, (_rules.cpu_class(),), training=False, batch=(1, 1),
                                          steps=(2, 4), source="test")])
            xu = torch.randn(3, 5)  # unbatched: a batch of one
            mod(xu)
            got = mod._seqfast_call(xu)
            assert got is not None
            torch.testing.assert_close(_flat(got), _flat(ref(xu)), rtol=0, atol=0)
    finally:
        _rules.set_rules(saved)


def test_module_call_leaves_upcast_bfloat16_to_the_regular_path(monkeypatch):
    monkeypatch.setattr(_rules, "_UPCAST_BF16_CPUS", (_rules.cpu_class(),))
    mod = seqfast.nn.GRU(5, 7).to(torch.bfloat16)
    with torch.no_grad():
        mod(torch.randn(2, 1, 5, dtype=torch.bfloat16))
        call = mod._seqfast_call
        # up to 16 rows the call runs them as cell steps (test_cell_steps.py), more go to the upcast path
        assert call(torch.randn(8, 2, 5, dtype=torch.bfloat16)) is not None
        assert call(torch.randn(17, 1, 5, dtype=torch.bfloat16)) is None


def test_copies_build_their_own_call():
    _, mod, _ = _built()
    x = torch.randn(4, 3, 5)
    for twin in copies(mod):
        assert "_seqfast_call" not in twin.__dict__
        with torch.no_grad():
            torch.testing.assert_close(twin(x), mod(x))
            twin.weight_ih_l0.mul_(2.0)  # the twin's call reads the twin's parameters, not the original's
            assert not torch.allclose(twin(x)[0], mod(x)[0])


def test_swapped_parameters():
    # module.to() under torch.__future__.set_swap_module_params_on_conversion swaps each parameter's contents in
    # place (same Parameter objects): it must succeed after no-grad calls, and later calls read the new contents
    torch.manual_seed(0)
    ref, mod = _pair("LSTM", {}, num_layers=2)
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        mod(x)
        convert_by_swapping(mod, torch.float64, torch.float32)
        for p in mod.parameters():
            p.mul_(0.5)
        ref.load_state_dict(mod.state_dict())
        assert mod._seqfast_call(x) is not None
        torch.testing.assert_close(_flat(mod(x)), _flat(ref(x)))


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("with_states", [False, True])
def test_frozen_module_in_grad_mode_takes_the_call(kind, kw, with_states):
    """Grad mode on, but nothing the call reads requires grad (a model frozen with requires_grad_(False)): torch's
    outputs do not require grad, so the no-grad call serves it, with torch's results. A parameter, the input or a state
    that requires grad, or a forward-mode tangent, sends the call back to the regular path (autograd records it)."""
    torch.manual_seed(0)
    ref, mod = _pair(kind, kw, num_layers=2)
    ref.requires_grad_(False)
    mod.requires_grad_(False)
    x = torch.randn(4, 3, 5)
    hx = _states(kind, 2, False, x.shape) if with_states else None
    assert torch.is_grad_enabled()
    got, want = _flat(mod(x, hx)), _flat(ref(x, hx))
    call = mod._seqfast_call
    assert call is not None and call(x, hx) is not None  # built and served in grad mode
    for g, w in zip(got, want):
        assert not g.requires_grad and not w.requires_grad
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # something the call reads requires grad: the regular path, which records it as torch does
    xg = x.clone().requires_grad_()
    assert call(xg, hx) is None
    out, ref_out = _flat(mod(xg, hx))[0], _flat(ref(xg, hx))[0]
    assert out.requires_grad
    (gx,) = torch.autograd.grad(out.sum(), xg)
    (wx,) = torch.autograd.grad(ref_out.sum(), xg)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-6)
    if with_states:
        states = tuple(s.clone().requires_grad_() for s in hx) if kind == "LSTM" else hx.clone().requires_grad_()
        assert call(x, states) is None
        assert _flat(mod(x, states))[0].requires_grad
    mod.weight_hh_l1.requires_grad_(True)
    assert call(x, hx) is None
    assert _flat(mod(x, hx))[0].requires_grad
    mod.weight_hh_l1.requires_grad_(False)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), torch.no_grad():
        assert call(fwAD.make_dual(x, torch.ones_like(x)), hx) is None


def _grad_states(kind, slices, batch, batched=True):
    shape = (slices, batch, 7) if batched else (slices, 7)
    h = torch.randn(shape, requires_grad=True)
    return (h, torch.randn(shape, requires_grad=True)) if kind == "LSTM" else h


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first", [(1, False, False), (2, True, True)])
@pytest.mark.parametrize("state", [False, True])
def test_module_call_runs_torchs_op_for_training_rules(kind, kw, num_layers, bidirectional, batch_first, state):
    """A call that autograd records, inside a (batch, steps) region where the rule table prefers torch's op for
    training: the C++ call runs torch's op, recorded as torch records it (outputs and gradients torch.nn's, bit for
    bit; batched, unbatched, with and without states, in train and eval mode); outside the region it declines and
    seqfast's autograd op runs."""
    family = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}[kind]
    saved = list(_rules.RULES)
    try:
        _rules.set_rules([_rules.Rule(family, torch.float32, (_rules.cpu_class(),), training=True, batch=(1, 3),
                                      steps=(2, 4), source="test")])
        torch.manual_seed(0)
        ref, mod = _pair(kind, kw, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
        slices = num_layers * (2 if bidirectional else 1)
        for shape, batched in (((3, 2, 5), True), ((4, 5), False)):  # steps x batch (or batch x steps), unbatched
            batch = shape[1 - int(batch_first)] if batched else 1
            x = torch.randn(shape, requires_grad=True)
            hx = _grad_states(kind, slices, batch, batched) if state else None
            for training in (True, False):
                mod.train(training)
                ref.train(training)
                got, want = _flat(mod(x, hx)), _flat(ref(x, hx))
                call = mod._seqfast_call
                assert call and all(o.requires_grad for o in _flat(call(x, hx, training)))
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, rtol=0, atol=0)
                leaves = [x] + ([] if hx is None else list(hx) if kind == "LSTM" else [hx])
                grads = torch.autograd.grad(sum(g.square().sum() for g in got), list(mod.parameters()) + leaves)
                ref_grads = torch.autograd.grad(sum(w.square().sum() for w in want), list(ref.parameters()) + leaves)
                for g, w in zip(grads, ref_grads):
                    torch.testing.assert_close(g, w, rtol=0, atol=0)
        # outside the region (5 steps; batch 4): seqfast's autograd op, torch's results within tolerance
        for shape in ((5, 2, 5), (3, 4, 5) if not batch_first else (4, 3, 5)):
            x = torch.randn(shape, requires_grad=True)
            assert mod._seqfast_call(x, None, True) is None
            for g, w in zip(_flat(mod(x)), _flat(ref(x))):
                assert g.requires_grad
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        # a state of another batch: torch's error, as the module raises it
        x = torch.randn((2, 3, 5) if batch_first else (3, 2, 5), requires_grad=True)
        bad = _grad_states(kind, slices, 1)
        assert_raises_like_torch(ref, mod, (x, bad))
    finally:
        _rules.set_rules(saved)
