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


def test_vmap_over_attention_and_cells_gets_torchs_results():
    """torch.func.vmap over seqfast's C++ calls (SDPA, MultiheadAttention, a cell with and without grad mode): its
    batched tensors go to torch's ops or the reference, not to kernels that read their data pointers."""
    q, k, v = r(3, 2, 4, 5, 8), r(3, 2, 4, 6, 8), r(3, 2, 4, 6, 8)
    got = torch.func.vmap(seqfast.functional.scaled_dot_product_attention)(q, k, v)
    torch.testing.assert_close(got, torch.func.vmap(F.scaled_dot_product_attention)(q, k, v), rtol=1e-5, atol=1e-5)
    ref, mod = torch.nn.GRUCell(8, 4), seqfast.nn.GRUCell(8, 4)
    mod.load_state_dict(ref.state_dict())
    x, h = r(3, 2, 8), r(3, 2, 4)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(torch.func.vmap(mod)(x, h), torch.func.vmap(ref)(x, h), rtol=1e-5, atol=1e-5)
    mha_ref = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    mha = seqfast.nn.MultiheadAttention(8, 2, batch_first=True)
    mha.load_state_dict(mha_ref.state_dict())
    xs = r(3, 2, 5, 8)

    def run(m):
        return torch.func.vmap(lambda t: m(t, t, t, need_weights=False)[0])(xs)
    torch.testing.assert_close(run(mha), run(mha_ref), rtol=1e-5, atol=1e-5)


def test_bahdanau_values_batch_mismatch_without_keys_is_a_value_error():
    m = seqfast.nn.BahdanauAttention(4, 6, 5)
    q, k, v = r(2, 4), r(2, 3, 6), r(3, 3, 7)
    for kwargs in (dict(keys=k), dict(keys=None, projected_keys=m.precompute_keys(k))):
        with pytest.raises(ValueError, match="values batch"):
            m(q, values=v, **kwargs)
