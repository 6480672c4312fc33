"""The machinery every fused op shares: its kernel table per backend, the torch custom op, its autograd formula,
and the eager fast path.

A fused op ``name`` is a pair of kernels (forward, backward) with the same signature on every backend. Each op file
(seqfast/ops/<family>.py) names them in a :class:`Kernels` table per backend, by importable name: seqfast._C's
``<name>_forward`` (C++), ``seqfast.kernels.<family>.<name>_forward`` (Triton) and
``seqfast.reference.<family>.<name>_forward`` (plain PyTorch), so an editor follows a call from the op to every
backend. The op is exposed two ways:

* ``torch.ops.seqfast.<name>`` (+ ``<name>_backward``): registered custom ops with fake implementations and a
  registered autograd formula, so torch.compile(fullgraph=True) traces through them;
* an eager fast path: a torch.autograd.Function calling the kernels directly (or, with no grad needed, the kernel
  itself). A custom-op call costs a sizeable share of a batch-1 LSTMCell step (DESIGN.md measures it), so eager
  mode skips the dispatcher; both paths run the same kernels and the same backward formula.
"""
import functools
from typing import Callable, NamedTuple, Optional

import torch

from .. import _backend, _ext


class Kernels(NamedTuple):
    """One backend's kernels for an op. ``inference``: an optional no-grad forward (same outputs; the backward's
    workspaces may come back empty), used by the eager no-grad path; the forward serves where it is None.
    ``skips_grads``: the backward takes the trailing flags the op's ``grad`` passes as ``needs=`` (which input
    gradients to compute; for sdpa, whether k and v are one tensor) and returns None for a gradient it leaves out."""
    forward: Callable
    backward: Callable
    inference: Optional[Callable] = None
    skips_grads: bool = False


