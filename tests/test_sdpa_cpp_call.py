"""seqfast._C.SdpaCall, which seqfast.functional.scaled_dot_product_attention asks first for an unmasked call: it runs
the C++ kernel on 4-D CPU calls with no graph to record (no grad mode, or no input requiring grad) outside the rule
table's torch regions, with torch's results; torch's op, recorded by autograd, for calls with gradients inside the
table's training regions; and declines (None) wherever the function's regular path decides: gradients outside those
regions, forward-mode AD, autocast, tensor subclasses, other ranks, GQA or broadcast batches, empty shapes, mixed
dtypes, a scale that is not a number, an inference torch region, a changed rule table."""
import pytest
import torch
import torch.nn.functional as F

import seqfast
from conftest import TensorSubclass
from seqfast import _ext, _rules
from seqfast.functional import _attention

pytestmark = pytest.mark.skipif(_ext.module() is None or not _ext.module().rnn_kernels_supported(),
                                reason="seqfast._C not built or its kernels do not run on this CPU")

sdpa = seqfast.functional.scaled_dot_product_attention


@pytest.fixture
def no_rules(monkeypatch):
    """An empty rule table and no bfloat16 upcast (every case is seqfast's kernel's on any CPU); the call built from
    it."""
    monkeypatch.setattr(_rules, "_UPCAST_BF16_CPUS", ())
    monkeypatch.setattr(_rules, "_FLOAT32_BF16_CPUS", ())
    monkeypatch.setattr(_rules, "_FLOAT32_BF16_SDPA_CPUS", ())
    saved = list(_rules.RULES)
    _rules.set_rules([])
    yield _attention._build_cpp_call()
    _rules.set_rules(saved)


def test_leaves_bfloat16_to_the_upcast_where_it_applies(monkeypatch):
    """On a CPU class whose bfloat16 SDPA may upcast (seqfast._rules.sdpa_upcasts_bfloat16), bfloat16 calls of 2+ query
    rows are declined (the Python path decides); decoder steps (1 row) are still served."""
    monkeypatch.setattr(_rules, "_UPCAST_BF16_CPUS", (_rules.cpu_class(),))
    saved = list(_rules.RULES)
    _rules.set_rules([])
    try:
        call = _attention._build_cpp_call()
        q, k, v = _qkv((2, 3, 4, 16), (2, 3, 5, 16), (2, 3, 5, 16), torch.bfloat16)
        with torch.no_grad():
            assert call(q, k, v, False, None, False) is None
            assert call(q[:, :, :1], k, v, False, None, False) is not None
            assert call(q.float(), k.float(), v.float(), False, None, False) is not None
    finally:
        _rules.set_rules(saved)


def _qkv(q_shape, k_shape, v_shape, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(s, dtype=dtype) for s in (q_shape, k_shape, v_shape)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("L,S,D,Dv", [(1, 1, 16, 16), (1, 300, 13, 70), (3, 5, 16, 8), (70, 70, 64, 64),
                                      (9, 4, 8, 8)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3, 2])
def test_serves_with_torchs_results(no_rules, dtype, L, S, D, Dv, is_causal, scale):
    q, k, v = _qkv((2, 3, L, D), (2, 3, S, D), (2, 3, S, Dv), dtype)
    with torch.no_grad():
        got = no_rules(q, k, v, is_causal, scale, False)
        assert got is not None
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=is_causal, scale=scale)
        assert got.dtype == dtype and got.shape == want.shape
        tol = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float32: dict(rtol=1e-4, atol=1e-4),
               torch.float64: dict(rtol=1e-10, atol=1e-10)}[dtype]
        torch.testing.assert_close(got.double(), want, **tol)
        torch.testing.assert_close(sdpa(q, k, v, is_causal=is_causal, scale=scale), got, rtol=0, atol=0)


def test_reads_strided_views(no_rules):
    q, k, v = _qkv((2, 5, 3, 16), (2, 7, 3, 16), (2, 7, 3, 16))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [N, H, len, dim] views of [N, len, H, dim]
    with torch.no_grad():
        torch.testing.assert_close(no_rules(q, k, v, False, None, False), F.scaled_dot_product_attention(q, k, v),
                                   rtol=1e-5, atol=1e-6)


