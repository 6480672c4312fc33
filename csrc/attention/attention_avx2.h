// float32 flash-attention forward and backward blocks for x86-64 CPUs with AVX2 + FMA (seqfast._C internal;
// attention_avx2.cpp, attention_avx2_bwd.cpp). attention.cpp runs them where the AVX-512 kernels do not.
//
// One task = one query block (up to kBq = 64 rows) of one (batch, head). Like the AVX-512 block it works transposed,
// queries along the vector lanes (8 ymm of 8 queries), so the online softmax's maxima and sums are vertical vector
// operations and neither K nor V is copied:
//   * S^T [keys x queries] = K_blk (scale Q_blk)^T on the own outer-product GEMM (cpu/sgemm_nn.h): K rows are its
//     broadcast operand, read in place; only the Q block is packed (transposed, scaled) once per task;
//   * O^T [value columns x queries] += V_blk^T P^T on the same kernel, V read in place as the broadcast operand (a
//     strided A) and P^T as the softmax left it; O^T is transposed to the output once per task.
// Why: the generic path's block GEMMs went to the BLAS, and the torch wheel's MKL runs its generic code on AMD CPUs;
// torch's own CPU flash kernel was the faster of the two on a Zen 3 (0.34-0.80x for seqfast without causal masking).
// Causal key blocks past the diagonal are never visited. Single-threaded, no allocation; callers check blocks_available().
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention/attention_avx512.h"  // attn512::FwdBlock / BwdBlock (plain arguments, no AVX-512 code)

namespace seqfast {
namespace attn_avx2 {

bool blocks_available();  // AVX2 + FMA (the own AVX2 GEMMs available) and config().avx2_attention

// The arguments and tasks are the AVX-512 blocks' (attention.cpp runs either through the same task loops): one
// query block of attn512::kBq rows per task.
constexpr int64_t kBq = attn512::kBq;
constexpr int64_t kBk = 256;  // keys per score block

// Both blocks' scores are transposed, key j's kBq queries at st + j * kBq: st[j][i] += the additive mask of query i,
// key j0 + j (i < a.mq, j < nk). Scalar code shared by the two translation units (compiled for the baseline ISA in
// both, so either copy may serve).
inline void add_mask_t(const attn512::BlockRows& a, int64_t j0, int64_t nk, float* st) {
  for (int64_t j = 0; j < nk; ++j) {
    float* s = st + j * kBq;
    const float* b = a.bias + (j0 + j) * a.bsj;
    for (int64_t i = 0; i < a.mq; ++i) s[i] += b[i * a.bsi];
  }
}

// Causal (top-left): how many of the first `lanes` queries of the block key `key` is masked for (queries i0 + i <
// key).
inline int64_t causal_masked(const attn512::BlockRows& a, int64_t key, int64_t lanes) {
  return std::clamp<int64_t>(key - a.i0, 0, lanes);
}

// Floats of scratch a task needs (caller-owned, reusable across tasks).
int64_t fwd_workspace(int64_t D, int64_t Dv);

// out / lse of one query block (attn512::FwdBlock): lse -inf for a fully masked row (whose output is 0), NaN for a
// NaN score.
void fwd_block(const attn512::FwdBlock& a, float* ws);

// Backward of one query block (up to kBq rows) of one head against keys [j_lo, kv_end) (attn512::BwdBlock: the
// same arguments as the AVX-512 backward block, which is also laid out transposed), in key blocks of kBkBwd:
//   S^T = K_blk (scale Q)^T and dP^T = V_blk dO^T (K, V read in place; scale Q^T and dO^T packed once per call),
//   P^T = exp(S^T - lse), dS^T = scale P^T (dP^T - delta) as vertical vector ops over the queries,
//   dV += P^T dO, dK += dS^T Q (dO and Q rows read in place), dQ^T += K_blk^T dS^T (K read in place, transposed to
//   dq once per call), all on the own AVX2 GEMM (cpu/sgemm_nn.h).
constexpr int64_t kBkBwd = 128;  // keys per backward block
int64_t bwd_workspace(int64_t D, int64_t Dv);

void bwd_block(const attn512::BwdBlock& a, float* ws);

}  // namespace attn_avx2
}  // namespace seqfast
