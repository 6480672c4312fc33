"""Offline sm_90a compile of every launch configuration seqfast's Triton launchers choose, without a GPU.

Run as a script (`python tests/kernels/sm90_compile.py`), in a process where TRITON_INTERPRET is unset: the
launchers are called on meta tensors (shapes only, no memory), Triton's driver is replaced by one that names an
sm_90a target, and every launch is turned into a compile (JITFunction.run with warmup=True). Each distinct
(kernel, compile-time constants, pointer dtypes) is compiled once: further integer specialisations of the same
configuration (sizes that are or are not multiples of 16) are sampled by the first shape that reaches it. Prints one
JSON object (the --full grid or the core sample, see CELL_SHAPES): {"skip": reason} when Triton's NVIDIA backend or its ptxas is missing, else {"configs": [...],
"errors": [...]} where each config carries its grids, registers, spilled stack bytes and shared memory.

Why meta tensors and the real launchers rather than a table of configurations: the test then checks exactly what
the launchers pick for a shape, including the grid they compute from it.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tools():
    """(ptxas, cuobjdump) paths, or a reason they cannot be used."""
    try:
        from triton import knobs
        from triton.backends.nvidia import compiler  # noqa: F401
        ptxas, cuobjdump = knobs.nvidia.ptxas.path, knobs.nvidia.cuobjdump.path
    except Exception as e:  # noqa: BLE001  (any import/config failure means: no NVIDIA backend here)
        return None, f"triton's NVIDIA backend is unavailable: {e!r}"
    for tool in (ptxas, cuobjdump):
        if not tool or not os.access(tool, os.X_OK):
            return None, f"{tool} is not an executable"
    return (ptxas, cuobjdump), None


class _Sm90Driver:
    """Just enough of Triton's driver for JITFunction.run(warmup=True): an sm_90a target, device 0, stream 0."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


