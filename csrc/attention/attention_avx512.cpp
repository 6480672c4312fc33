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

namespace {

using avx512::mask16;

// scores[g][j0 : j0 + nj] for one block of nj <= 16 keys, all G heads (the block stays in L1 across heads).
void decode_scores(const DecodeHead& a, int64_t j0, int64_t nj, float* scores) {
  const __mmask16 jm = mask16(nj);
  for (int64_t g = 0; g < a.G; ++g) {
    const float* q = a.q + g * a.sq;
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    // key by key, each row read front to back (the block is nj * D contiguous floats when K is contiguous): the
    // op streams K from memory, and sequential rows keep the hardware prefetchers ahead
    for (int64_t j = 0; j < nj; ++j) {
      const float* kr = a.k + (j0 + j) * a.sk;
      for (int64_t d = 0; d < a.D; d += 16) {
        const __mmask16 dm = mask16(a.D - d);
        acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(dm, q + d), _mm512_maskz_loadu_ps(dm, kr + d), acc[j]);
      }
    }
    __m512 sc = _mm512_mul_ps(avx512::reduce16(acc), _mm512_set1_ps(a.scale));
    if (a.bias) {
      const float* b = a.bias + g * a.bsg + j0 * a.bsj;
      if (a.bsj == 1) {
        sc = _mm512_add_ps(sc, _mm512_maskz_loadu_ps(jm, b));
      } else {
        alignas(64) float t[16] = {};
        for (int64_t j = 0; j < nj; ++j) t[j] = b[j * a.bsj];
        sc = _mm512_add_ps(sc, _mm512_load_ps(t));
      }
    }
    _mm512_mask_storeu_ps(scores + g * a.kv_end + j0, jm, sc);
  }
}

// out[c0 : c0 + 64] = sum_j p[j] v[j][c0 : c0 + 64] * inv: four keys in flight, 16 accumulators.
void decode_pv(const DecodeHead& a, const float* p, int64_t c0, float inv, float* out) {
  __mmask16 m[4];
  for (int c = 0; c < 4; ++c) m[c] = mask16(a.Dv - c0 - 16 * c);
  __m512 acc[4][4];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  const float* v = a.v + c0;
  int64_t j = 0;
  for (; j + 4 <= a.kv_end; j += 4)
    for (int r = 0; r < 4; ++r) {
      const __m512 pj = _mm512_set1_ps(p[j + r]);
      const float* vr = v + (j + r) * a.sv;
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(pj, _mm512_maskz_loadu_ps(m[c], vr + 16 * c), acc[r][c]);
    }
  for (; j < a.kv_end; ++j) {
    const __m512 pj = _mm512_set1_ps(p[j]);
    const float* vr = v + j * a.sv;
    for (int c = 0; c < 4; ++c) acc[0][c] = _mm512_fmadd_ps(pj, _mm512_maskz_loadu_ps(m[c], vr + 16 * c), acc[0][c]);
  }
  const __m512 s = _mm512_set1_ps(inv);
  for (int c = 0; c < 4; ++c) {
    const __m512 t = _mm512_add_ps(_mm512_add_ps(acc[0][c], acc[1][c]), _mm512_add_ps(acc[2][c], acc[3][c]));
    if (m[c]) _mm512_mask_storeu_ps(out + c0 + 16 * c, m[c], _mm512_mul_ps(t, s));
  }
}

}  // namespace

void decode_head(const DecodeHead& a, float* scores) {
  const int64_t L = a.kv_end;
  for (int64_t j0 = 0; j0 < L; j0 += 16) decode_scores(a, j0, std::min<int64_t>(16, L - j0), scores);
  for (int64_t g = 0; g < a.G; ++g) {
    float* s = scores + g * L;
    float* out = a.out + g * a.so;
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < L; j += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, mask16(L - j), s + j));
    const float m = _mm512_reduce_max_ps(mx);
    if (!(m > -std::numeric_limits<float>::infinity())) {  // fully masked (or no keys; NaN scores propagate below)
      if (m != m) {
        std::fill(out, out + a.Dv, m);
        a.lse[g] = m;
      } else {
        std::fill(out, out + a.Dv, 0.f);
        a.lse[g] = -std::numeric_limits<float>::infinity();
      }
      continue;
    }
    __m512 sum = _mm512_setzero_ps();
    const __m512 mv = _mm512_set1_ps(m);
    for (int64_t j = 0; j < L; j += 16) {
      const __mmask16 jm = mask16(L - j);
      const __m512 e = avx512::exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(jm, s + j), mv));
      _mm512_mask_storeu_ps(s + j, jm, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(jm, e));
    }
    const float l = _mm512_reduce_add_ps(sum);
    a.lse[g] = m + std::log(l);
    for (int64_t c0 = 0; c0 < a.Dv; c0 += 64) decode_pv(a, s, c0, 1.f / l, out);
  }
}

#else

void fwd_block(const FwdBlock&, float*) {}
void decode_head(const DecodeHead&, float*) {}

#endif

}  // namespace attn512
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX512_ATTN
SEQFAST_TARGET_END
#endif
