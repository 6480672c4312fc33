"""Drop-in LSTM / GRU / RNN: torch's classes (constructor, parameters, init, state_dict, flatten_parameters, checks)
with a forward that runs seqfast's fused per-layer recurrences (seqfast.functional.recurrent)."""
import torch
from torch.nn.utils.rnn import PackedSequence

from .. import _backend, _ext, _rules, autotune as _autotune
from .. import functional as seqfast_F
from ..functional import _rnn_cell, _rnn_sequence
from ..functional._rnn_sequence import _kernel_layout
from ..ops import rnn_sequence as _ops
from ._parameters import parameters_named
from ._recording import recorded


def _check_lstm_states(hx):
    """torch's checks of an LSTM's (h_0, c_0) that its op's argument parser makes (TypeError, then the count:
    RuntimeError): a tensor stacking h_0 and c_0 passes torch.nn's own checks (and would unpack here as two states)
    and its packed path checks nothing before its op."""
    if not isinstance(hx, (tuple, list)):
        raise TypeError(f"LSTM: hx must be a tuple (h_0, c_0) of tensors, got {type(hx).__name__}")
    if len(hx) != 2:
        raise RuntimeError("lstm expects two hidden states")
    for i, h in enumerate(hx):
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"LSTM: expected Tensor as element {i} of hx, but got {type(h).__name__}")


def _check_packed_lstm_state_dims(hx):
    """torch's packed LSTM hands its states to its op without torch.nn's shape checks: a state of fewer than 3
    dimensions raises the op's IndexError (it reads dim 2 first); one of more crashes torch's op, here a clear error."""
    for state in hx:
        d = state.dim()
        if d < 3:
            raise IndexError(f"Dimension out of range (expected to be in range of [{-max(d, 1)}, {max(d, 1) - 1}], "
                             f"but got 2)")
        if d > 3:
            raise RuntimeError(f"LSTM: with a PackedSequence input, h_0 and c_0 must be 3-D (num_layers * "
                               f"num_directions, batch, hidden), got {d}-D")


