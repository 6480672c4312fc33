"""Plain PyTorch versions of every seqfast kernel, one module per op family (same names as seqfast/ops/,
kernels/ and csrc/): the readable math and the oracle the kernels are tested against (besides torch.nn itself).

It runs only where forced (``SEQFAST_BACKEND=reference``) or where neither a seqfast kernel nor a torch op covers a
case; where seqfast has no faster kernel, dispatch calls torch's own op instead (see seqfast._backend).
"""
from .additive_attention import additive_attention_backward, additive_attention_forward
from .attention import sdpa_backward, sdpa_dropout, sdpa_forward
from .rnn_cell import (gru_cell_backward, gru_cell_forward, gru_gate_grads, lstm_cell_backward, lstm_cell_forward,
                       lstm_gate_grads, rnn_cell_backward, rnn_cell_forward, rnn_pre_grad)
from .rnn_sequence import (gru_layer_backward, gru_layer_forward, lstm_layer_backward, lstm_layer_forward,
                           lstm_proj_layer_backward, lstm_proj_layer_forward, rnn_layer_backward, rnn_layer_forward)

__all__ = [
    "lstm_cell_forward", "lstm_cell_backward", "gru_cell_forward", "gru_cell_backward", "rnn_cell_forward",
    "rnn_cell_backward", "lstm_gate_grads", "gru_gate_grads", "rnn_pre_grad",
    "lstm_layer_forward", "lstm_layer_backward", "lstm_proj_layer_forward", "lstm_proj_layer_backward",
    "gru_layer_forward", "gru_layer_backward", "rnn_layer_forward",
    "rnn_layer_backward",
    "sdpa_forward", "sdpa_backward", "sdpa_dropout",
    "additive_attention_forward", "additive_attention_backward",
]