class FusedOp:
    """One fused operation (see module docstring).

    reference: the plain PyTorch :class:`Kernels` (the oracle; also what runs where no kernel covers a case).
    cpp(module) / triton(): build the C++ / Triton :class:`Kernels` table on first use (seqfast._C is passed in; the
        Triton module is imported there, so seqfast imports without triton); None where the backend has no kernel.
    cpp_check: name of a seqfast._C function saying whether this CPU can run the op's C++ kernels.
    schema / backward_schema: torch.library schemas of forward and backward (without the op name).
    fake / backward_fake: shape-only implementations for tracing.
    save(ctx, inputs, outputs): what the backward needs (ctx.save_for_backward, attributes).
    grad(ctx, grads, run_backward): turns output grads into the backward kernel's call and returns input grads;
        run_backward(*args, needs=flags) passes the flags on to a backward that skips gradients (Kernels.skips_grads)
        and drops them for the others, which compute every gradient.
    """

    def __init__(self, name, *, reference, cpp, triton, schema, backward_schema, fake, backward_fake, save, grad,
                 num_outputs_differentiable, dtypes=None, cpu_autocast=True, cpp_check=None):
        self.name = name
        self._builders = {"reference": lambda: reference, "cpp": cpp and self._cpp_builder(cpp, cpp_check),
                          "triton": triton}
        self._tables = {}  # backend -> Kernels, built on first use
        self._cpu_autocast = cpu_autocast
        self._dtypes = dtypes  # {backend: dtypes} where this op's kernels cover less than the backend's default
        self._save = save
        self._grad = grad
        self._n_diff = num_outputs_differentiable
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
        eager_backward = self._make_backward(None)

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
                # defined (as costly as a small kernel); forward takes *args, so there is nothing to bind.
                # Under functorch transforms torch's own apply runs.
                if torch._C._are_functorch_transforms_active():
                    return super().apply(*args)
                return super(torch.autograd.Function, cls).apply(*args)

        _Function.__name__ = f"{name}_function"
        self._function = _Function

    @staticmethod
    def _cpp_builder(cpp, cpp_check):
        def build():
            module = _ext.module()
            if cpp_check is not None and not getattr(module, cpp_check)():
                return None  # this CPU lacks the ISA the op's C++ kernels need
            return cpp(module)
        return build

    def kernels(self, backend):
        """The :class:`Kernels` that ``backend`` runs for this op: its own, or the reference's where it has none."""
        table = self._tables.get(backend)
        if table is None:
            build = self._builders.get(backend)
            table = self._tables[backend] = (build and build()) or self._builders["reference"]()
        return table

    def kernels_for(self, tensor):
        """The :class:`Kernels` that run for ``tensor`` (its device and dtype, and any forced backend)."""
        return self.kernels(_backend.select(tensor.device, tensor.dtype, self._dtypes))

    def runs_torch_op(self, tensor):
        """Whether torch's own op runs a call on ``tensor`` instead of a seqfast kernel (forced "torch", or no
        kernel for its device, dtype or CPU: see seqfast._backend.use_torch_op); memoised per call site key."""
        if torch.compiler.is_compiling():
            # no memo while tracing: Dynamo would guard on the memo's contents and recompile once it fills
            return _backend.use_torch_op(_backend.select(tensor.device, tensor.dtype, self._dtypes))
        key = (_backend.forced_backend(), tensor.dtype, tensor.device, "torch")
        hit = self._resolved.get(key)
        if hit is None:
            backend = _backend.select(tensor.device, tensor.dtype, self._dtypes)
            if self.kernels(backend) is self.kernels("reference"):
                backend = "reference"
            hit = self._resolved[key] = _backend.use_torch_op(backend)
        return hit

    def runs_cpp(self, tensor):
        """Whether a call on ``tensor`` runs this op's C++ kernels (the extension built, this CPU able to run them,
        the "cpp" backend chosen for the tensor's device and dtype, nothing forcing another); memoised."""
        key = (_backend.forced_backend(), tensor.dtype, tensor.device, "cpp")
        hit = self._resolved.get(key)
        if hit is None:
            hit = self._resolved[key] = (key[0] != "torch" and self._backend_for(tensor) == "cpp"
                                         and self.kernels("cpp") is not self.kernels("reference"))
        return hit

    def _resolve(self, tensor, which):
        """The forward (0), backward (1) or no-grad forward (2: the forward where a backend has none) for
        ``tensor``, memoised: this runs on every eager call."""
        key = (_backend.forced_backend(), tensor.dtype, tensor.device, which)
        fn = self._resolved.get(key)
        if fn is None:
            table = self.kernels_for(tensor)
            fn = (table.forward, table.backward, table.inference or table.forward)[which]
            self._resolved[key] = fn
        return fn

    def _backend_for(self, tensor):
        """The kernel family (seqfast._backend.select) that runs a call on ``tensor``, memoised."""
        key = (_backend.forced_backend(), tensor.dtype, tensor.device, "backend")
        backend = self._resolved.get(key)
        if backend is None:
            backend = self._resolved[key] = _backend.select(tensor.device, tensor.dtype, self._dtypes)
        return backend

    def _setup(self, ctx, inputs, output):
        # the backward runs on the backend the forward ran on, even if use_backend() has been left by then
        ctx.seqfast_backend = self._backend_for(inputs[0])
        if isinstance(output, tuple):  # workspace outputs carry no gradient
            ctx.mark_non_differentiable(*output[self._n_diff:])
        ctx.seqfast_inputs = inputs  # for a double backward (see _differentiable_backward); no copies
        ctx.seqfast_versions = tuple(_version(a) for a in inputs)
        self._save(ctx, inputs, output)

    def _make_backward(self, run_backward):
        """The autograd formula. ``run_backward`` None: the eager path, which calls the backward kernel of the
        forward's backend directly; else the registered op's (it resolves the backend itself, under use_backend)."""
        def backward(ctx, *grads):
            if torch.is_grad_enabled():  # backward(create_graph=True): the gradients must be differentiable again
                return self._differentiable_backward(ctx, grads)
            if run_backward is None:
                table = self.kernels(ctx.seqfast_backend)
                kernel = table.backward
                if table.skips_grads:
                    return self._grad(ctx, grads, lambda *args, needs=(): _without_autocast(kernel, args + needs))
                return self._grad(ctx, grads, lambda *args, needs=(): _without_autocast(kernel, args))
            with _backend.use_backend(ctx.seqfast_backend):
                return self._grad(ctx, grads, lambda *args, needs=(): run_backward(*args))
        return backward

    def _differentiable_backward(self, ctx, grads):
        """Gradients that autograd can differentiate again (a gradient penalty, a Hessian-vector product): the
        kernels' fused backward is not itself differentiable, so autograd differentiates the reference forward,
        recomputed from the saved inputs, with create_graph=True. The recompute reads each input through an alias of
        its own (a view, one per argument slot), and the gradients are taken with respect to those aliases: partial
        derivatives, as a backward must return. Taken with respect to the inputs themselves they would be total ones,
        wrong wherever one input depends on another (an unrolled cell's h_t on x, a key computed from the query):
        autograd.grad would also follow the paths between them."""
        inputs = ctx.seqfast_inputs
        # what the plain backward would read, through autograd's own version check (a saved output changed in place
        # raises here as in torch, though the recompute below does not read it)
        ctx.saved_tensors
        # the recompute reads every input's values: one changed in place since the forward would give wrong
        # gradients silently, where torch raises (the inputs are kept as they are, outside save_for_backward)
        for i, (a, version) in enumerate(zip(inputs, ctx.seqfast_versions)):
            if version is not None and a._version != version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: argument {i} of seqfast::{self.name}, {tuple(a.shape)}, is at version {a._version}; "
                    f"expected version {version} instead.")
        wanted = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor) and a.requires_grad]
        result = [None] * len(inputs)
        if not wanted:
            return tuple(result)
        with torch.enable_grad():
            aliased = list(inputs)
            for i in wanted:
                aliased[i] = inputs[i].view_as(inputs[i])
            outputs = _without_autocast(self.kernels("reference").forward, tuple(aliased))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs[:self._n_diff], grads) if g is not None and o.requires_grad]
        if pairs:
            got = torch.autograd.grad([o for o, _ in pairs], [aliased[i] for i in wanted], [g for _, g in pairs],
                                      create_graph=True, allow_unused=True)
            for i, g in zip(wanted, got):
                result[i] = g
        return tuple(result)

    def __call__(self, *args):
        autocast = torch._C._is_any_autocast_enabled()
        if autocast:
            args = _autocast(args, self._cpu_autocast)
        if torch.compiler.is_compiling():
            return self.op(*args)
        if torch._C._functorch.peek_interpreter_stack() is not None:
            # inside a torch.func transform (vmap, grad, jvp, ...): the reference's plain torch ops, which every
            # transform supports (the kernels and this op's autograd Function have no vmap rule)
            return _without_autocast(self.kernels("reference").forward, args)
        if torch.is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return self._function.apply(*args)
        kernel = self._resolve(args[0], 2)
        if autocast:
            with torch.autocast(args[0].device.type, enabled=False):
                return kernel(*args)
        return kernel(*args)


