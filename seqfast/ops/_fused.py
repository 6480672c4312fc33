"""The machinery every fused op shares: backend kernels, the torch custom op, its autograd formula, and the eager
fast path.

A fused op ``name`` is a pair of kernels ``<name>_forward`` / ``<name>_backward`` with the same signature in
seqfast._C (C++), seqfast.kernels.<module> (Triton) and seqfast.reference (plain PyTorch). It is exposed two ways:

* ``torch.ops.seqfast.<name>`` (+ ``<name>_backward``): registered custom ops with fake implementations and a
  registered autograd formula, so torch.compile(fullgraph=True) traces through them;
* an eager fast path: a torch.autograd.Function calling the kernels directly (or, with no grad needed, the kernel
  itself). A custom-op call costs ~16 us more than a Python call on this CPU, a third of a batch-1 LSTMCell step,
  so eager mode skips the dispatcher; both paths run the same kernels and the same backward formula.
"""
import functools
import importlib

import torch

from .. import _backend, _ext, reference


def _kernel(backend, triton_module, fn_name, cpp_check=None, fallback=None):
    """The kernel ``fn_name`` of ``backend``; the reference when that backend lacks it (or, for C++ kernels with a
    ``cpp_check``, when seqfast._C.<cpp_check>() says this CPU cannot run them). With ``fallback`` (an optional
    kernel such as ``<name>_inference``), a backend without ``fn_name`` gives its ``fallback`` kernel instead."""
    if backend == "cpp":
        module = _ext.module()
        usable = cpp_check is None or getattr(module, cpp_check)()
        fn = getattr(module, fn_name, None) if usable else None
    elif backend == "triton":
        fn = getattr(importlib.import_module(f"seqfast.kernels.{triton_module}"), fn_name, None)
    else:
        fn = None
    if fn is None and fallback is not None:
        return _kernel(backend, triton_module, fallback, cpp_check)
    return fn if fn is not None else getattr(reference, fn_name)


class FusedOp:
    """One fused operation (see module docstring).

    schema / backward_schema: torch.library schemas of forward and backward (without the op name).
    fake / backward_fake: shape-only implementations for tracing.
    save(ctx, inputs, outputs): what the backward needs (ctx.save_for_backward, attributes).
    grad(ctx, grads, run_backward): turns output grads into the backward kernel's call and returns input grads.
    """

    def __init__(self, name, *, triton_module, schema, backward_schema, fake, backward_fake, save, grad,
                 num_outputs_differentiable, dtypes=None, cpu_autocast=True, cpp_check=None):
        self.name = name
        self._cpp_check = cpp_check
        self._cpu_autocast = cpu_autocast
        self._dtypes = dtypes  # {backend: dtypes} where this op's kernels cover less than the backend's default
        self._triton_module = triton_module
        self._save = save
        self._grad = grad
        self._n_diff = num_outputs_differentiable
        # forward, backward, and the optional no-grad forward (same outputs, workspaces may come back empty)
        self._names = (f"{name}_forward", f"{name}_backward", f"{name}_inference")
        self._resolved = {}  # (forced backend, dtype, device, forward/backward/inference) -> kernel

        def run_forward(*args):
            return _without_autocast(self._resolve(args[0], 0), args)

        def run_backward(*args):
            return _without_autocast(self._resolve(args[0], 1), args)

        self.run_forward, self.run_backward = run_forward, run_backward

        # --- registered custom ops (the torch.compile path) ---
        self.op = torch.library.custom_op(f"seqfast::{name}", run_forward, mutates_args=(), schema=schema)
        self.op.register_fake(fake)
        self.backward_op = torch.library.custom_op(f"seqfast::{name}_backward", run_backward, mutates_args=(),
                                                   schema=backward_schema)
        self.backward_op.register_fake(backward_fake)
        self.op.register_autograd(self._make_backward(self.backward_op), setup_context=self._setup)

        # --- eager fast path: same kernels and formula, no dispatcher ---
        op = self
        eager_backward = self._make_backward(run_backward)

        class _Function(torch.autograd.Function):
            @staticmethod
            def forward(*args):
                return run_forward(*args)

            @staticmethod
            def setup_context(ctx, inputs, output):
                op._setup(ctx, inputs, output)

            @staticmethod
            def backward(ctx, *grads):
                return eager_backward(ctx, *grads)

            @classmethod
            def apply(cls, *args):
                # torch's apply binds default arguments with inspect.signature on every call when setup_context is
                # defined (~25 us, as much as a small kernel); forward takes *args, so there is nothing to bind.
                # Under functorch transforms torch's own apply runs.
                if torch._C._are_functorch_transforms_active():
                    return super().apply(*args)
                return super(torch.autograd.Function, cls).apply(*args)

        _Function.__name__ = f"{name}_function"
        self._function = _Function

    def kernel(self, tensor, fn_name, fallback=None):
        backend = _backend.select(tensor.device, tensor.dtype, self._dtypes)
        return _kernel(backend, self._triton_module, fn_name, self._cpp_check, fallback)

    def _resolve(self, tensor, which):
        """kernel() for the forward (0), backward (1) or no-grad forward (2, falling back to the forward where a
        backend has none), memoised: this runs on every eager call."""
        key = (_backend.forced_backend(), tensor.dtype, tensor.device, which)
        fn = self._resolved.get(key)
        if fn is None:
            fallback = self._names[0] if which == 2 else None
            fn = self._resolved[key] = self.kernel(tensor, self._names[which], fallback)
        return fn

    def _setup(self, ctx, inputs, output):
        first = inputs[0]
        # the backward runs on the backend the forward ran on, even if use_backend() has been left by then
        ctx.seqfast_backend = _backend.select(first.device, first.dtype, self._dtypes)
        if isinstance(output, tuple):  # workspace outputs carry no gradient
            ctx.mark_non_differentiable(*output[self._n_diff:])
        self._save(ctx, inputs, output)

    def _make_backward(self, run_backward):
        def backward(ctx, *grads):
            with _backend.use_backend(ctx.seqfast_backend):
                return self._grad(ctx, grads, run_backward)
        return backward

    def __call__(self, *args):
        if torch._C._is_any_autocast_enabled():
            args = _autocast(args, self._cpu_autocast)
        if torch.compiler.is_compiling():
            return self.op(*args)
        if torch.is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return self._function.apply(*args)
        return _without_autocast(self._resolve(args[0], 2), args)


def _without_autocast(kernel, args):
    """Kernels run in the dtypes they are given (``_autocast`` already chose them): ATen calls inside a kernel must not
    be re-cast by an enclosing torch.autocast region."""
    if torch._C._is_any_autocast_enabled():
        with torch.autocast(args[0].device.type, enabled=False):
            return kernel(*args)
    return kernel(*args)


def _autocast(args, cpu_autocast):
    """Under torch.autocast, run in the dtype torch's own op produces there: the autocast dtype where torch's RNN,
    cell and SDPA ops run their GEMMs in it (all of them on CUDA; on CPU, per op, as measured on torch 2.13:
    LSTM, RNN, RNNCell and SDPA yes; GRU, LSTMCell and GRUCell give float32), else the widest floating dtype among
    the arguments (autocast's "promote" rule). Non-floating arguments pass through."""
    device_type = args[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return args
    floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if device_type != "cpu" or cpu_autocast:
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = functools.reduce(torch.promote_types, (a.dtype for a in floats))
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
