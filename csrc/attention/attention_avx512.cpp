// AVX-512 float32 flash-attention forward block. See attention_avx512.h for the transposed-score layout.
// Compiled for AVX-512 by the target pragma below; no ATen headers here (same reason as sgemm.cpp).
#include "attention/attention_avx512.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/isa.h"
#include "cpu/sgemm.h"

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX512_ATTN 1
SEQFAST_TARGET_AVX512_BEGIN
#include <immintrin.h>

#include "attention/attention_avx512_tiles.h"
#include "cpu/avx512_math.h"
#endif

namespace seqfast {
namespace attn512 {

int64_t fwd_workspace(int64_t D, int64_t Dv) {
  return round16(sgemm::pack_size(D, kBq)) + 2 * kBk * kBq + Dv * kBq + 3 * kBq;
}

#ifdef SEQFAST_HAVE_AVX512_ATTN

namespace {

static_assert(kBq == tiles::kLanes, "a task's query block is one lane block of the shared tiles");
using tiles::Segments;

struct ScoreCtx {
  const FwdBlock* a;
  int64_t j0;        // first key of the block
  int nv;            // live 16-query lane groups (queries < mq)
  bool diag;         // block crosses the causal diagonal
  const float* BT;   // the mask of the block transposed (key j's 64 queries at BT + j * kBq) when it varies by query
  const float* qT;   // scale * Q^T packed
  float* ST;         // S^T of the block
  __m512* mx;        // the block's running max per query, 4 lane groups
};

// Additive and causal mask of 16 scores (queries 16v.. of this block, one key). The scale is already in Q^T.
inline __m512 finish(const ScoreCtx& c, __m512 x, int64_t key, int v) {
  const FwdBlock& a = *c.a;
  x = tiles::add_mask(x, c.BT, key - c.j0, v, a.bias, a.bsj, key);
  return c.diag ? tiles::causal_mask(x, a.i0 + 16 * v, key) : x;
}

// Scores of keys [j, j + MR) of the block against the kBq queries: an MR x 64 register tile over the head dim, K rows
// broadcast in place, Q^T from its two packed 32-query panels. Lane groups v < V0 are causally masked for all MR keys:
// not computed, stored as -inf. Groups past the last query (v >= nv) are stored as 0 so that P V reads defined values
// there. The epilogue masks, stores S^T rows and folds the block's running max per query.
template <int MR, int V0>
inline void score_tile(const ScoreCtx& c, int64_t j) {
  const FwdBlock& a = *c.a;
  __m512 acc[MR][4];
  tiles::dot_rows<MR, V0>(a.k + (c.j0 + j) * a.sk, a.sk, a.D, c.qT, acc);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int r = 0; r < MR; ++r) {
    float* s = c.ST + (j + r) * kBq;
    for (int v = 0; v < V0; ++v) _mm512_store_ps(s + 16 * v, ninf);
    for (int v = V0; v < 4; ++v) {
      if (v >= c.nv) {
        _mm512_store_ps(s + 16 * v, _mm512_setzero_ps());
        continue;
      }
      const __m512 x = finish(c, acc[r][v], c.j0 + j + r, v);
      _mm512_store_ps(s + 16 * v, x);
      c.mx[v] = _mm512_max_ps(c.mx[v], x);
    }
  }
}

template <int MR, int V0>
struct ScoreTile {
  static void run(const ScoreCtx& c, int64_t j) { score_tile<MR, V0>(c, j); }
};

}  // namespace

void fwd_block(const FwdBlock& a, float* ws) {
  const int64_t mq = a.mq, D = a.D, Dv = a.Dv;
  float* qT = ws;                                          // scale * Q^T packed: B(d, i) = scale * q[i, d]
  float* ST = qT + round16(sgemm::pack_size(D, kBq));      // S^T block [kBk keys][kBq queries], then P^T
  float* BT = ST + kBk * kBq;                              // the block's mask transposed, when it varies by query
  float* accT = BT + kBk * kBq;                            // unnormalised output transposed [Dv][kBq]
  float* mrow = accT + Dv * kBq;                           // running max per query
  float* lrow = mrow + kBq;                                // running sum per query
  float* arow = lrow + kBq;                                // rescale factor of this block per query
  const int nv = int((mq + 15) / 16);                      // live 16-query lane groups
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);

  // the softmax scale folded into Q^T once per task: the score epilogue then needs no multiply
  tiles::pack_lanes(D, mq, a.q, a.sq, a.scale, qT);
  for (int64_t r = 0; r < kBq; ++r) {
    mrow[r] = ninf;
    lrow[r] = 0.f;
    arow[r] = 1.f;  // lanes past mq keep 1: the P V tiles rescale all 64 lanes
  }
  std::memset(accT, 0, sizeof(float) * Dv * kBq);
  const bool per_query = a.bias && a.bsi != 0;  // the mask varies by query: transposed per key block

