"""Drop-in LSTM / GRU / RNN: torch's classes (constructor, parameters, init, state_dict, flatten_parameters, checks)
with a forward that runs seqfast's fused per-layer recurrences (seqfast.functional.recurrent)."""
import torch
from torch.nn.utils.rnn import PackedSequence

from .. import functional as seqfast_F
from ._parameters import parameters_named


class _SeqfastRNNMixin:
    """The input handling of torch.nn.RNNBase.forward (packed / batched / unbatched / batch_first, default and permuted
    states, torch's own checks), around seqfast.functional.recurrent."""

    _kind = None  # "lstm" | "gru" | "rnn"

    def _layer_weights(self):
        return [parameters_named(self, names) for names in self._all_weights]

    def _prepare_states(self, hx, batch, input, is_batched):
        lstm = self._kind == "lstm"
        dirs = 2 if self.bidirectional else 1
        if hx is None:
            h_size = self.proj_size if lstm and self.proj_size > 0 else self.hidden_size
            zeros = lambda size: torch.zeros(self.num_layers * dirs, batch, size, dtype=input.dtype,  # noqa: E731
                                             device=input.device)
            return (zeros(h_size), zeros(self.hidden_size)) if lstm else zeros(h_size)
        if is_batched is None:  # packed input: states were given in the caller's (unsorted) batch order
            return hx
        want = 3 if is_batched else 2
        name = "3-D input" if is_batched else "2-D input"
        if lstm:
            if hx[0].dim() != want or hx[1].dim() != want:
                raise RuntimeError(f"For {'batched' if is_batched else 'unbatched'} {name}, hx and cx should also be "
                                   f"{want}-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            return hx if is_batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if hx.dim() != want:
            raise RuntimeError(f"For {'batched' if is_batched else 'unbatched'} {name}, hx should also be {want}-D "
                               f"but got {hx.dim()}-D tensor")
        return hx if is_batched else hx.unsqueeze(1)

    def forward(self, input, hx=None):
        # (no self._update_flat_weights(): torch keeps _flat_weights for its cuDNN/oneDNN calls; the weights are read
        # by name in _layer_weights, which is all seqfast uses, and the check costs as much as a small step)
        packed = isinstance(input, PackedSequence)
        name = type(self).__name__
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            given = hx is not None
            hx = self._prepare_states(hx, int(batch_sizes[0]), data, None)
            if given:
                hx = self.permute_hidden(hx, sorted_indices)
            self.check_forward_args(data, hx, batch_sizes)
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                noun = " tensor" if self._kind == "rnn" else ""  # torch's RNN words it so
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{noun} instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
            batch = input.size(0 if self.batch_first else 1)
            hx = self._prepare_states(hx, batch, input, is_batched)
            self.check_forward_args(input, hx, None)
            batch_sizes = None
            data = input.transpose(0, 1) if self.batch_first else input  # time-major
        h0, c0 = hx if self._kind == "lstm" else (hx, None)
        out, hn, cn = seqfast_F.recurrent(
            self._kind, data, h0, c0, self._layer_weights(), batch_sizes=batch_sizes,
            num_layers=self.num_layers, bidirectional=self.bidirectional, dropout=self.dropout,
            training=self.training, nonlinearity=getattr(self, "nonlinearity", "tanh"),
            proj_size=getattr(self, "proj_size", 0))
        if packed:
            output = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
            states = (hn, cn) if self._kind == "lstm" else hn
            return output, self.permute_hidden(states, unsorted_indices)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not is_batched:
            out = out.squeeze(0 if self.batch_first else 1)
            hn = hn.squeeze(1)
            cn = None if cn is None else cn.squeeze(1)
        return out, ((hn, cn) if self._kind == "lstm" else hn)


class LSTM(_SeqfastRNNMixin, torch.nn.LSTM):
    __doc__ = torch.nn.LSTM.__doc__
    _kind = "lstm"


class GRU(_SeqfastRNNMixin, torch.nn.GRU):
    __doc__ = torch.nn.GRU.__doc__
    _kind = "gru"


class RNN(_SeqfastRNNMixin, torch.nn.RNN):
    __doc__ = torch.nn.RNN.__doc__
    _kind = "rnn"
