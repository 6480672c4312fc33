"""The GEMM choice on CPUs without AVX-512: the rates of seqfast's own AVX2 kernels for A [M, K] @ W [N, K]^T, the
dot-product form (csrc/cpu/sgemm_nt.h, seqfast._C.gemm_nt_f32) and the outer-product form packing W as it goes
(csrc/cpu/sgemm_nn.h gemm_nt, seqfast._C.gemm_ntp_f32), against the BLAS in torch's wheel (torch.mm), on a grid of
RNN-shaped products (N = 4K; also N = K for the small ones), interleaved in one process. gemm.cpp's nt_prefers() and
ntp_prefers() hold the rules derived from this table. Diagnostic, not part of `make bench`.
Run: python benchmarks/gemm_nt.py"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
import timing  # noqa: E402
import seqfast._C as C  # noqa: E402


def rates(fns, rounds=15, round_time=0.03):
    """{name: median seconds per call}, rounds in rotating order (timing.interleaved)."""
    return {name: statistics.median(t) for name, t in timing.interleaved(fns, rounds, round_time).items()}


def main():
    print("\n".join(machine.header_lines(machine.machine("cpu"))))
    if not C.nt_gemm_available():
        print("the own AVX2 GEMM does not run on this CPU (no AVX2/FMA, or AVX-512 present: its own kernel runs)")
        return
    print(f"{'M':>5} {'K':>5} {'N':>5}   BLAS GF/s   dot GF/s   pack GF/s   best own/BLAS")
    for K in (64, 128, 256, 512, 1024):
        for M in (8, 32, 64, 128, 256, 512, 2048):
            # N = 4K: an LSTM's gate rows; N = K as well where the product is small (an Elman cell's, near the
            # 2^20 multiply-adds below which gemm.cpp sends any shape to the own kernel)
            for N in (K, 4 * K) if K <= 128 and M <= 128 else (4 * K,):
                a, w = torch.randn(M, K), torch.randn(N, K)
                flop = 2 * M * K * N
                t = rates({"blas": lambda: torch.mm(a, w.t()), "dot": lambda: C.gemm_nt_f32(a, w),
                           "pack": lambda: C.gemm_ntp_f32(a, w)})
                best = min(("dot", "pack"), key=t.get)
                print(f"{M:>5} {K:>5} {N:>5}   {flop / t['blas'] / 1e9:9.1f}   {flop / t['dot'] / 1e9:8.1f}"
                      f"   {flop / t['pack'] / 1e9:9.1f}   {best:>4} {t['blas'] / t[best]:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
