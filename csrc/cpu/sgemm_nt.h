// Own float32 GEMM in dot-product form for x86-64 CPUs with AVX2 + FMA (seqfast._C internal; sgemm_nt.cpp).
//
// C = beta C + A @ W^T (+ bias) where both A [M, K] and W [N, K] have k-contiguous rows: the shape of every forward
// product of an RNN (x W_ih^T, h W_hh^T) with torch's weight layout, so nothing is packed or transposed. Each output is
// a dot product along k: a register tile of 3 A rows x 4 W rows (12 ymm accumulators, 7 loads per 12 FMAs), reduced
// with a horizontal-add tree at the end; each 4-row tile of W stays in L1 while a block of A rows (kept in L2) passes
// over it.
//
// Why: the MKL inside the torch CPU wheel runs its generic code path on AMD CPUs. On the 2-core Zen 3 EPYC this was
// written on it reached 27-98 GFLOP/s on the RNN shapes (batch 8-256 x hidden 128-1024), this kernel 105-155
// (benchmarks/gemm_nt.py prints both side by side). On a Zen 5 (AVX-512), where MKL also runs its AVX2 path, the cell
// steps ran 1.2-1.5x faster on it than on MKL; the AVX-512 GEMM of sgemm.h keeps the cases it already owns there (the
// packed weights of the sequence loops, products of 32+ rows).
//
// On CPUs with AVX-512 gemm and gemm2 run the same tiles on 16 lanes (sgemm_nt_avx512.cpp; Zen 5, same-process A/B,
// no grad, cell steps against the AVX2 form: RNNCell B32 H1024 1.38x, LSTMCell B64 H512 1.29x, LSTMCell B32 H256
// 1.25x, GRUCell B8 H1024 1.22x, RNNCell B8 H512 1.21x, LSTMCell B8 H128 1.10x).
//
// Callers check available() first. Single-threaded, no allocation; gemm.h's entry points split the W rows over the
// team.
#pragma once

#include <cstdint>

namespace seqfast {
namespace sgemm_nt {

// AVX2 + FMA present (cpu/isa.h) and config().own_gemm.
bool available();

// C[M, N] (row stride ldc) = beta C + A[M, K] (row stride lda) @ W[N, K]^T (row stride ldw) (+ bias[N] when bias is
// not null). beta is 0 or 1.
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* w, int64_t ldw, float beta,
          float* c, int64_t ldc, const float* bias = nullptr);

// Whether gemm2 sums M rows of K1 + K2 floats in one pass (else it runs operand by operand).
bool one_pass(int64_t M, int64_t K1, int64_t K2);

// C = beta C + A1[M, K1] @ W1[N, K1]^T + A2[M, K2] @ W2[N, K2]^T (+ bias): the two products of an RNN step (x W_ih^T
// and h W_hh^T) summed in the same accumulators, so each output pays one horizontal reduction and one store where two
// calls paid two (the reduction is about a quarter of a tile's time at K = 128), where one_pass(M, K1, K2); otherwise
// operand by operand. K2 = 0: gemm.
void gemm2(int64_t M, int64_t N, int64_t K1, const float* a1, int64_t lda1, const float* w1, int64_t ldw1, int64_t K2,
           const float* a2, int64_t lda2, const float* w2, int64_t ldw2, float beta, float* c, int64_t ldc,
           const float* bias = nullptr);

// The same products on AVX-512 vectors (sgemm_nt_avx512.cpp: the same tiles, 16 lanes), which gemm and gemm2 run
// where avx512_available(): AVX-512 present, config().own_gemm and config().avx512_nt.
bool avx512_available();
void gemm2_avx512(int64_t M, int64_t N, int64_t K1, const float* a1, int64_t lda1, const float* w1, int64_t ldw1,
                  int64_t K2, const float* a2, int64_t lda2, const float* w2, int64_t ldw2, float beta, float* c,
                  int64_t ldc, const float* bias);

}  // namespace sgemm_nt
}  // namespace seqfast
