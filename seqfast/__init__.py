"""seqfast: fused LSTM/GRU/RNN and attention kernels behind torch.nn's API.

CUDA tensors run Triton kernels (seqfast.kernels), CPU tensors the C++ extension (seqfast._C); anything a kernel does
not cover runs the plain PyTorch reference (seqfast.reference).
"""
from . import functional, nn, ops  # noqa: F401
from ._backend import use_backend
from .patching import patch_torch, replace_modules
from .version import __version__

__all__ = ["functional", "nn", "use_backend", "replace_modules", "patch_torch", "__version__"]
