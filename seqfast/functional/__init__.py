"""The functional API: one function per fused op, with torch's argument checks and error messages. Each op family
(rnn_cell, rnn_sequence, attention, additive_attention) is implemented in ``_<family>.py``: the leading underscore
keeps a module's name from clashing with the function it exports (``seqfast.functional.rnn_cell`` is the Elman cell
function). The nn modules call only these."""
from ._additive_attention import additive_attention
from ._attention import dot_attention, multi_head_attention_forward, scaled_dot_product_attention
from ._rnn_cell import gru_cell, lstm_cell, rnn_cell
from ._rnn_sequence import recurrent

__all__ = ["lstm_cell", "gru_cell", "rnn_cell", "recurrent", "scaled_dot_product_attention",
           "multi_head_attention_forward", "dot_attention", "additive_attention"]
