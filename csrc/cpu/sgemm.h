// Own float32 GEMM for x86-64 CPUs with AVX-512 (seqfast._C internal; implementation in sgemm.cpp). Kernels reach
// it through the GEMM entry point (cpu/gemm.h), except the AVX-512 kernels that call it on their own packed blocks.
//
// Why: the MKL that ships inside the PyTorch CPU wheel takes its AVX2 code path on AMD CPUs, well below what
// oneDNN's AVX-512 kernels (used by torch's own LSTM) reach; oneDNN's GEMM is not exported from libtorch_cpu, so
// the hot GEMMs of the RNN layers and of attention run on this kernel instead: 8x32 register tile (16 zmm
// accumulators), B packed once into 32-column panels and reused, A read in place with any row/column strides (so
// transposed operands need no copy). The benchmark notes hold the measured rates.
//
// Callers must check available() first (AVX-512 present and config().own_gemm); otherwise they use BLAS. All sizes
// are int64_t element counts; nothing here allocates except PackedB's pool block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "cpu/block_pool.h"

namespace seqfast {
namespace sgemm {

constexpr int64_t kNR = 32;  // panel width (columns of B per packed panel)

// AVX-512 present (cpu/isa.h) and config().own_gemm: the own GEMM and the other AVX-512 kernels may run.
bool available();

// Floats needed to pack a K x N matrix B: ceil(N / 32) panels of K rows x 32 columns, zero padded.
inline int64_t pack_size(int64_t K, int64_t N) { return ((N + kNR - 1) / kNR) * kNR * K; }

// Packs B(k, j) = src[k * sk + j * sj] (k < K, j < N) into dst (pack_size(K, N) floats, 64-byte aligned).
void pack_b(int64_t K, int64_t N, const float* src, int64_t sk, int64_t sj, float* dst);

// pack_b split over nt OpenMP threads by panels.
void pack_b_parallel(int nt, int64_t K, int64_t N, const float* src, int64_t sk, int64_t sj, float* dst);

// C[M, N] (row stride ldc) = beta * C + A @ B (+ bias[j] when bias != nullptr; bias requires beta == 0),
// A(r, k) = a[r * ar + k * ak], B packed by pack_b with the same K and N (or a whole-panel column window of a
// larger packing: pass bp + p0 * K * kNR and the window's N). beta is 0 or 1. Single-threaded.
// pstride: floats between consecutive panels of bp (0 = K * kNR). A K-row window [k0, k0 + K) of a packing made
// with more rows Kp is bp = base + k0 * kNR with pstride = Kp * kNR (attention reuses one packed V this way).
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* bp, float beta,
          float* c, int64_t ldc, const float* bias = nullptr, int64_t pstride = 0);

// Same, split over nt OpenMP threads by panels of B (each thread writes its own columns of C). nt <= 1 or a
// call from inside a parallel region runs single-threaded.
void gemm_parallel(int nt, int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* bp,
                   float beta, float* c, int64_t ldc, const float* bias = nullptr);

// An owned packed B (64-byte aligned, from the block pool so that a layer called every step does not page-fault
// fresh megabytes of packing each time).
struct PackedB {
  block_pool::Floats buf;
  float* p = nullptr;
  int64_t K = 0, N = 0;
  void pack(int64_t K_, int64_t N_, const float* src, int64_t sk, int64_t sj, int nt = 1) {
    K = K_;
    N = N_;
    buf.reset(pack_size(K, N));
    p = buf.get();
    if (p) pack_b_parallel(nt, K, N, src, sk, sj, p);
  }
  bool ok() const { return p != nullptr; }
};

}  // namespace sgemm
}  // namespace seqfast
