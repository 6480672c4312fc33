// AVX-512 float32 flash-attention backward block. See attention_avx512.h (BwdBlock) for the layout; compiled for
// AVX-512 by the target pragma below, no ATen headers (same reason as sgemm.cpp).
#include "attention/attention_avx512.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "cpu/isa.h"
#include "cpu/sgemm.h"

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX512_ATTN_BWD 1
SEQFAST_TARGET_AVX512_BEGIN
#include <immintrin.h>

#include "attention/attention_avx512_tiles.h"
#include "cpu/avx512_math.h"
#endif

namespace seqfast {
namespace attn512 {

namespace {

// Workspace layout (floats, each part 64-byte aligned).
struct BwdWs {
  float *qT, *doT, *qp, *dop, *ST, *dST, *BT, *dqT, *lse, *delta;
  BwdWs(float* ws, int64_t D, int64_t Dv) {
    qT = ws;                                                  // scale Q^T packed (S^T operand)
    doT = qT + round16(sgemm::pack_size(D, kBq));              // dO^T packed (dP^T operand)
    qp = doT + round16(sgemm::pack_size(Dv, kBq));             // scale Q packed as a GEMM B operand (dK)
    dop = qp + round16(sgemm::pack_size(kBq, D));              // dO packed as a GEMM B operand (dV)
    ST = dop + round16(sgemm::pack_size(kBq, Dv));             // P^T of a key block [kBkBwd][kBq]
    dST = ST + kBkBwd * kBq;                                   // dS^T of a key block
    BT = dST + kBkBwd * kBq;                                   // the block's mask transposed (per-query masks)
    dqT = BT + kBkBwd * kBq;                                   // dQ^T accumulated [D][kBq]
    lse = dqT + D * kBq;                                       // per-query lse (+inf past mq)
    delta = lse + kBq;                                         // per-query delta (0 past mq)
  }
};
}  // namespace

int64_t bwd_workspace(int64_t D, int64_t Dv) {  // the sum of BwdWs's parts
  return round16(sgemm::pack_size(D, kBq)) + round16(sgemm::pack_size(Dv, kBq)) + round16(sgemm::pack_size(kBq, D)) +
         round16(sgemm::pack_size(kBq, Dv)) + 3 * kBkBwd * kBq + D * kBq + 2 * kBq;
}

#ifdef SEQFAST_HAVE_AVX512_ATTN_BWD

namespace {

using tiles::Segments;
static_assert(kBq == tiles::kLanes, "a backward query block is one lane block of the shared tiles");

// What the tiles of one key block share.
struct BlockCtx {
  const BwdBlock* a;
  const BwdWs* w;
  int64_t j0;        // first key of the block (absolute)
  int nv;            // live lane groups
  bool diag;
  const float* BT;   // transposed per-query mask of the block, or nullptr
};

// P^T rows for keys [j, j + MR) of the block: S = (scale Q) K^T + mask, P = exp(S - lse); lane groups v < V0 are
// causally masked for all MR keys (P = 0, not computed).
template <int MR, int V0>
inline void p_tile(const BlockCtx& c, int64_t j) {
  const BwdBlock& a = *c.a;
  __m512 acc[MR][4];
  tiles::dot_rows<MR, V0>(a.k + (c.j0 + j) * a.sk, a.sk, a.D, c.w->qT, acc);
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  for (int r = 0; r < MR; ++r) {
    const int64_t key = c.j0 + j + r;
    float* p = c.w->ST + (j + r) * kBq;
    for (int v = 0; v < V0; ++v) _mm512_store_ps(p + 16 * v, _mm512_setzero_ps());
    for (int v = V0; v < 4; ++v) {
      if (v >= c.nv) {
        _mm512_store_ps(p + 16 * v, _mm512_setzero_ps());
        continue;
      }
      const __m512 x = tiles::add_mask(acc[r][v], c.BT, j + r, v, a.bias, a.bsj, key);
      // x - lse: a fully masked row has lse = +inf, so P = 0 there (exp2 of -inf)
      __m512 e = _mm512_mul_ps(_mm512_sub_ps(x, _mm512_load_ps(c.w->lse + 16 * v)), log2e);
      if (c.diag) e = tiles::causal_mask(e, a.i0 + 16 * v, key);
      _mm512_store_ps(p + 16 * v, avx512::exp2_ps(e));
    }
  }
}

// dS^T rows for keys [j, j + MR): dP = dO V^T, dS = P (dP - delta); groups v < V0 have P = 0, so dS = 0.
template <int MR, int V0>
inline void ds_tile(const BlockCtx& c, int64_t j) {
  const BwdBlock& a = *c.a;
  __m512 acc[MR][4];
  tiles::dot_rows<MR, V0>(a.v + (c.j0 + j) * a.sv, a.sv, a.Dv, c.w->doT, acc);
  for (int r = 0; r < MR; ++r) {
    const float* p = c.w->ST + (j + r) * kBq;
    float* ds = c.w->dST + (j + r) * kBq;
    for (int v = 0; v < V0; ++v) _mm512_store_ps(ds + 16 * v, _mm512_setzero_ps());
    for (int v = V0; v < 4; ++v) {
      const __m512 d = _mm512_sub_ps(acc[r][v], _mm512_load_ps(c.w->delta + 16 * v));
      _mm512_store_ps(ds + 16 * v, _mm512_mul_ps(_mm512_load_ps(p + 16 * v), d));
    }
  }
}

template <int MR, int V0>
struct PTile {
  static void run(const BlockCtx& c, int64_t j) { p_tile<MR, V0>(c, j); }
};
template <int MR, int V0>
struct DsTile {
  static void run(const BlockCtx& c, int64_t j) { ds_tile<MR, V0>(c, j); }
};

}  // namespace

void bwd_block(const BwdBlock& a, float* ws) {
  const BwdWs w(ws, a.D, a.Dv);
  const int64_t mq = a.mq, D = a.D, Dv = a.Dv;
  const int nv = int((mq + 15) / 16);
  tiles::pack_lanes(D, mq, a.q, a.sq, a.scale, w.qT);
  tiles::pack_lanes(Dv, mq, a.dout, a.sdo, 1.f, w.doT);
  sgemm::pack_b(mq, D, a.q, a.sq, 1, w.qp);
  tiles::scale_in_place(w.qp, sgemm::pack_size(mq, D), a.scale);
  sgemm::pack_b(mq, Dv, a.dout, a.sdo, 1, w.dop);
  for (int64_t r = 0; r < kBq; ++r) {
    w.lse[r] = r < mq ? a.lse[r] : std::numeric_limits<float>::infinity();
    w.delta[r] = r < mq ? a.delta[r] : 0.f;
  }
  std::memset(w.dqT, 0, sizeof(float) * D * kBq);
  const bool per_query = a.bias && a.bsi != 0;

  for (int64_t j0 = a.j_lo; j0 < a.kv_end; j0 += kBkBwd) {
    const int64_t nk = std::min(kBkBwd, a.kv_end - j0);
    const bool diag = a.causal && j0 + nk - 1 > a.i0;
    const Segments sg(a.i0, j0, nk, diag);
    if (per_query) tiles::transpose_mask(a.bias + j0 * a.bsj, a.bsi, a.bsj, mq, nk, w.BT);
    const BlockCtx c{&a, &w, j0, nv, diag, per_query ? w.BT : nullptr};
    tiles::key_tiles<PTile>(c, sg, nk);
    // dV += P^T dO (P^T rows read in place as the GEMM's A, k = query)
    sgemm::gemm(nk, Dv, mq, w.ST, kBq, 1, w.dop, 1.f, a.dv + (j0 - a.j_lo) * Dv, Dv);
    tiles::key_tiles<DsTile>(c, sg, nk);
    // dQ^T += K_blk^T dS^T (scale applied once at the end); dK += dS^T (scale Q)
    const tiles::AccumCtx dq{w.dST, &sg, nk, a.k + j0 * a.sk, a.sk, w.dqT, nullptr};
    tiles::accum_block(dq, D);
    sgemm::gemm(nk, D, mq, w.dST, kBq, 1, w.qp, 1.f, a.dk + (j0 - a.j_lo) * D, D);
  }
  // dq += scale dQ^T^T, 16 x 16 blocks transposed in registers
  const __m512 sc = _mm512_set1_ps(a.scale);
  for (int v = 0; v < nv; ++v) {
    const int rws = int(std::min<int64_t>(16, mq - 16 * v));
    for (int64_t cb = 0; cb < D; cb += 16) {
      __m512 t[16];
      for (int64_t i = 0; i < 16; ++i)
        t[i] = cb + i < D ? _mm512_load_ps(w.dqT + (cb + i) * kBq + 16 * v) : _mm512_setzero_ps();
      avx512::transpose16(t);
      const __mmask16 cm = avx512::mask16(D - cb);
      for (int i = 0; i < rws; ++i) {
        float* o = a.dq + (16 * v + i) * a.sdq + cb;
        _mm512_mask_storeu_ps(o, cm, _mm512_fmadd_ps(t[i], sc, _mm512_maskz_loadu_ps(cm, o)));
      }
    }
  }
}

#else

void bwd_block(const BwdBlock&, float*) {}

#endif

}  // namespace attn512
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX512_ATTN_BWD
SEQFAST_TARGET_END
#endif
