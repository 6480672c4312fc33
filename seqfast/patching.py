"""Adopting seqfast in an existing code base: swap modules in a built model, or patch torch.nn while one is built.

* ``replace_modules(model)``: every exact torch ``LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell/MultiheadAttention`` inside
  ``model`` becomes its seqfast twin, in place. The seqfast classes subclass torch's and add no state, so the swap
  only changes the instance's ``__class__``: parameters (the very same tensors, so an optimizer built before keeps
  working), buffers, hooks, training mode and device all stay.
* ``patch_torch()``: while active, ``torch.nn.LSTM(...)`` etc. construct seqfast modules (for third-party code that
  builds its own), while ``isinstance(x, torch.nn.LSTM)`` keeps its meaning.

Importing this module also lets torch.compile trace seqfast's LSTM/GRU/RNN (see ``_enable_dynamo_tracing``).
"""
import collections
import importlib
import importlib.abc
import logging
import sys
import threading

import torch

from . import nn as _snn

__all__ = ["replace_modules", "patch_torch", "ReplaceReport", "Replaced", "Skipped", "twins"]

logger = logging.getLogger("seqfast")

_TWIN_NAMES = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "MultiheadAttention")


def _torch_base(cls):
    """The torch.nn class a seqfast class stands in for (its first base from torch.nn.modules)."""
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("torch.nn.modules"):
            return base
    raise TypeError(f"{cls} does not subclass a torch.nn module")


def twins():
    """{original torch.nn class: seqfast class} for every seqfast module available (MultiheadAttention once
    seqfast.nn provides it). The keys are torch's own classes even while patch_torch() is active."""
    out = {}
    for name in _TWIN_NAMES:
        cls = getattr(_snn, name, None)
        if cls is None and name == "MultiheadAttention":
            try:
                from .nn import attention
                cls = getattr(attention, name, None)
            except ImportError:
                cls = None
        if cls is not None:
            out[_torch_base(cls)] = cls
    return out


# ----------------------------------------------------------------------------------------------------------------
# replace_modules

Replaced = collections.namedtuple("Replaced", "name torch_class seqfast_class")
Skipped = collections.namedtuple("Skipped", "name cls reason")


class ReplaceReport(collections.namedtuple("ReplaceReport", "replaced skipped")):
    """What replace_modules did. ``replaced``: [Replaced(name, torch_class, seqfast_class)] (qualified module names,
    "" for the model itself; a shared module appears once, under its first name). ``skipped``: [Skipped(name, cls,
    reason)] for modules that are torch RNN/attention modules but were left alone (subclasses)."""

    def __str__(self):
        parts = [f"seqfast.replace_modules: swapped {len(self.replaced)} module(s)"]
        if self.replaced:
            parts.append(": " + ", ".join(f"{r.name or '<model>'} ({r.torch_class})" for r in self.replaced))
        if self.skipped:
            parts.append(f"; left {len(self.skipped)} alone: " + ", ".join(
                f"{s.name or '<model>'} ({s.cls}: {s.reason})" for s in self.skipped))
        return "".join(parts)


def _resolve_include(include, table):
    """include -> (set of torch classes, tuple of module-name prefixes)."""
    if include is None:
        return set(table), ()
    if isinstance(include, (str, type)):
        include = [include]
    by_name = {cls.__name__: cls for cls in table}
    by_seqfast = {seq: cls for cls, seq in table.items()}
    classes, names = set(), []
    for item in include:
        if isinstance(item, type):
            if item in table:
                classes.add(item)
            elif item in by_seqfast:
                classes.add(by_seqfast[item])
            else:
                raise ValueError(f"replace_modules: include= names {item}, which seqfast has no twin for (it has: "
                                 f"{', '.join(sorted(by_name))})")
        elif isinstance(item, str):
            short = item.rsplit(".", 1)[-1] if item.startswith(("torch.nn.", "nn.")) else item
            if short in by_name:
                classes.add(by_name[short])
            else:
                names.append(item)  # a submodule's qualified name: it and everything under it
        else:
            raise TypeError(f"replace_modules: include= takes torch classes or names, got {item!r}")
    if not classes:
        classes = set(table)
    return classes, tuple(names)


def _under(name, prefixes):
    return not prefixes or any(name == p or name.startswith(p + ".") for p in prefixes)


