"""Drop-in LSTMCell / GRUCell / RNNCell: torch's classes (constructor, parameters, init, state_dict, checks) with a
forward that runs seqfast's fused cell kernels."""
import torch

from .. import functional as F


def _batch(module_name, input, states, names):
    """torch's unbatched-input handling: returns (input [B, I], states as [B, H] or None, was_batched)."""
    if input.dim() not in (1, 2):
        raise ValueError(f"{module_name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for name, value in zip(names, states):
        if value is not None and value.dim() not in (1, 2):
            raise ValueError(f"{module_name}: Expected {name} to be 1D or 2D, got {value.dim()}D instead")
    batched = input.dim() == 2
    if not batched:
        input = input.unsqueeze(0)
        states = [None if s is None else s.unsqueeze(0) for s in states]
    return input, states, batched


def _zeros(module, input):
    return torch.zeros(input.size(0), module.hidden_size, dtype=input.dtype, device=input.device)


class LSTMCell(torch.nn.LSTMCell):
    __doc__ = torch.nn.LSTMCell.__doc__

    def forward(self, input, hx=None):
        states = [None, None] if hx is None else list(hx)
        input, states, batched = _batch("LSTMCell", input, states, [f"hx[{i}]" for i in range(len(states))])
        if hx is None:
            states = [_zeros(self, input)] * 2
        hy, cy = F.lstm_cell(input, states, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return (hy, cy) if batched else (hy.squeeze(0), cy.squeeze(0))


class GRUCell(torch.nn.GRUCell):
    __doc__ = torch.nn.GRUCell.__doc__

    def forward(self, input, hx=None):
        input, (hx,), batched = _batch("GRUCell", input, [hx], ["hidden"])
        hy = F.gru_cell(input, _zeros(self, input) if hx is None else hx, self.weight_ih, self.weight_hh,
                        self.bias_ih, self.bias_hh)
        return hy if batched else hy.squeeze(0)


class RNNCell(torch.nn.RNNCell):
    __doc__ = torch.nn.RNNCell.__doc__

    def forward(self, input, hx=None):
        input, (hx,), batched = _batch("RNNCell", input, [hx], ["hidden"])
        hy = F.rnn_cell(input, _zeros(self, input) if hx is None else hx, self.weight_ih, self.weight_hh,
                        self.bias_ih, self.bias_hh, self.nonlinearity)
        return hy if batched else hy.squeeze(0)
