"""The GEMM choice on CPUs without AVX-512: the rate of seqfast's own AVX2 kernel (csrc/cpu/sgemm_nt.h, dot-product
form, called directly through seqfast._C.gemm_nt_f32) against the BLAS in torch's wheel (torch.mm), on a grid of
RNN-shaped products A [M, K] @ W [N, K]^T (N = 4K; also N = K for the small ones), interleaved in one process.
gemm.cpp's nt_prefers() holds the rule derived from this table. Diagnostic, not part of `make bench`.
Run: python benchmarks/gemm_nt.py"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
import seqfast._C as C  # noqa: E402


def rates(fns, rounds=15, round_time=0.03):
    """{name: median seconds per call}, rounds in rotating order."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n, start = fns[name], 0, time.perf_counter()
            while time.perf_counter() - start < round_time:
                fn()
                n += 1
            times[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    print("\n".join(machine.header_lines(machine.machine("cpu"))))
    if not C.nt_gemm_available():
        print("the own AVX2 GEMM does not run on this CPU (no AVX2/FMA, or AVX-512 present: its own kernel runs)")
        return
    print(f"{'M':>5} {'K':>5} {'N':>5}   BLAS GF/s   own GF/s   own/BLAS")
    for K in (64, 128, 256, 512, 1024):
        for M in (8, 32, 64, 128, 256, 512, 2048):
            # N = 4K: an LSTM's gate rows; N = K as well where the product is small (an Elman cell's, near the
            # 2^20 multiply-adds below which gemm.cpp sends any shape to the own kernel)
            for N in (K, 4 * K) if K <= 128 and M <= 128 else (4 * K,):
                a, w = torch.randn(M, K), torch.randn(N, K)
                flop = 2 * M * K * N
                t = rates({"blas": lambda: torch.mm(a, w.t()), "own": lambda: C.gemm_nt_f32(a, w)})
                print(f"{M:>5} {K:>5} {N:>5}   {flop / t['blas'] / 1e9:9.1f}   {flop / t['own'] / 1e9:8.1f}"
                      f"   {t['blas'] / t['own']:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
