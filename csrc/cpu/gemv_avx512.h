// Small-batch float32 GEMV for x86-64 CPUs with AVX-512 (seqfast._C internal; gemv_avx512.cpp).
//
// y[b][j] (+)= sum_k x1[b][k] w1[j][k] + sum_k x2[b][k] w2[j][k] for rows j in [j0, j1) and b < nb (weights
// row-major, k-contiguous: a torch weight [N, K], or a transposed copy for the backward's d W). The same contract as
// kern::gemv<float> (rnn/rnn_pointwise.h), whose AVX2 form it replaces where available(). Every tile keeps 16 zmm
// accumulators and ends with one reduction tree (avx512::reduce16) whose lanes are its sums: 8 weight rows x 2
// vectors of k (32 k per step) for one batch row, 4 rows x 2 vectors for two, 4 rows x 4 batch rows from three.
// Why: a cell step or a 1-2 row time loop at small batch is this product and little else, and on a Zen 5 core the
// AVX2 form (8 rows, one 8-lane vector each) left the two 512-bit load ports half used. Tiles of 16 rows x one
// vector read the same weights slower where they come from L3 or memory (GRUCell B1 H1024, 25 MB: 205 us against
// the AVX2 form's 184 and 170 for 8 rows x 2 vectors, same process), as 16 concurrent row streams are more than the
// prefetchers follow.
//
// Callers check available() first. Single-threaded over its row range; no allocation.
#pragma once

#include <cstdint>

namespace seqfast {
namespace gemv512 {

// AVX-512 present, config().own_gemm and config().avx512_gemv.
bool available();

void gemv(int64_t nb, const float* const* x1, const float* w1, int64_t K1, const float* const* x2, const float* w2,
          int64_t K2, float* const* y, int64_t j0, int64_t j1, bool accumulate);

}  // namespace gemv512
}  // namespace seqfast