def replace_modules(model, *, include=None):
    """Swap, in place, every torch LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell/MultiheadAttention in ``model`` (the model
    itself included, at any depth: Sequential, ModuleList, ModuleDict, attributes) for its seqfast twin; returns
    ``model``.

    The swap changes each instance's class only: the same parameter tensors (an optimizer built before the swap
    keeps working), buffers, forward/backward hooks, train/eval mode and device. A module reached through several
    paths (shared) is swapped once. Only the exact torch classes are swapped: subclasses (which may override
    ``forward`` or other methods) are left alone and listed in the report. Modules that already are seqfast's are
    left as they are.

    include: optional filter, one or a list of: a torch (or seqfast) class such as ``torch.nn.LSTM``, a class name
    such as ``"LSTM"`` / ``"torch.nn.GRUCell"``, or a submodule's qualified name such as ``"encoder"`` (that module
    and everything under it). Classes and names combine: only modules of the given classes under the given names.

    What was done is logged (logger "seqfast", INFO) and stored as ``model.seqfast_report``, a ReplaceReport with
    ``.replaced`` and ``.skipped`` lists (overwritten by a later call).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"replace_modules expects a torch.nn.Module, got {type(model).__name__}")
    table = twins()
    classes, prefixes = _resolve_include(include, table)
    seqfast_classes = tuple(table.values())
    replaced, skipped = [], []
    for name, module in model.named_modules():  # named_modules visits a shared module once
        cls = type(module)
        if issubclass(cls, seqfast_classes) or not _under(name, prefixes):
            continue
        if cls in classes:
            twin = table[cls]
            module.__class__ = twin
            after = getattr(module, "_seqfast_after_swap", None)  # a twin that must derive state from torch's
            if after is not None:
                after()
            replaced.append(Replaced(name, f"torch.nn.{cls.__name__}", f"{twin.__module__}.{twin.__qualname__}"))
            continue
        for base in classes:
            if issubclass(cls, base):
                overrides = cls.forward is not base.forward
                reason = (f"subclass of torch.nn.{base.__name__} that overrides forward" if overrides else
                          f"subclass of torch.nn.{base.__name__}: only the exact torch classes are swapped")
                skipped.append(Skipped(name, f"{cls.__module__}.{cls.__qualname__}", reason))
                break
    report = ReplaceReport(replaced, skipped)
    # object.__setattr__: a plain attribute, not a submodule/parameter (never in state_dict)
    object.__setattr__(model, "seqfast_report", report)
    logger.info("%s", report)
    return model


# ----------------------------------------------------------------------------------------------------------------
# patch_torch

def _bindings(original):
    """Every module attribute that names ``original``: torch.nn, torch.nn.modules, the defining module, and the
    modules that bound it by name at import (torch.nn.modules.transformer's MultiheadAttention, which
    nn.TransformerEncoderLayer / DecoderLayer / Transformer build; a third-party ``from torch.nn import LSTM``).
    seqfast's own modules are left alone."""
    found = []
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name == "seqfast" or module_name.startswith("seqfast."):
            continue
        try:
            names = [name for name, value in list(vars(module).items()) if value is original]
        except TypeError:  # a module-like object without a __dict__
            continue
        found += [(module, name) for name in names]
    return found


