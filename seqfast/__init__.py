"""seqfast: fused LSTM/GRU/RNN and attention kernels behind torch.nn's API.

CUDA tensors run Triton kernels (seqfast.kernels), CPU tensors the C++ extension (seqfast._C); anything no seqfast
kernel covers, or covers more slowly than torch on this CPU, runs torch's own op (see seqfast._backend).
"""
from . import functional, nn, ops  # noqa: F401
from ._backend import use_backend
from .patching import patch_torch, replace_modules
from .version import __version__

__all__ = ["functional", "nn", "use_backend", "replace_modules", "patch_torch", "__version__"]