class Recorder:
    def __init__(self, ptxas, cuobjdump):
        self.ptxas, self.cuobjdump = ptxas, cuobjdump
        self.configs = {}  # key -> record
        self.current = ""

    def install(self):
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
        driver.set_active(_Sm90Driver())
        orig = JITFunction.run
        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
            consts = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k not in opts))
            # a tuple argument (the sequence kernel's pointer tuple) contributes each of its tensors
            flat = [t for a in args for t in (a if isinstance(a, tuple) else (a,))]
            ptrs = tuple(str(t.dtype) for t in flat if isinstance(t, torch.Tensor))
            key = (fn.fn.__name__, consts, tuple(sorted(opts.items())), ptrs)
            entry = rec.configs.get(key)
            if entry is None:
                kernel = orig(fn, *args, grid=grid, warmup=True, **kwargs)
                entry = rec.configs[key] = dict(kernel=key[0], constexprs=dict(consts), options=opts,
                                                pointers=list(ptrs), **rec._resources(kernel), grids=[], shapes=[])
            g = tuple(grid)
            if g not in entry["grids"] and len(entry["grids"]) < 8:
                entry["grids"].append(g)
                entry["shapes"].append(rec.current)
            entry["max_grid"] = [max(a, b) for a, b in zip(entry.get("max_grid", [0, 0, 0]), g + (1,) * (3 - len(g)))]

        JITFunction.run = run

    def _resources(self, kernel):
        with tempfile.TemporaryDirectory() as d:
            cubin = os.path.join(d, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([self.cuobjdump, "-res-usage", cubin], capture_output=True, text=True).stdout
            stack = int(re.search(r"STACK:(\d+)", usage).group(1))
            spills = 0
            if stack:
                # a stack frame may hold spilled registers or other locals: ask ptxas how much it spilled
                ptx = os.path.join(d, "k.ptx")
                with open(ptx, "w") as f:
                    f.write(kernel.asm["ptx"])
                log = subprocess.run([self.ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", cubin],
                                     capture_output=True, text=True).stderr
                spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
        regs = int(re.search(r"REG:(\d+)", usage).group(1))
        static_smem = int(re.search(r"SHARED:(\d+)", usage).group(1))
        return dict(registers=regs, stack_bytes=stack, spill_bytes=spills,
                    shared_bytes=int(kernel.metadata.shared) + static_smem)


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


# ----------------------------------------------------------------------------------------------------------------
# the shape grid: batch 1-4096, hidden 16-2048 (multiples of 16 and not), head dims 16-256, every dtype
# ----------------------------------------------------------------------------------------------------------------

# The full grid (argument --full; a cold compile of it takes a quarter of an hour on 2 cores) and the core sample
# `make test` compiles: every kernel, every dtype and precision, the tile buckets and head dims where registers are
# tightest (the other shapes reuse the same compile-time constants and differ only in integer specialisation).
CELL_SHAPES = {"full": [(1, 2048), (16, 100), (33, 650), (4096, 1024)], "core": [(1, 2048), (33, 650)]}
SEQ_SHAPES = {"full": [(1, 200), (16, 256), (33, 100), (4096, 2048)], "core": [(33, 100)]}
HEAD_DIMS = {"full": [16, 72, 128, 256], "core": [72, 128, 256]}
ADDITIVE = {"full": [(1, 50, 16, 40), (64, 300, 256, 8192), (4096, 7, 1000, 72)], "core": [(64, 300, 256, 8192)]}
SCOPE = "core"


def _narrow(shapes, dtype, allow_tf32):
    """Core sample: the widest set for exact fp32 and bf16 (most registers), the last entry for TF32 and fp16."""
    if SCOPE == "full" or (dtype in (torch.float32, torch.bfloat16) and not allow_tf32):
        return shapes[SCOPE]
    return shapes[SCOPE][-1:]


def cells(dtype, allow_tf32):
    from seqfast.kernels import rnn_cell as C
    for B, H in _narrow(CELL_SHAPES, dtype, allow_tf32):
        x, h = meta(B, H, dtype=dtype), meta(B, H, dtype=dtype)
        for g, fwd in ((4, C.lstm_cell_forward), (3, C.gru_cell_forward), (1, C.rnn_cell_forward)):
            w, b = meta(g * H, H, dtype=dtype), meta(g * H, dtype=dtype)
            if g == 4:
                hy, cy, gates = fwd(x, h, h, w, w, b, b, allow_tf32=allow_tf32)
                C.lstm_cell_backward(hy, cy, x, h, h, w, w, gates, cy)
            elif g == 3:
                hy, ws = fwd(x, h, w, w, b, None, allow_tf32=allow_tf32)
                C.gru_cell_backward(hy, x, h, w, w, ws)
            else:
                hy = fwd(x, h, w, w, None, b, relu=True, allow_tf32=allow_tf32)
                C.rnn_cell_backward(hy, x, h, w, w, hy, relu=True)


def sequences(dtype, allow_tf32):
    from seqfast.kernels import rnn_sequence as S
    T = 2
    exact_fp32 = dtype == torch.float32 and not allow_tf32
    for B, H in _narrow(SEQ_SHAPES, dtype, allow_tf32):
        # padded (in-kernel schedule) and packed (schedule table); the core sample packs exact fp32 only
        for bs in ([B] * T, [B, max(1, B // 2)])[:2 if SCOPE == "full" or exact_fp32 else 1]:
            batch_sizes = torch.tensor(bs)
            N = sum(bs)
            x, h0 = meta(N, H, dtype=dtype), meta(B, H, dtype=dtype)
            for persistent in (True, False):
                kw = dict(persistent=persistent, allow_tf32=allow_tf32)
                w4, b4 = meta(4 * H, H, dtype=dtype), meta(4 * H, dtype=dtype)
                out, hn, cn, gates, cs = S.lstm_layer_forward(x, batch_sizes, h0, h0, w4, w4, b4, b4, **kw)
                S.lstm_layer_backward(out, hn, cn, x, batch_sizes, h0, h0, w4, w4, out, gates, cs, **kw)
                w3, b3 = meta(3 * H, H, dtype=dtype), meta(3 * H, dtype=dtype)
                out, hn, ws = S.gru_layer_forward(x, batch_sizes, h0, w3, w3, b3, b3, reverse=True, **kw)
                S.gru_layer_backward(out, hn, x, batch_sizes, h0, w3, w3, out, ws, reverse=True, **kw)
                w1 = meta(H, H, dtype=dtype)
                out, hn = S.rnn_layer_forward(x, batch_sizes, h0, w1, w1, None, None, **kw)
                S.rnn_layer_backward(out, hn, x, batch_sizes, h0, w1, w1, out, **kw)


def attention(dtype, allow_tf32):
    from seqfast.kernels import attention as A
    # (N, Hq, Hk, Lq, Lk): a long sequence, batch*heads past 65535, a decoder step with a long cache, GQA
    for D in _narrow(HEAD_DIMS, dtype, allow_tf32):
        for N, Hq, Hk, Lq, Lk in ((2, 4, 4, 1024, 1024), (4096, 32, 32, 64, 64), (64, 8, 2, 1, 8192)):
            q, k, v = meta(N, Hq, Lq, D, dtype=dtype), meta(N, Hk, Lk, D, dtype=dtype), meta(N, Hk, Lk, D, dtype=dtype)
            for has_bias, causal in ((False, True), (True, False)):
                bias = meta(N, Hq, Lq, Lk, dtype=dtype).expand(N, Hq, Lq, Lk) if has_bias else None
                out, lse = A.sdpa_forward(q, k, v, bias, causal, None, allow_tf32)
                if Lq > 1:
                    A.sdpa_backward(out, q, k, v, out, lse, bias, causal, None, allow_tf32)
            if Lq == 1:
                A.sdpa_forward(q, k, v, None, False, None, allow_tf32, num_splits=16)  # forced split + combine


def additive(dtype):
    from seqfast.kernels import additive_attention as AA
    for N, S, A_, Dv in ADDITIVE[SCOPE]:
        qp, kp, v = meta(N, A_, dtype=dtype), meta(N, S, A_, dtype=dtype), meta(A_, dtype=dtype)
        vals, mask = meta(N, S, Dv, dtype=dtype), meta(N, S, dtype=torch.bool)
        ctx, w = AA.additive_attention_forward(qp, kp, v, vals, mask)
        AA.additive_attention_backward(ctx, w, qp, kp, v, vals, mask, w)


def main(argv):
    """argv: --full for the whole shape grid; optional family names (cells sequences attention additive) and dtype
    names (float32 ...) to narrow the run; none means every family and dtype."""
    global SCOPE
    SCOPE = "full" if "--full" in argv else "core"
    argv = [a for a in argv if a != "--full"]
    only = {a for a in argv if not a.startswith("float") and not a.startswith("bfloat")}
    dtypes = [d for d in DTYPES if str(d).split(".")[1] in argv] or DTYPES
    tools, reason = _tools()
    if tools is None:
        print(json.dumps({"skip": reason}))
        return
    rec = Recorder(*tools)
    rec.install()
    import seqfast.kernels  # noqa: F401  (the installed package name of kernels/)
    errors = []
    families = [(n, f) for n, f in (("cells", cells), ("sequences", sequences), ("attention", attention))
                if not only or n in only]
    for dtype in dtypes:
        tf32_modes = (False, True) if dtype == torch.float32 else (None,)
        for allow_tf32 in tf32_modes:
            for name, fn in families:
                rec.current = f"{name} {dtype} tf32={allow_tf32}"
                try:
                    fn(dtype, allow_tf32)
                except Exception:  # noqa: BLE001  (reported, the test fails on it)
                    errors.append(f"{rec.current}: {traceback.format_exc(limit=-3)}")
        if only and "additive" not in only:
            continue
        rec.current = f"additive {dtype}"
        try:
            additive(dtype)
        except Exception:  # noqa: BLE001
            errors.append(f"{rec.current}: {traceback.format_exc(limit=-3)}")
    print(json.dumps({"configs": list(rec.configs.values()), "errors": errors}))


if __name__ == "__main__":
    main(sys.argv[1:])
