"""Drop-in replacements for torch.nn's recurrent and attention modules (same constructors, parameters, state_dict)."""
from .attention import BahdanauAttention, LuongAttention, MultiheadAttention
from .rnn import GRU, LSTM, RNN
from .rnn_cell import GRUCell, LSTMCell, RNNCell

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "MultiheadAttention", "LuongAttention",
           "BahdanauAttention"]