def test_declines_what_it_does_not_serve(no_rules):
    call = no_rules
    q, k, v = _qkv((2, 3, 4, 16), (2, 3, 5, 16), (2, 3, 5, 8))
    for i in range(3):  # grad mode, one input requiring grad, no training region: seqfast's autograd op decides
        args = [q, k, v]
        args[i] = args[i].detach().requires_grad_()
        assert call(*args, False, None, False) is None
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), torch.no_grad():  # a tangent is recorded in any grad mode
        assert call(fwAD.make_dual(q, torch.ones_like(q)), k, v, False, None, False) is None
        assert call(q, k, fwAD.make_dual(v, torch.ones_like(v)), False, None, False) is None
    with torch.no_grad():
        assert call(q, k, v, False, None, False) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert call(q, k, v, False, None, False) is None
        bad = [
            (q.as_subclass(TensorSubclass), k, v), (q, k.as_subclass(TensorSubclass), v),
            (q[0], k[0], v[0]),  # 3-D
            (q, k[:, :1], v[:, :1]),  # GQA (one kv head)
            (q, k[:1], v[:1]),  # a batch to broadcast
            (q, k.double(), v), (q.double(), k, v),  # mixed dtypes
            (q.half(), k.half(), v.half()),  # no C++ kernel
            (q[..., :0], k[..., :0], v),  # empty head dim
            (q[:, :, :0], k, v), (q, k[:, :, :0], v[:, :, :0]),  # no queries / no keys
            (q, k, v[:, :, :4]),  # key / value lengths differ
            (q, k[..., :8], v),  # head dims differ
        ]
        for args in bad:
            assert call(*args, False, None, False) is None
            with pytest.raises(Exception) if _raises(args) else _nothing():
                torch.testing.assert_close(sdpa(*args), F.scaled_dot_product_attention(*args), rtol=1e-3, atol=1e-3)
        for scale in ("0.3", torch.tensor(0.3), [0.3]):
            assert call(q, k, v, False, scale, False) is None


def _raises(args):
    try:
        F.scaled_dot_product_attention(*args)
        return False
    except Exception:
        return True


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_runs_torchs_op_in_torch_regions_and_declines_a_changed_table():
    saved = list(_rules.RULES)
    q, k, v = _qkv((1, 2, 3, 16), (1, 2, 9, 16), (1, 2, 9, 16))
    try:
        _rules.set_rules([])
        call = _attention._build_cpp_call()
        with torch.no_grad():
            assert call(q, k, v, False, None, False) is not None
            _rules.set_rules([_rules.Rule("sdpa", torch.float32, (_rules.cpu_class(),), training=False, batch=(3, 3),
                                          hidden=(9, 9), head_dim=(16, 16), causal=True, source="test")])
            assert call.stale() and call(q, k, v, False, None, False) is None  # built from the old table
            torch.testing.assert_close(sdpa(q, k, v, is_causal=True),
                                       F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)
            call = _attention._cpp_call
            assert not call.stale()  # the function built a new one
            # inside the region: torch's op, run by the call itself
            torch.testing.assert_close(call(q, k, v, True, None, False),
                                       F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)
            torch.testing.assert_close(call(q, k, v, True, 0.3, False),
                                       F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3), rtol=0,
                                       atol=0)
            assert call(q, k, v, True, "x", False) is None  # a scale torch rejects: the regular path raises
            assert call(q, k, v, False, None, False) is not None  # not causal: outside it
            assert call(q[:, :, :2], k, v, True, None, False) is not None  # another query length
            # a training-only region leaves inference to seqfast
            _rules.set_rules([_rules.Rule("sdpa", torch.float32, (_rules.cpu_class(),), training=True,
                                          source="test")])
            assert _attention._build_cpp_call()(q, k, v, True, None, False) is not None
    finally:
        _rules.set_rules(saved)
        _attention._build_cpp_call()


