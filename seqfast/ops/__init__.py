"""Registered custom ops (torch.ops.seqfast.*) with fake implementations and autograd formulas, one module per op
family: each names its kernels on every backend (seqfast.reference.<family>, seqfast._C, seqfast.kernels.<family>)."""
from . import rnn_cell  # noqa: F401  (registers seqfast::lstm_cell, gru_cell, rnn_cell)
from . import rnn_sequence  # noqa: F401  (registers seqfast::lstm_layer, gru_layer, rnn_layer)
from . import attention  # noqa: F401  (registers seqfast::sdpa)
from . import additive_attention  # noqa: F401  (registers seqfast::additive_attention)
