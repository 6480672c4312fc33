// float32 flash-attention forward block for x86-64 CPUs with AVX-512 (seqfast._C internal; attention_avx512.cpp).
//
// One task = one query block (up to kBq = 64 rows) of one (batch, head). Everything is computed transposed, queries
// along the vector lanes (4 zmm registers of 16 queries):
//   * S^T [keys x queries] = K_blk (scale Q_blk)^T: K is read in place as the broadcast operand (rows of K are
//     k-contiguous) and only the small Q block is packed (transposed, scaled) once per task;
//   * the online softmax runs down the columns: the running max and sum of 64 queries live in 4 zmm registers and
//     every reduction over keys is a vertical max/add (no horizontal reductions); exp is exp2 on (s - m) log2(e);
//   * O^T [value columns x queries] += V_blk^T P^T: V read in place as the broadcast operand, P^T rows as stored by
//     the softmax, so neither P nor V is packed, and the per-query rescale is a vector multiply; O^T is transposed
//     to the output once per task.
// Both register tiles are 6 x 64 (24 accumulators) and FMA-bound. Causal key blocks past the diagonal are never
// visited, and on the diagonal block the 16-query lane groups a key is masked for are skipped (not computed).
// Callers check sgemm::available() first (attention.cpp: use_avx512()).
#pragma once

#include <cstdint>

namespace seqfast {
namespace attn512 {

// Workspace parts are rounded up to 16 floats so each starts 64-byte aligned.
inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

constexpr int64_t kBq = 64;   // query rows per task
constexpr int64_t kBk = 256;  // keys per score block

// The operands every task reads: query rows, the keys and values of one kv head, the scale.
struct QkvRows {
  const float* q = nullptr;       // query row r at q + r * sq (D floats)
  int64_t sq = 0, D = 0;
  const float* k = nullptr;       // key j at k + j * sk
  int64_t sk = 0;
  const float* v = nullptr;       // value j at v + j * sv (Dv floats)
  int64_t sv = 0, Dv = 0;
  int64_t kv_end = 0;             // keys below kv_end are visited (from 0, or from BwdBlock::j_lo)
  float scale = 1.f;
};

// A query block of one head: QkvRows plus its row range, mask and causality (FwdBlock and BwdBlock).
struct BlockRows : QkvRows {
  int64_t mq = 0;                 // query rows in this block (<= kBq)
  int64_t i0 = 0;                 // query index of row 0 (causal: row r sees keys j <= i0 + r)
  const float* bias = nullptr;    // additive mask of row r, key j at bias + r * bsi + j * bsj, or nullptr
  int64_t bsi = 0, bsj = 0;
  bool causal = false;
};

struct FwdBlock : BlockRows {
  float* out = nullptr;           // row r at out + r * so (Dv floats)
  int64_t so = 0;
  float* lse = nullptr;           // mq floats; -inf for a fully masked row (whose output is 0)
};

// Floats of scratch a task needs (64-byte aligned, caller-owned, reusable across tasks).
int64_t fwd_workspace(int64_t D, int64_t Dv);

void fwd_block(const FwdBlock& a, float* ws);

// Backward of one query block (up to kBq rows) of one head against keys [j_lo, kv_end), in key blocks of kBkBwd,
// with the same transposed layout: S^T and dP^T as rows-x-packed tiles (K and V read in place, scale Q^T and dO^T
// packed once per call), dQ^T accumulated transposed (K read in place), dV += P^T dO and dK += dS^T (scale Q) on the
// own GEMM (sgemm.h) with P^T / dS^T read in place and dO / scale Q packed once per call. Causal blocks past the
// diagonal are never visited; on the diagonal, masked 16-query lane groups are skipped.
constexpr int64_t kBkBwd = 128;  // keys per backward block

struct BwdBlock : BlockRows {      // keys by absolute index (k + j * sk)
  const float* dout = nullptr;      // gradient of the output, row r at dout + r * sdo (Dv floats)
  int64_t sdo = 0;
  int64_t j_lo = 0;                 // keys [j_lo, kv_end) are visited
  const float* lse = nullptr;       // mq floats, +inf for a fully masked row (P = 0 there; sdpa_backward maps the
                                    // forward's -inf to +inf)
  const float* delta = nullptr;     // mq floats: rowsum(dout * out)
  float* dq = nullptr;              // += : row r at dq + r * sdq (D floats)
  int64_t sdq = 0;
  float* dk = nullptr;              // += : key j at dk + (j - j_lo) * D
  float* dv = nullptr;              // += : key j at dv + (j - j_lo) * Dv
};

int64_t bwd_workspace(int64_t D, int64_t Dv);

void bwd_block(const BwdBlock& a, float* ws);

}  // namespace attn512
}  // namespace seqfast
