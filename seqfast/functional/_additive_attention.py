"""Functional additive (Bahdanau) attention for one decoder step, on seqfast's fused additive-attention op."""
from ..ops import additive_attention as _ops


def additive_attention(query_proj, keys_proj, v, values, mask=None):
    """weights = softmax over the unmasked s of ``v . tanh(query_proj + keys_proj[:, s])``, context = weights @ values.

    query_proj [B, A] (W q), keys_proj [B, S, A] (U k), v [A], values [B, S, Dv], mask [B, S] bool (True = attend)
    or None. Returns (context [B, Dv], weights [B, S]); a row with every position masked gives zeros.
    """
    return _ops.additive_attention(query_proj.contiguous(), keys_proj.contiguous(), v, values.contiguous(),
                                   None if mask is None else mask.contiguous())
