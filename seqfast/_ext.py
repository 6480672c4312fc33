"""Loads the compiled CPU extension seqfast._C.

The extension is compiled against one torch version (the one installed when seqfast was built). When it is missing
or was built for another torch (ImportError / undefined symbols), seqfast keeps working: CPU ops run torch's own ops
(same results, torch's speed) and a single warning names the fix.
"""
import warnings

_C = None
_error = None
_warned = False


def _load():
    global _C, _error
    if _C is not None or _error is not None:
        return
    try:
        from . import _C as module
        _C = module
    except (ImportError, OSError) as exc:  # not built, or built against a different torch (undefined symbol)
        _error = exc


def available():
    """True when seqfast._C loaded; otherwise warns once and returns False."""
    global _warned
    _load()
    if _C is None and not _warned:
        _warned = True
        import torch
        warnings.warn(
            f"seqfast: the C++ extension seqfast._C could not be loaded ({_error}); CPU ops fall back to torch's "
            f"own ops (same results, without seqfast's speed-up). It must be built against the installed torch "
            f"({torch.__version__}): reinstall seqfast with `pip install --no-build-isolation --force-reinstall "
            f"--no-deps <seqfast source or sdist>` (or `make build` in a checkout).",
            RuntimeWarning, stacklevel=3)
    return _C is not None


def module():
    _load()
    return _C
