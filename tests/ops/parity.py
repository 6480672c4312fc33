"""Op-level parity: one fused op's kernels on every backend, called directly on the same tensors (forward, then
backward with each backend's own workspace), compared with the plain PyTorch reference run in float64."""
import torch

from conftest import HAVE_TRITON, TOL

# (backend, dtype) each op is compared on; the reference runs in float64 on the same rounded values.
BACKENDS = [("cpp", torch.float64), ("cpp", torch.float32)] + ([("triton", torch.float32)] if HAVE_TRITON else [])


def _cast(args, dtype):
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _close(got, want, dtype, what, scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol * scale, atol=atol * scale, msg=what)


def check_op(op, backend, dtype, args, *, n_out, backward_args, n_grads, forward_kwargs=None, backward_kwargs=None,
             grad_scale=2.0):
    """Runs ``op``'s ``backend`` kernels (with launcher keyword arguments, e.g. a forced internal path) and its
    reference on ``args`` (floating tensors cast to ``dtype`` / float64) and compares the first ``n_out`` outputs and
    the ``n_grads`` input gradients. ``backward_args(args, outputs, grads)`` builds the backward call's arguments from
    the forward's inputs, its outputs (workspaces included) and the output gradients."""
    ours, ref = op.kernels(backend), op.kernels("reference")
    assert ours.forward is not ref.forward, f"{backend} has no kernel for {op.name}"
    args = _cast(args, dtype)
    ref_args = _cast(args, torch.float64)
    out = ours.forward(*args, **(forward_kwargs or {}))
    want = ref.forward(*ref_args)
    out, want = (out if isinstance(out, tuple) else (out,)), (want if isinstance(want, tuple) else (want,))
    for i in range(n_out):
        _close(out[i], want[i], dtype, f"{op.name} {backend} {dtype} output {i}")
    grads = tuple(torch.randn_like(o) for o in out[:n_out])
    got = ours.backward(*backward_args(args, out, _cast(grads, dtype)), **(backward_kwargs or {}))
    expect = ref.backward(*backward_args(ref_args, want, _cast(grads, torch.float64)))
    for i in range(n_grads):
        if expect[i] is None:
            continue
        _close(got[i], expect[i], dtype, f"{op.name} {backend} {dtype} gradient {i}", grad_scale)
    return out



# seqfast._C's internal paths, forced by an explicit set_config() call (csrc/cpu/config.h): the own AVX-512 GEMM vs
# BLAS, the fused time loops vs per-step ones, the AVX-512 attention blocks vs the portable ones, a parallel split at
# every size. Where this CPU lacks AVX-512, the AVX-512 settings fall back to the same portable path.
CPP_PATHS = {
    "default": {},
    "blas-unfused": {"own_gemm": False, "fused": False},
    "portable-attention": {"avx512_attention": False},
    "always-parallel": {"par_min_work": 1},
}


def forced_cpp_path(name):
    """Context manager: seqfast._C's configuration with CPP_PATHS[name] applied, restored after."""
    import contextlib

    from seqfast import _ext

    @contextlib.contextmanager
    def run():
        module = _ext.module()
        saved = module.get_config()
        module.set_config(**CPP_PATHS[name])
        try:
            yield
        finally:
            module.set_config(**saved)
    return run()
