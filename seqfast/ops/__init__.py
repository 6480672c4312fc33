"""Registered custom ops (torch.ops.seqfast.*) with fake implementations and autograd formulas."""
from . import rnn_cell  # noqa: F401  (registers seqfast::lstm_cell, gru_cell, rnn_cell)
from . import rnn_sequence  # noqa: F401  (registers seqfast::lstm_layer, gru_layer, rnn_layer)
from . import attention  # noqa: F401  (registers seqfast::sdpa, additive_attention)