class _PatchMeta(type):
    """Metaclass of the stand-ins patch_torch() puts at torch.nn.<Name>.

    Calling the stand-in itself builds the seqfast class (so pickles name seqfast.nn.<Name>, not the stand-in);
    classes derived from it while the patch is active (``class Mine(torch.nn.LSTM)``) are ordinary seqfast
    subclasses. isinstance / issubclass against the stand-in answer as for torch's original class, so modules built
    before the patch still pass ``isinstance(m, torch.nn.LSTM)``."""

    def __call__(cls, *args, **kwargs):
        if cls.__dict__.get("_seqfast_standin", False):
            return cls._seqfast_class(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def __instancecheck__(cls, obj):
        if cls.__dict__.get("_seqfast_standin", False):
            return isinstance(obj, cls._seqfast_original)
        return super().__instancecheck__(obj)

    def __subclasscheck__(cls, sub):
        if cls.__dict__.get("_seqfast_standin", False):
            return issubclass(sub, cls._seqfast_original)
        return super().__subclasscheck__(sub)


_standins = {}


def _standin(original, seqfast_cls):
    if original not in _standins:
        qualname = f"_Standin{original.__name__}"  # a module global here, so the class pickles by reference
        standin = _PatchMeta(original.__name__, (seqfast_cls,), {
            "__module__": __name__, "__qualname__": qualname, "__doc__": original.__doc__,
            "_seqfast_standin": True, "_seqfast_class": seqfast_cls, "_seqfast_original": original})
        globals()[qualname] = _standins[original] = standin
    return _standins[original]


_patch_lock = threading.Lock()
# original class -> [number of active patches holding it, [(module, name) rebound to its stand-in]]. Patches count:
# the first one rebinds, the last one to end restores, whichever thread or nesting order they end in.
_active = {}


class _TorchPatch:
    """Handle returned by patch_torch(): a context manager, or call ``.undo()``."""

    def __init__(self, include):
        table = twins()
        classes, prefixes = _resolve_include(include, table)
        if prefixes:
            raise ValueError(f"patch_torch: include= takes classes or class names, got {list(prefixes)}")
        self._held = []  # originals this handle holds a count on
        with _patch_lock:
            for original in classes:
                entry = _active.get(original)
                if entry is None:
                    standin = _standin(original, table[original])
                    places = _bindings(original)
                    for module, name in places:
                        setattr(module, name, standin)
                    entry = _active[original] = [0, places]
                entry[0] += 1
                self._held.append(original)
        self.patched = sorted(f"torch.nn.{cls.__name__}" for cls in self._held)
        if self.patched:
            logger.info("seqfast.patch_torch: %s now build seqfast modules", ", ".join(self.patched))

    @property
    def active(self):
        return bool(self._held)

    def undo(self):
        """Release this patch; torch's classes come back when no other patch (any thread) still holds them.
        Idempotent."""
        with _patch_lock:
            for original in self._held:
                entry = _active[original]
                entry[0] -= 1
                if entry[0] == 0:
                    standin = _standins[original]
                    for module, name in reversed(entry[1]):
                        if getattr(module, name, None) is standin:
                            setattr(module, name, original)
                    del _active[original]
            self._held = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    def __repr__(self):
        return f"<seqfast.patch_torch {'active: ' + ', '.join(self.patched) if self.active else 'undone'}>"


def patch_torch(*, include=None):
    """Make ``torch.nn.LSTM/GRU/RNN/LSTMCell/GRUCell/RNNCell/MultiheadAttention`` (also under ``torch.nn.modules``
    and ``torch.nn.modules.rnn`` / ``.activation``) construct seqfast modules, for code that builds its own.

    Takes effect at once and returns a handle: use it as a context manager (``with seqfast.patch_torch(): ...``
    restores torch on exit) or call ``handle.undo()``. ``include``: classes or class names to patch (default all).
    Patches are counted: nested or overlapping ones (in one thread or several) keep torch.nn patched until the last
    one ends. The patch is process-wide: while any is active, every thread's torch.nn.LSTM builds seqfast's.

    While active, ``isinstance(m, torch.nn.LSTM)`` and ``issubclass(C, torch.nn.LSTM)`` answer as for torch's
    class (true for torch's and seqfast's modules alike); ``type(m) is torch.nn.LSTM`` does not hold for anything.
    Every module-level name bound to a patched class is rebound while the patch is active, including names bound
    before it by ``from torch.nn import LSTM`` and torch's own (nn.TransformerEncoderLayer, TransformerDecoderLayer
    and Transformer then build seqfast's MultiheadAttention); names held elsewhere (a local variable, a dict) are not.
    """
    return _TorchPatch(include)


# ----------------------------------------------------------------------------------------------------------------
# torch.compile: Dynamo refuses every isinstance(torch.nn.RNN/GRU/LSTM) module (torch's own call _VF kernels it
# cannot trace) unless torch._dynamo.config.allow_rnn is set. seqfast's subclasses run traceable custom ops, so the
# check is lifted for them alone: VariableBuilder.wrap_module is wrapped to set allow_rnn while it wraps a seqfast
# module. Importing Dynamo costs seconds, so the wrap happens when something else imports it (an import hook).

_DYNAMO_BUILDER = "torch._dynamo.variables.builder"


def _patch_builder(builder):
    vb = builder.VariableBuilder
    if getattr(vb.wrap_module, "_seqfast", False):
        return
    original = vb.wrap_module
    rnn_twins = tuple(getattr(_snn, n) for n in ("LSTM", "GRU", "RNN"))

    def wrap_module(self, value):
        from torch._dynamo import config
        if isinstance(value, rnn_twins) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return original(self, value)
        return original(self, value)

    wrap_module._seqfast = True
    wrap_module.__wrapped__ = original
    vb.wrap_module = wrap_module


class _LoaderWrapper(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            _patch_builder(module)
        except Exception as exc:  # a torch whose Dynamo changed shape: compile then graph-breaks on seqfast RNNs
            logger.warning("seqfast: could not let torch.compile trace seqfast RNN modules (%s)", exc)

    def __getattr__(self, name):  # get_source, get_filename, ... (inspect, linecache)
        return getattr(self._loader, name)


class _DynamoFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _DYNAMO_BUILDER:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _LoaderWrapper(spec.loader)
                return spec
        return None


def _enable_dynamo_tracing():
    builder = sys.modules.get(_DYNAMO_BUILDER)
    if builder is not None:
        try:
            _patch_builder(builder)
        except Exception as exc:  # a torch whose Dynamo changed shape: compile then graph-breaks on seqfast RNNs
            logger.warning("seqfast: could not let torch.compile trace seqfast RNN modules (%s)", exc)
    elif not any(isinstance(f, _DynamoFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DynamoFinder())


_enable_dynamo_tracing()