class _SeqfastRNNMixin:
    """The input handling of torch.nn.RNNBase.forward (packed / batched / unbatched / batch_first, default and permuted
    states, torch's own checks), around seqfast.functional.recurrent."""

    _kind = None  # "lstm" | "gru" | "rnn"
    _LAYER_OP = None  # its seqfast.ops layer op

    def __getstate__(self):
        # the no-grad plans name this module's parameters (and the C++ call cannot be copied): a copy or a pickle
        # builds its own
        state = super().__getstate__()
        state.pop("_seqfast_plan", None)
        state.pop("_seqfast_call", None)
        return state

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

    def _inference_call(self, input):
        """The whole forward in one C++ call (seqfast._C.rnn_module_inference) where that is all it takes: nothing for
        autograd to record (the caller checks: seqfast.nn._recording), no state given, a padded CPU tensor of the
        weights' dtype and size, no dropout to draw, the C++ kernels chosen and no rule preferring torch's op. None
        otherwise: the regular path then runs (and raises torch's errors). For a short sequence this Python is a good
        part of the call (it runs on caches the kernel just flushed), so what depends only on the module's parameters
        and the input's dtype is worked out once per parameter set and kept (_inference_plan); the C++ entries check the
        weights' shapes again on every call."""
        if (not isinstance(input, torch.Tensor) or input.dim() not in (2, 3) or input.shape[-1] != self.input_size
                or (self.training and self.dropout) or torch.compiler.is_compiling()
                or torch._C._is_any_autocast_enabled()):
            return None
        weights = self._plan(input)
        if weights is None or weights[0].dtype != input.dtype:  # .to(dtype) can change a parameter in place
            return None
        batched = input.dim() == 3
        steps = input.shape[1 if batched and self.batch_first else 0]
        batch = input.shape[0 if self.batch_first else 1] if batched else 1
        if steps == 0 or batch == 0:
            return None
        cell_steps = False
        if input.dtype is torch.bfloat16:  # before the rule table, as seqfast.functional.recurrent decides
            if _rules.upcast_bfloat16((input,), steps * batch, self._kind, batch, self.hidden_size, steps):
                return None  # computed in float32 by the regular path (seqfast._rules.upcast_bfloat16)
            # fewer rows: float32 cell steps, the weights read in place (seqfast.functional._cell_steps' twin)
            cell_steps = _rnn_sequence.bf16_in_steps((input,), steps * batch, self._kind, steps, batch,
                                                      self.hidden_size, grad=False)
        if not cell_steps and _rules.prefer_torch_when(self._kind, input, batch, self.hidden_size, False,
                                                       steps=steps):
            return None
        if _autotune._enabled:  # the measured choice (seqfast.autotune) between this call and torch's forward
            key = ("rnn_module", self.mode, input.dtype, self.num_layers, self.bidirectional, batched,
                   _autotune.size_class(steps), _autotune.size_class(batch), _autotune.size_class(self.hidden_size),
                   _autotune.size_class(self.input_size), torch.get_num_threads())
            return _autotune.run(key, lambda: super(_SeqfastRNNMixin, self).forward(input),
                                 lambda: self._one_call(input, weights, cell_steps))
        return self._one_call(input, weights, cell_steps)

    def _plan(self, input):
        """The flat weights of the no-grad paths for ``input``'s kind of tensor (None: the regular path), worked out
        again, with the C++ call (_module_call), when the parameters, the input's dtype or device, a forced backend or
        the rule table changed."""
        key = (tuple(map(id, self._parameters.values())), input.dtype, input.device, _backend.forced_backend(),
               _rules.epoch)
        plan = self.__dict__.get("_seqfast_plan")
        if plan is None or plan[0] != key:
            plan = self.__dict__["_seqfast_plan"] = (key, self._inference_plan(input))
            self.__dict__["_seqfast_call"] = self._module_call(input, plan[1])
        return plan[1]

    def _module_call(self, input, weights):
        """The C++ twin of this fast path (seqfast._C.ModuleCall) for inputs of ``input``'s dtype and device, or None
        where only the Python path serves (no plan, a forced backend). It holds what the checks above derive from the
        parameters and the rule table, and re-checks the rest on every call."""
        if weights is None or _backend.forced_backend() is not None:
            return None
        dtype = input.dtype
        float32 = (_rules.float32_bfloat16_regions(self._kind, self.hidden_size)
                   if dtype is torch.bfloat16 and not torch.compiler.is_compiling() else [])
        # bfloat16 calls inside the float32 regions: those the upcast path takes go to the regular path; fewer rows
        # run here as cell steps, where the cell kernels take bfloat16 weights (_rnn_sequence.bf16_in_steps)
        return _ext.module().ModuleCall(
            self.mode, self._parameters, list(self._parameters.values()), weights, self.bias, self.num_layers,
            self.bidirectional, self.batch_first, self.input_size,
            _rules.torch_regions(self._kind, dtype, False, self.hidden_size),
            _rnn_cell.bf16_upcast_min_rows() if float32 else 0, bool(float32) and _rnn_cell.bf16_weight_kernels(),
            _rules.torch_regions(self._kind, dtype, True, self.hidden_size), float32, _rules.float32_sequences())

    def _one_call(self, input, weights, cell_steps=False):
        out, h, c = _ext.module().rnn_module_inference(self.mode, input, weights, self.bias, self.num_layers,
                                                       self.bidirectional, self.batch_first, cell_steps=cell_steps)
        return out, ((h, c) if self._kind == "lstm" else h)

    def _inference_plan(self, input):
        """The flat weight list for rnn_module_inference, or None where this module's calls on ``input``'s kind of
        tensor must take the regular path."""
        if getattr(self, "proj_size", 0) or not self._LAYER_OP.runs_cpp(input):
            return None
        if self._kind == "rnn" and self.mode != ("RNN_RELU" if self.nonlinearity == "relu" else "RNN_TANH"):
            return None
        params = self._parameters
        if any(name not in params for names in self._all_weights for name in names):
            # a parametrization or an old-style weight_norm computes this weight on every call: nothing to keep
            return None
        layers = self._layer_weights()
        w0 = layers[0][0]
        if w0.dtype != input.dtype or w0.device != input.device or not _kernel_layout(
                self._kind, layers, self.input_size, self.num_layers, 2 if self.bidirectional else 1, 0):
            return None
        return [w for ws in layers for w in ws]

    def forward(self, input, hx=None):
        # The C++ no-grad call (seqfast._C.ModuleCall, built with the plan) checks grad mode and requires_grad,
        # autocast, the input, the given states, the parameters and the rule table itself, and declines (None)
        # wherever the paths below decide. Here: what it cannot see, in the order of cost.
        if (_backend.forced_backend() is None and not _autotune._enabled and not (self.training and self.dropout)
                and not torch.compiler.is_compiling()):
            call = self.__dict__.get("_seqfast_call")
            if call is not None:
                result = call(input, hx, self.training)
                if result is not None:
                    return result
            if isinstance(input, torch.Tensor) and (call is None or call.stale()):
                # a decoder that passes its state on every step builds the call here (without a state,
                # _inference_call below does), and so does a training call where the rule table may prefer torch's
                # op (the call then runs it, without this module's Python or torch.nn's) or of one step
                rec = recorded(self, input, hx)
                # (a recorded call of one step: the call runs it as cell steps recorded from C++)
                one_step = input.dim() in (2, 3) and input.shape[1 if self.batch_first and input.dim() == 3 else 0] == 1
                if (hx is not None and not rec) or (rec and (one_step or _rules.covers(self._kind, input.dtype, True))):
                    self._plan(input)
                    call = self.__dict__.get("_seqfast_call")
                    result = None if call is None else call(input, hx, self.training)
                    if result is not None:
                        return result
        if hx is None and not recorded(self, input):
            result = self._inference_call(input)
            if result is not None:
                return result
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
                if self._kind == "lstm":  # (torch's GRU / RNN check their state's shape here, as below)
                    _check_lstm_states(hx)
                    _check_packed_lstm_state_dims(hx)
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
            if self._kind == "lstm":
                _check_lstm_states(hx)
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
    _LAYER_OP = _ops.lstm_layer


class GRU(_SeqfastRNNMixin, torch.nn.GRU):
    __doc__ = torch.nn.GRU.__doc__
    _kind = "gru"
    _LAYER_OP = _ops.gru_layer


class RNN(_SeqfastRNNMixin, torch.nn.RNN):
    __doc__ = torch.nn.RNN.__doc__
    _kind = "rnn"
    _LAYER_OP = _ops.rnn_layer
