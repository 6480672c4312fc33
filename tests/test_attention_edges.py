"""Attention calls at the edges of torch's contract, each against torch itself (its values, or the type of the error
it raises): empty query / key / batch dimensions with a mask, a mask together with is_causal at each rank,
enable_gqa on inputs without a head dimension, MultiheadAttention on an empty batch."""
import pytest
import torch
import torch.nn.functional as F

import seqfast

r = torch.randn


def _outcome(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e)


SDPA_CASES = {
    "no queries, float mask": lambda: ((r(2, 2, 0, 8), r(2, 2, 3, 8), r(2, 2, 3, 8)), dict(attn_mask=r(2, 2, 0, 3))),
    "no keys, bool mask": lambda: ((r(1, 2, 4, 8), r(1, 2, 0, 8), r(1, 2, 0, 8)),
                                   dict(attn_mask=torch.ones(1, 1, 4, 0, dtype=torch.bool))),
    "3-D, empty batch, mask": lambda: ((r(0, 1, 8), r(0, 3, 8), r(0, 3, 8)), dict(attn_mask=r(0, 1, 3))),
    "4-D empty batch": lambda: ((r(0, 2, 1, 8), r(0, 2, 5, 8), r(0, 2, 5, 8)), {}),
    "mask and causal, 3-D": lambda: ((r(12, 2, 64), r(12, 8, 64), r(12, 8, 64)),
                                     dict(attn_mask=r(12, 2, 8), is_causal=True)),
    "mask and causal, 5-D": lambda: ((r(1, 1, 2, 3, 8), r(1, 1, 2, 5, 8), r(1, 1, 2, 5, 8)),
                                     dict(attn_mask=r(3, 5), is_causal=True)),
    "mask and causal, 4-D": lambda: ((r(2, 2, 3, 8), r(2, 2, 5, 8), r(2, 2, 5, 8)),
                                     dict(attn_mask=r(3, 5), is_causal=True)),
    "bool mask and causal, 4-D": lambda: ((r(2, 2, 3, 8), r(2, 2, 5, 8), r(2, 2, 5, 8)),
                                          dict(attn_mask=torch.rand(3, 5) > 0.3, is_causal=True)),
    "enable_gqa, 2-D": lambda: ((r(4, 8), r(6, 8), r(6, 8)), dict(enable_gqa=True)),
}


@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_sdpa_edges_as_torch(name):
    args, kwargs = SDPA_CASES[name]()
    want = _outcome(F.scaled_dot_product_attention, *args, **kwargs)
    got = _outcome(seqfast.functional.scaled_dot_product_attention, *args, **kwargs)
    if isinstance(want, type):
        assert got is want
    else:
        assert isinstance(got, torch.Tensor) and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_empty_batch(need_weights, grad):
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    mod = seqfast.nn.MultiheadAttention(8, 2, batch_first=True)
    mod.load_state_dict(ref.state_dict())
    q, kv = r(0, 3, 8), r(0, 4, 8)
    with torch.set_grad_enabled(grad):
        want, got = ref(q, kv, kv, need_weights=need_weights), mod(q, kv, kv, need_weights=need_weights)
    assert got[0].shape == want[0].shape
    assert (got[1] is None) == (want[1] is None)
