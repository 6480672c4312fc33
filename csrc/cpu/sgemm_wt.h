// Own float32 GEMM in broadcast form with the weight read in place, for x86-64 CPUs with AVX-512 (seqfast._C
// internal; sgemm_wt.cpp).
//
// C[M, N] = beta C + A1 @ W1^T + A2 @ W2^T (+ bias), W(n, k) = w[n * wr + k * wk]: a torch weight [N, K] (wr = K,
// wk = 1: a cell step's x W_ih^T and h W_hh^T) or a row-major [K, N] matrix (wr = 1, wk = N). Computed as
// C^T = W A^T: A, the small operand (the batch rows of a step), is packed into the 32-column panels of sgemm.h (the
// panels of A^T, zero padded), and each register tile of 8 W rows x 32 A rows (16 zmm accumulators) loads two panel
// vectors and broadcasts 8 W elements straight from the weight per k; the tile is then transposed into C, with the
// bias and beta, in 8 x 8 blocks.
//
// Why: at the batch sizes of a cell step (16-128 rows) the other forms pay per weight element. The packed GEMM
// (sgemm.h) copies every weight into panels on each call, and each copied element serves only M rows; the
// dot-product form (sgemm_nt.h) reads the weight in place but loads 11 vectors per 24 multiply-adds and ends every
// output with a horizontal sum. Here the weight is read once, in place, by 32-bit broadcasts that the load ports
// absorb beside the FMAs, and only A (M x K floats, a few hundred KB at most) is copied. Single thread, Zen 5 (AMD
// EPYC family 26), C++ microbenchmarks of the inner loops, GFLOP/s: A [32, 1024] W [1024, 1024]^T 245 against the
// dot-product form's 175; A [16, 1024] 218-227 (one 16-row panel) against 168-172; the FMA peak measured 260.
//
// Callers check available() first. gemm is single-threaded over a range of W rows and allocates nothing; gemm.h's
// entry points pack A once per call and split the W rows over the team.
#pragma once

#include <cstdint>

#include "cpu/sgemm.h"

namespace seqfast {
namespace sgemm_wt {

// AVX-512 present and config().own_gemm (sgemm::available()).
bool available();

// W rows per register tile: split the W rows between threads in multiples of it.
constexpr int64_t kRows = 8;

// A of at most 16 rows is packed k-interleaved instead (the narrow form): per pair of k, one 16-float vector per 8 rows
// (NV = 1 or 2 vectors, rows past M zero), lane m * 2 + i = A(m, k + i), and each W row's pair of k is broadcast as one
// 64-bit pattern against them; the tile's lane pairs are added at the end. Why: the 16-row tail panel fills only M of
// its 16 lanes, and for 8 rows the panel's form ran at 192 GFLOP/s on 2 threads where the dot-product form ran at 250.
constexpr int64_t kNarrowRows = 16;
inline int64_t narrow_vectors(int64_t M) { return M > 8 ? 2 : 1; }
// Floats to pack A [M, K]: the 32-column panels of A^T (sgemm::pack_size(K, M)), or for M <= 16 the narrow form's
// ceil(K / 2) x NV vectors.
inline int64_t pack_size(int64_t M, int64_t K) {
  return M <= kNarrowRows ? (K + 1) / 2 * 16 * narrow_vectors(M) : sgemm::pack_size(K, M);
}

// Packs A(r, k) = a[r * lda + k] (r < M, k < K; k-contiguous rows) into dst (pack_size(M, K) floats, 64-byte
// aligned).
void pack(int64_t M, int64_t K, const float* a, int64_t lda, float* dst);

// One product of a gemm call: K (0: no product), A packed by pack(M, K, ...), W(n, k) = w[n * wr + k * wk].
// stream: the weights of the whole call step do not stay in the L3 between calls (streams_weights); the narrow form
// then fetches each next W tile ahead.
struct Operand {
  int64_t K = 0;
  const float* ap = nullptr;
  const float* w = nullptr;
  int64_t wr = 0, wk = 0;
  bool stream = false;
};

// Whether weights of this many floats, read once per call (a cell step's W_ih and W_hh together), pass half of the
// L3 (cpu::l3_cache_bytes), so that each call streams them from memory. Why the narrow form asks: there the next
// tile's rows fetched ahead gave 1.06x (LSTMCell B8 H1024, 32 MB) and 1.08x (GRUCell B8 H1024, 24 MB), but cost
// 0.80-0.89x where the weights stay in the L3 (RNNCell B8 H512 / H1024, LSTMCell B8 H256 / H512; same process, Zen 5
// with a 32 MB L3), where the hardware's prefetch already keeps up and the extra loads compete with the broadcasts.
bool streams_weights(int64_t weight_floats);

// Columns [n0, n1) of C[M, N] (row stride ldc; c points at C[0, 0]) = beta C + A1 W1^T + A2 W2^T (+ bias[n] when
// bias is not null): both products summed in the same accumulators. beta is 0 or 1.
void gemm(int64_t M, int64_t n0, int64_t n1, const Operand& o1, const Operand& o2, float beta, float* c, int64_t ldc,
          const float* bias);

}  // namespace sgemm_wt
}  // namespace seqfast