def _version(a):
    """A tensor argument's version counter (None for other arguments and for inference tensors, which have none)."""
    return a._version if isinstance(a, torch.Tensor) and not a.is_inference() else None


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


def keep_for_backward(ctx, tensors, values):
    """Saves for the backward what torch's own op saves: the tensors whose values the first-order backward reads
    (``values[i]``: x only where W_ih needs a gradient, W_ih only where x does, ...) go through save_for_backward and
    its version check; the others are kept aside (ctx.seqfast_aside) for the kernels' shapes and pointers only, so an
    in-place change of one of them, or an inference-mode one, raises nothing, as in torch. (A create_graph backward
    reads every input's values and checks their versions itself: FusedOp._differentiable_backward.)"""
    ctx.save_for_backward(*(t if keep else None for t, keep in zip(tensors, values)))
    ctx.seqfast_aside = {i: t for i, (t, keep) in enumerate(zip(tensors, values)) if not keep}


def any_requires_grad(*tensors):
    """Whether any of these (None allowed) requires grad."""
    return any(t is not None and t.requires_grad for t in tensors)


def kept_tensors(ctx):
    """keep_for_backward's tensors, in order."""
    saved = list(ctx.saved_tensors)
    for i, t in ctx.seqfast_aside.items():
        saved[i] = t
    return saved


def needed(ctx, *inputs):
    """Whether autograd needs the gradient of each of the op's ``inputs`` (positions in its forward's arguments), as
    the trailing flags of a backward that skips the others (Kernels.skips_grads); all True where ctx does not say."""
    flags = getattr(ctx, "needs_input_grad", None)
    return tuple(True for _ in inputs) if flags is None else tuple(bool(flags[i]) for i in inputs)


def defined_grad(grad, like):
    """Autograd passes None for an output nobody used; the backward kernels take dense contiguous gradients."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()
