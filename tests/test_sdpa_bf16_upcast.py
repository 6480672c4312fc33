"""bfloat16 SDPA without gradients on a CPU without native bfloat16 (seqfast._rules.sdpa_upcasts_bfloat16): computed
by the float32 path on upcast copies, the output rounded to bfloat16 once, where the float32 table keeps seqfast's
kernel. The path is allowed on this CPU's class here (and the float32 table emptied), so it is tested on any machine:
outputs against float64 torch on the same bfloat16 values, and torch's own op or errors wherever a call does not
qualify."""
import pytest
import torch
import torch.nn.functional as F

import seqfast
from seqfast import _rules

BF16 = torch.bfloat16
sdpa = seqfast.functional.scaled_dot_product_attention


@pytest.fixture
def upcasts(monkeypatch):
    """The upcast allowed on this CPU class under an empty rule table; -> the verdicts of the decision, in order."""
    monkeypatch.setattr(_rules, "_UPCAST_BF16_CPUS", (_rules.cpu_class(),))
    saved = list(_rules.RULES)
    _rules.set_rules([])
    # the Python copies themselves, as on a CPU whose op does not compute bfloat16 in float32 (the direct route:
    # test_sdpa_bf16_float32_blocks.py)
    from seqfast.functional import _attention
    monkeypatch.setattr(_attention, "_op_upcasts", lambda query: False)
    verdicts, original = [], _rules.sdpa_upcasts_bfloat16

    def spy(*args):
        verdicts.append(original(*args))
        return verdicts[-1]
    monkeypatch.setattr(_rules, "sdpa_upcasts_bfloat16", spy)
    yield verdicts
    _rules.set_rules(saved)


def _bf16(*shape):
    return torch.randn(*shape).to(BF16)


def _want(q, k, v, mask=None, **kw):
    """torch's SDPA in float64 on the same bfloat16 values."""
    mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask, **kw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (1, 2, 19, 16), (3, 33, 12)])
def test_matches_float64_torch(upcasts, causal, shape):
    torch.manual_seed(0)
    q, k, v = _bf16(*shape), _bf16(*shape[:-2], 7, shape[-1]), _bf16(*shape[:-2], 7, 5)
    with torch.no_grad():
        got = sdpa(q, k, v, is_causal=causal)
    assert upcasts and upcasts[0]
    assert got.dtype == BF16 and got.shape == (*shape[:-1], 5)
    torch.testing.assert_close(got.double(), _want(q, k, v, is_causal=causal), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mask_dtype", [torch.bool, BF16])
def test_masks_scale_and_gqa(upcasts, mask_dtype):
    torch.manual_seed(0)
    q, k, v = _bf16(2, 4, 6, 8), _bf16(2, 2, 9, 8), _bf16(2, 2, 9, 8)
    mask = torch.rand(6, 9) > 0.3 if mask_dtype is torch.bool else _bf16(2, 1, 6, 9)
    with torch.no_grad():
        got = sdpa(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert upcasts == [True]
    want = _want(q, k, v, mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_calls_that_do_not_qualify_run_as_before(upcasts):
    torch.manual_seed(0)
    q, k, v = _bf16(1, 2, 6, 8), _bf16(1, 2, 6, 8), _bf16(1, 2, 6, 8)
    # a decoder step (query length 1: the bfloat16 decode kernel reads its rows as they are)
    with torch.no_grad():
        step = sdpa(q[:, :, :1], k, v)
    torch.testing.assert_close(step.double(), _want(q[:, :, :1], k, v), rtol=2e-2, atol=2e-2)
    # gradients: seqfast's bfloat16 kernels (forward and backward), as before
    qg = q.clone().requires_grad_()
    out = sdpa(qg, k, v)
    out.float().sum().backward()
    assert not any(upcasts) and qg.grad.dtype == BF16
    # dropout, a forced backend, autocast: never asked
    n = len(upcasts)
    with torch.no_grad():
        sdpa(q, k, v, dropout_p=0.5)
        with seqfast.use_backend("torch"):
            torch.testing.assert_close(sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
        with torch.autocast("cpu", dtype=BF16):
            sdpa(q, k, v)
    assert not any(upcasts[n:])


def test_float32_rule_keeps_torchs_op(upcasts):
    """Where the float32 table prefers torch's op for the shape, the bfloat16 call does not upcast."""
    _rules.set_rules([_rules.Rule("sdpa", torch.float32, (_rules.cpu_class(),), training=False, batch=(2, 64),
                                  source="test")])
    q, k, v = _bf16(1, 2, 6, 8), _bf16(1, 2, 6, 8), _bf16(1, 2, 6, 8)
    with torch.no_grad():
        sdpa(q, k, v)
        sdpa(_bf16(1, 2, 65, 8), k, v)
    assert upcasts == [False, True]


def test_upcast_rule_keeps_torchs_bfloat16_op(upcasts):
    """Where an "sdpa_upcast" rule covers the shape, the bfloat16 call does not upcast although the float32 table
    would keep seqfast's kernel: it goes on to the bfloat16 table, here (as in seqfast's own) torch's bfloat16 op."""
    here = (_rules.cpu_class(),)
    _rules.set_rules([_rules.Rule("sdpa_upcast", BF16, here, training=False, batch=(2, 64), causal=False,
                                  head_dim=(9, 64), source="test"),
                      _rules.Rule("sdpa", BF16, here, training=False, batch=(2, 64), source="test")])
    torch.manual_seed(0)
    q, k, v = _bf16(1, 2, 6, 16), _bf16(1, 2, 7, 16), _bf16(1, 2, 7, 16)
    with torch.no_grad():
        kept = sdpa(q, k, v)
        sdpa(q, k, v, is_causal=True)        # causal: outside the rule
        sdpa(q[..., :8], k[..., :8], v)      # head dim 8: outside
    assert upcasts == [False, True, True]
    assert torch.equal(kept, F.scaled_dot_product_attention(q, k, v))


def test_mixed_dtypes_raise_torchs_error(upcasts):
    q, k, v = _bf16(1, 2, 6, 8), torch.randn(1, 2, 6, 8), _bf16(1, 2, 6, 8)
    with pytest.raises(RuntimeError, match="same dtype"):
        with torch.no_grad():
            sdpa(q, k, v)
    with pytest.raises(RuntimeError, match="same dtype"):
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)
    assert upcasts == [False]


def test_not_on_cpus_with_native_bfloat16(monkeypatch):
    monkeypatch.setattr(_rules, "_UPCAST_BF16_CPUS", ())
    monkeypatch.setattr(_rules, "_FLOAT32_BF16_SDPA_CPUS", ())
    q = _bf16(1, 2, 6, 8)
    with torch.no_grad():
        assert not _rules.sdpa_upcasts_bfloat16(q, q, q, False)