def test_declined_regions_go_to_the_regular_path():
    # the regions seqfast._rules.sdpa_declined_regions gives (bfloat16 calls the Python path may upcast), checked
    # before the table's
    q, k, v = _qkv((1, 2, 3, 16), (1, 2, 9, 16), (1, 2, 9, 16))
    inf = 1 << 62
    every = (torch.float32, 0, inf, 0, inf, 0, inf, -1)
    module = _ext.module()
    with torch.no_grad():
        assert module.SdpaCall([torch.float32], [], [], [every])(q, k, v, False, None, False) is None
        assert module.SdpaCall([torch.float32], [every], [], [every])(q, k, v, False, None, False) is None
        torch.testing.assert_close(module.SdpaCall([torch.float32], [every], [], [])(q, k, v, False, None, False),
                                   F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
        other = (torch.bfloat16, 0, inf, 0, inf, 0, inf, -1)
        assert module.SdpaCall([torch.float32], [], [], [other])(q, k, v, False, None, False) is not None


def test_function_asks_the_call_only_where_python_allows(no_rules, monkeypatch):
    asked = []
    monkeypatch.setattr(_attention, "_cpp_call", lambda *a: asked.append(a) or no_rules(*a))
    q, k, v = _qkv((1, 2, 1, 16), (1, 2, 9, 16), (1, 2, 9, 16))
    with torch.no_grad():
        sdpa(q, k, v)
        assert len(asked) == 1
        sdpa(q, k, v, attn_mask=torch.ones(1, 9, dtype=torch.bool))  # a mask: the regular path
        sdpa(q, k, v, dropout_p=0.5)
        with seqfast.use_backend("reference"):
            sdpa(q, k, v)
        assert len(asked) == 1


def test_serves_grad_mode_calls_that_record_nothing(no_rules):
    """Grad mode on, but no input requires grad: torch's output would not require grad either, so the kernel runs."""
    q, k, v = _qkv((2, 3, 4, 16), (2, 3, 5, 16), (2, 3, 5, 8))
    assert torch.is_grad_enabled()
    got = no_rules(q, k, v, True, None, False)
    with torch.no_grad():
        want = no_rules(q, k, v, True, None, False)
    assert got is not None and not got.requires_grad and got.grad_fn is None
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("is_causal,scale", [(False, None), (True, 0.3), (False, 2)])
def test_training_regions_run_torchs_op_with_its_gradients(is_causal, scale):
    """With gradients inside a training region the call is torch's own op: the same output and, through autograd, the
    same gradients as torch.nn.functional.scaled_dot_product_attention, bit for bit."""
    saved = list(_rules.RULES)
    try:
        _rules.set_rules([_rules.Rule("sdpa", torch.float32, (_rules.cpu_class(),), training=True, batch=(1, 1),
                                      hidden=(1, 64), source="test")])
        call = _attention._build_cpp_call()
        q, k, v = (t.requires_grad_() for t in _qkv((2, 3, 1, 16), (2, 3, 9, 16), (2, 3, 9, 12)))
        got = call(q, k, v, is_causal, scale, False)
        assert got is not None and got.requires_grad
        grads = torch.autograd.grad(got.square().sum(), (q, k, v))
        want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        # the function takes that route too
        torch.testing.assert_close(sdpa(q, k, v, is_causal=is_causal, scale=scale), want, rtol=0, atol=0)
        # outside the region (65 keys; 2 query rows): seqfast's autograd op, by the regular path
        k2, v2 = (torch.randn(2, 3, 65, d, requires_grad=True) for d in (16, 12))
        assert call(q, k2, v2, is_causal, scale, False) is None
        assert call(torch.randn(2, 3, 2, 16, requires_grad=True), k, v, is_causal, scale, False) is None
        for s in ("0.3", [0.3]):  # not a number: the regular path raises torch's error
            assert call(q, k, v, is_causal, s, False) is None
        with torch.no_grad():  # no graph: the kernel (the region is a training one)
            assert not call(q, k, v, is_causal, scale, False).requires_grad
    finally:
        _rules.set_rules(saved)
        _attention._build_cpp_call()