  for (int64_t j0 = 0; j0 < a.kv_end; j0 += kBk) {
    const int64_t nk = std::min(kBk, a.kv_end - j0);
    const bool diag = a.causal && j0 + nk - 1 > a.i0;
    const Segments sg(a.i0, j0, nk, diag);
    // S^T = K_blk (scale Q)^T (keys x queries, row stride kBq), masked, with the block max per query.
    if (per_query) tiles::transpose_mask(a.bias + j0 * a.bsj, a.bsi, a.bsj, mq, nk, BT);
    __m512 mx[kBq / 16];
    for (int v = 0; v < kBq / 16; ++v) mx[v] = _mm512_set1_ps(ninf);
    const ScoreCtx sc{&a, j0, nv, diag, per_query ? BT : nullptr, qT, ST, mx};
    tiles::key_tiles<ScoreTile>(sc, sg, nk);
    // online softmax update; a query whose scores are all -inf so far keeps m = -inf and contributes 0.
    __m512 mu[kBq / 16];
    bool rescale = false;
    for (int v = 0; v < nv; ++v) {
      const __m512 mold = _mm512_load_ps(mrow + 16 * v);
      const __m512 mnew = _mm512_max_ps(mold, mx[v]);
      const __mmask16 dead = _mm512_cmp_ps_mask(mnew, _mm512_set1_ps(ninf), _CMP_EQ_OQ);
      mu[v] = _mm512_mask_mov_ps(mnew, dead, _mm512_setzero_ps());
      // exp(-inf) = 0 for a first live block
      const __m512 alpha = avx512::exp2_ps(_mm512_mul_ps(_mm512_sub_ps(mold, mu[v]), log2e));
      rescale |= _mm512_cmp_ps_mask(mold, mnew, _CMP_NEQ_UQ) != 0;
      _mm512_store_ps(mrow + 16 * v, mnew);
      _mm512_store_ps(arow + 16 * v, alpha);
    }
    // P = exp(S - m), in place; lane groups a key is causally masked for stay untouched (P V skips them).
    __m512 sum[kBq / 16];
    for (int v = 0; v < kBq / 16; ++v) sum[v] = _mm512_setzero_ps();
    for (int64_t j = 0; j < nk; ++j) {
      float* s = ST + j * kBq;
      for (int v = sg.dead(j); v < nv; ++v) {
        const __m512 p = avx512::exp2_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(s + 16 * v), mu[v]), log2e));
        _mm512_store_ps(s + 16 * v, p);
        sum[v] = _mm512_add_ps(sum[v], p);
      }
    }
    for (int v = 0; v < nv; ++v) {
      const __m512 l = _mm512_load_ps(lrow + 16 * v);
      _mm512_store_ps(lrow + 16 * v, _mm512_fmadd_ps(l, _mm512_load_ps(arow + 16 * v), sum[v]));
    }
    // accT = alpha accT + V_blk^T P^T
    const tiles::AccumCtx pc{ST, &sg, nk, a.v + j0 * a.sv, a.sv, accT, (rescale && j0 > 0) ? arow : nullptr};
    tiles::accum_block(pc, Dv);
  }
  // out = accT^T / l, 16 x 16 blocks transposed in registers; a fully masked row (or no keys: l == 0) gives 0 as
  // torch does, with lse = -inf (attention.h). A NaN score made l NaN: out and lse are NaN, as in torch.
  for (int v = 0; v < nv; ++v) {
    const int rows = int(std::min<int64_t>(16, mq - 16 * v));
    for (int64_t cb = 0; cb < Dv; cb += 16) {
      __m512 t[16];
      for (int64_t i = 0; i < 16; ++i)
        t[i] = cb + i < Dv ? _mm512_load_ps(accT + (cb + i) * kBq + 16 * v) : _mm512_setzero_ps();
      avx512::transpose16(t);
      const __mmask16 cm = avx512::mask16(Dv - cb);
      for (int i = 0; i < rows; ++i) {
        const float l = lrow[16 * v + i];
        const __m512 x = l != 0.f ? _mm512_mul_ps(t[i], _mm512_set1_ps(1.f / l)) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(a.out + (16 * v + i) * a.so + cb, cm, x);
      }
    }
  }
  for (int64_t r = 0; r < mq; ++r) {
    const float l = lrow[r];
    a.lse[r] = l != 0.f ? mrow[r] + std::log(l) : -std::numeric_limits<float>::infinity();
  }
}

#else

void fwd_block(const FwdBlock&, float*) {}

#endif

}  // namespace attn512
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX512_ATTN
SEQFAST_TARGET_END
#endif
