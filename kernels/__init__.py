"""seqfast.kernels: Triton kernels, one file per family (a file holds its @triton.jit kernels and their launchers).

Imported lazily by seqfast's dispatcher, so seqfast imports without triton (CPU-only installs).
"""
