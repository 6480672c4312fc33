"""Drop-in LSTMCell / GRUCell / RNNCell: torch's classes (constructor, parameters, init, state_dict, checks) with a
forward that runs seqfast's fused cell kernels."""
import torch

from .. import functional as seqfast_F
from ._parameters import parameters_named


def _unbatched(module_name, input, states, names):
    """torch's input-rank checks; True when input is 1-D (one sample), after which the caller unsqueezes."""
    dim = input.dim()
    if dim != 1 and dim != 2:
        raise ValueError(f"{module_name}: Expected input to be 1D or 2D, got {dim}D instead")
    for name, value in zip(names, states):
        if value is not None and value.dim() not in (1, 2):
            raise ValueError(f"{module_name}: Expected {name} to be 1D or 2D, got {value.dim()}D instead")
    return dim == 1


_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # the functional cells' argument order


def _zeros(module, input):
    return torch.zeros(input.size(0), module.hidden_size, dtype=input.dtype, device=input.device)


class LSTMCell(torch.nn.LSTMCell):
    __doc__ = torch.nn.LSTMCell.__doc__

    def forward(self, input, hx=None):
        if input.dim() == 2 and hx is not None and len(hx) == 2 and hx[0].dim() == 2 and hx[1].dim() == 2:
            # a batched step with its states given: nothing to adapt
            return seqfast_F.lstm_cell(input, hx, *parameters_named(self, _WEIGHTS))
        states = (None, None) if hx is None else hx
        single = _unbatched("LSTMCell", input, states, ("hx[0]", "hx[1]", "hx[2]"))
        if single:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = [h.unsqueeze(0) for h in hx]
        if hx is None:
            zeros = _zeros(self, input)
            hx = (zeros, zeros)
        hy, cy = seqfast_F.lstm_cell(input, hx, *parameters_named(self, _WEIGHTS))
        return (hy.squeeze(0), cy.squeeze(0)) if single else (hy, cy)


class GRUCell(torch.nn.GRUCell):
    __doc__ = torch.nn.GRUCell.__doc__

    def forward(self, input, hx=None):
        if input.dim() == 2 and hx is not None and hx.dim() == 2:  # a batched step with a state: nothing to adapt
            return seqfast_F.gru_cell(input, hx, *parameters_named(self, _WEIGHTS))
        single = _unbatched("GRUCell", input, (hx,), ("hidden",))
        if single:
            input = input.unsqueeze(0)
            hx = None if hx is None else hx.unsqueeze(0)
        hy = seqfast_F.gru_cell(input, _zeros(self, input) if hx is None else hx, *parameters_named(self, _WEIGHTS))
        return hy.squeeze(0) if single else hy


class RNNCell(torch.nn.RNNCell):
    __doc__ = torch.nn.RNNCell.__doc__

    def forward(self, input, hx=None):
        if input.dim() == 2 and hx is not None and hx.dim() == 2:  # a batched step with a state: nothing to adapt
            return seqfast_F.rnn_cell(input, hx, *parameters_named(self, _WEIGHTS), self.nonlinearity)
        single = _unbatched("RNNCell", input, (hx,), ("hidden",))
        if single:
            input = input.unsqueeze(0)
            hx = None if hx is None else hx.unsqueeze(0)
        hy = seqfast_F.rnn_cell(input, _zeros(self, input) if hx is None else hx, *parameters_named(self, _WEIGHTS),
                                self.nonlinearity)
        return hy.squeeze(0) if single else hy
