// Small-batch float32 products with bfloat16 weights read in place, for x86-64 CPUs with AVX2 + FMA (seqfast._C
// internal; bf16_weight_gemv.cpp). The three products of a bfloat16 RNN cell step at batch 1-7 on a CPU without
// native bfloat16 (no AVX512_BF16 / AMX):
//   * gemv:   y = x1 @ W1^T + x2 @ W2^T   (the forward's gate pre-activations)
//   * gemv_t: y = d @ W                   (the backward's input and state gradients)
//   * outer:  dW = bf16(d^T @ x)          (the backward's weight gradients, rounded once)
// Activations, gradients and accumulators are float32; a weight element is widened to float32 in a register (a
// 16-bit shift) as it is read. Why: at these batches a step reads every weight once and does one multiply-add per
// weight and row, so it runs at the speed of reading the weights. torch's bfloat16 cell op runs its GEMMs emulated on
// such a CPU (about 20x slower than float32 on a Zen 3), and converting the weights to float32 first (what seqfast
// does from batch 8, seqfast._rules.upcast_bfloat16) costs more than the step. Read in place, the weights move half
// the bytes of a float32 step.
//
// Every function is single-threaded and allocates nothing; the callers (rnn/rnn_cell.cpp) split the rows over the
// team. bfloat16 values travel as their raw 16-bit patterns. Callers check available() first.
#pragma once

#include <cstdint>

namespace seqfast {
namespace bf16w {

// AVX2 + FMA on this CPU (and an x86 build).
bool available();

// y[b][j] (+)= sum_k x1[b][k] w1[j * K1 + k] + sum_k x2[b][k] w2[j * K2 + k], for b < nb and j in [j0, j1). w2 may
// be null (then x2 is not read). Rows are taken four at a time.
void gemv(int64_t nb, const float* const* x1, const uint16_t* w1, int64_t K1, const float* const* x2,
          const uint16_t* w2, int64_t K2, float* const* y, int64_t j0, int64_t j1, bool accumulate);

// y[b * K + k] (+)= sum_{j in [j0, j1)} d[b * ldd + j] w[j * K + k], for b < nb and k < K.
void gemv_t(int64_t nb, const float* d, int64_t ldd, const uint16_t* w, int64_t K, int64_t j0, int64_t j1, float* y,
            bool accumulate);

// dw[j * K + k] = bfloat16(sum_{b < nb} d[b * ldd + j] x[b * K + k]) for j in [j0, j1) and k < K, rounded to nearest
// even as torch's Tensor.to rounds (NaN to 0xFFFF). nb <= 16.
void outer(int64_t nb, const float* d, int64_t ldd, const float* x, int64_t K, int64_t j0, int64_t j1, uint16_t* dw);

}  // namespace bf16w
}  // namespace seqfast
