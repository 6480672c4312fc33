"""The functional API: one function per fused op, with torch's argument checks and error messages, one module per op
family (rnn_cell, rnn_sequence, attention, additive_attention). The nn modules call only these."""
from .additive_attention import additive_attention
from .attention import dot_attention, multi_head_attention_forward, scaled_dot_product_attention
from .rnn_cell import gru_cell, lstm_cell, rnn_cell
from .rnn_sequence import recurrent

__all__ = ["lstm_cell", "gru_cell", "rnn_cell", "recurrent", "scaled_dot_product_attention",
           "multi_head_attention_forward", "dot_attention", "additive_attention"]
