// Register tiles shared by the AVX-512 attention forward (attention_avx512.cpp) and backward
// (attention_avx512_bwd.cpp). A block of 64 queries lives along the vector lanes: four zmm registers of 16 queries
// (lane groups). Include only inside the `#pragma GCC target("avx512f,...")` region, after <immintrin.h>.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/avx512_math.h"
#include "cpu/sgemm.h"

namespace seqfast {
namespace attn512 {
namespace tiles {

constexpr int64_t kLanes = 64;  // queries per block, = 2 packed 32-query panels
static_assert(kLanes == 2 * sgemm::kNR, "a query block is exactly two packed panels");

// Causal structure of one key block [j0, j0 + nk) against queries i0 .. i0 + 63, in block-relative keys: keys >=
// seg[w] are masked for the queries of lane groups v < w (query i sees keys <= i), so loops skip those groups there.
// seg[1..3] = nk off the diagonal (every group live).
struct Segments {
  int64_t seg[4];
  Segments(int64_t i0, int64_t j0, int64_t nk, bool diag) {
    seg[0] = 0;
    for (int w = 1; w < 4; ++w) seg[w] = diag ? std::min(nk, std::max<int64_t>(0, i0 + 16 * w - j0)) : nk;
  }
  // lane groups masked for every key >= j
  int dead(int64_t j) const { return (j >= seg[1]) + (j >= seg[2]) + (j >= seg[3]); }
};

// acc[r][q] = sum_d x[r * sx + d] * pT[d][16q .. 16q + 15] for lane groups q >= V0: MR rows (keys) read in place as
// the broadcast operand against a packed 64-query operand pT (sgemm::pack_b layout, two panels of D rows x 32).
// MR = 6 gives 24 accumulators, FMA-bound.
template <int MR, int V0>
inline void dot_rows(const float* x, int64_t sx, int64_t D, const float* pT, __m512 (&acc)[MR][4]) {
  for (int r = 0; r < MR; ++r)
    for (int q = V0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 w[4];
    for (int q = V0; q < 4; ++q) w[q] = _mm512_load_ps(pT + (q / 2) * D * sgemm::kNR + d * sgemm::kNR + 16 * (q % 2));
    for (int r = 0; r < MR; ++r) {
      const __m512 kv = _mm512_set1_ps(x[r * sx + d]);
      for (int q = V0; q < 4; ++q) acc[r][q] = _mm512_fmadd_ps(kv, w[q], acc[r][q]);
    }
  }
}

// Runs Tile<MR, V0>::run(c, j) over the nk keys of a block in 6-key tiles: each full tile skips the lane groups
// masked for its first key (a group masked for key j is masked for every later key); the tail tile computes every
// group and leaves the masking to the tile's epilogue.
template <template <int, int> class Tile, class Ctx>
inline void key_tiles(const Ctx& c, const Segments& sg, int64_t nk) {
  int64_t j = 0;
  for (; j + 6 <= nk; j += 6) {
    switch (sg.dead(j)) {
      case 0: Tile<6, 0>::run(c, j); break;
      case 1: Tile<6, 1>::run(c, j); break;
      case 2: Tile<6, 2>::run(c, j); break;
      default: Tile<6, 3>::run(c, j); break;
    }
  }
  switch (nk - j) {
    case 5: Tile<5, 0>::run(c, j); break;
    case 4: Tile<4, 0>::run(c, j); break;
    case 3: Tile<3, 0>::run(c, j); break;
    case 2: Tile<2, 0>::run(c, j); break;
    case 1: Tile<1, 0>::run(c, j); break;
    default: break;
  }
}

// x + the additive mask of 16 scores of lane group v, block-relative key jb: from the block's transposed mask BT
// when the mask varies by query, else bias[key * bsj] (the same for every query), else nothing.
inline __m512 add_mask(__m512 x, const float* BT, int64_t jb, int v, const float* bias, int64_t bsj, int64_t key) {
  if (BT) return _mm512_add_ps(x, _mm512_load_ps(BT + jb * kLanes + 16 * v));
  if (bias) return _mm512_add_ps(x, _mm512_set1_ps(bias[key * bsj]));
  return x;
}

// x with -inf where query q0 + lane is before the key (causal: query i sees keys <= i).
inline __m512 causal_mask(__m512 x, int64_t q0, int64_t key) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i qi = _mm512_add_epi32(lane, _mm512_set1_epi32(int(q0)));
  const __mmask16 masked = _mm512_cmplt_epi32_mask(qi, _mm512_set1_epi32(int(key)));
  return _mm512_mask_mov_ps(x, masked, _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
}

// What the transposed accumulation of one key block reads and writes.
struct AccumCtx {
  const float* WT;      // block weights transposed: key j's 64 query weights at WT + j * kLanes
  const Segments* sg;
  int64_t nk;
  const float* y;       // row of the block's first key; key j at y + j * sy (ncols floats used)
  int64_t sy;
  float* outT;          // column c of the result at outT + c * kLanes (64 queries)
  const float* alpha;   // per-query factor applied to outT first, or nullptr
};

// outT[c0 .. c0 + NC) = alpha * outT + Y[:, c0 .. c0 + NC)^T W^T, i.e. out += W Y accumulated transposed (result
// columns x queries): W^T rows are the vector operand, Y is read in place as the broadcast operand (nothing packed),
// and a per-query rescale is one multiply per register. Keys past seg[w] skip lane groups v < w (W is 0 there).
template <int NC>
inline void accum_tile(const AccumCtx& c, int64_t c0) {
  __m512 acc[NC][4];
  float* o = c.outT + c0 * kLanes;
  for (int r = 0; r < NC; ++r)
    for (int q = 0; q < 4; ++q) {
      acc[r][q] = _mm512_load_ps(o + r * kLanes + 16 * q);
      if (c.alpha) acc[r][q] = _mm512_mul_ps(acc[r][q], _mm512_load_ps(c.alpha + 16 * q));
    }
  const float* yc = c.y + c0;
  auto run = [&](auto v0, int64_t jb, int64_t je) {
    constexpr int V0 = decltype(v0)::value;
    for (int64_t j = jb; j < je; ++j) {
      const float* w = c.WT + j * kLanes;
      __m512 wj[4];
      for (int q = V0; q < 4; ++q) wj[q] = _mm512_load_ps(w + 16 * q);
      const float* yj = yc + j * c.sy;
      for (int r = 0; r < NC; ++r) {
        const __m512 b = _mm512_set1_ps(yj[r]);
        for (int q = V0; q < 4; ++q) acc[r][q] = _mm512_fmadd_ps(b, wj[q], acc[r][q]);
      }
    }
  };
  const int64_t* seg = c.sg->seg;
  run(std::integral_constant<int, 0>{}, 0, seg[1]);
  run(std::integral_constant<int, 1>{}, seg[1], seg[2]);
  run(std::integral_constant<int, 2>{}, seg[2], seg[3]);
  run(std::integral_constant<int, 3>{}, seg[3], c.nk);
  for (int r = 0; r < NC; ++r)
    for (int q = 0; q < 4; ++q) _mm512_store_ps(o + r * kLanes + 16 * q, acc[r][q]);
}

// accum_tile over all ncols columns: 6-column tiles (6 x 4 accumulators), then the remainder.
inline void accum_block(const AccumCtx& c, int64_t ncols) {
  int64_t c0 = 0;
  for (; c0 + 6 <= ncols; c0 += 6) accum_tile<6>(c, c0);
  switch (ncols - c0) {
    case 5: accum_tile<5>(c, c0); break;
    case 4: accum_tile<4>(c, c0); break;
    case 3: accum_tile<3>(c, c0); break;
    case 2: accum_tile<2>(c, c0); break;
    case 1: accum_tile<1>(c, c0); break;
    default: break;
  }
}

// p[0 .. n) *= s (n a multiple of 16, p 64-byte aligned).
inline void scale_in_place(float* p, int64_t n, float s) {
  if (s == 1.f) return;
  const __m512 m = _mm512_set1_ps(s);
  for (int64_t i = 0; i < n; i += 16) _mm512_store_ps(p + i, _mm512_mul_ps(_mm512_load_ps(p + i), m));
}

// The 64-lane operand of a query block: B(d, i) = mul * src[i * s + d] for d < K, i < mq, packed as two 32-query
// panels (sgemm::pack_b layout), zero past mq.
inline void pack_lanes(int64_t K, int64_t mq, const float* src, int64_t s, float mul, float* dst) {
  sgemm::pack_b(K, mq, src, 1, s, dst);
  if (mq <= sgemm::kNR) std::memset(dst + K * sgemm::kNR, 0, sizeof(float) * K * sgemm::kNR);
  scale_in_place(dst, K * kLanes, mul);
}

// BT[j][r] = mask(r, j) = b[r * bsi + j * bsj] for nk keys and the block's mq queries (0 for rows past mq): a mask
// that varies by query in the transposed layout of the score block, so the score epilogue adds it with one aligned
// load instead of a 16-way strided gather per key.
inline void transpose_mask(const float* b, int64_t bsi, int64_t bsj, int64_t mq, int64_t nk, float* BT) {
  for (int64_t v = 0; v < kLanes / 16; ++v) {
    const int64_t rows = std::min<int64_t>(16, mq - 16 * v);
    for (int64_t jb = 0; jb < nk; jb += 16) {
      const int64_t nj = std::min<int64_t>(16, nk - jb);
      if (bsj == 1) {
        __m512 t[16];
        for (int64_t i = 0; i < 16; ++i)
          t[i] = i < rows ? _mm512_maskz_loadu_ps(avx512::mask16(nj), b + (16 * v + i) * bsi + jb)
                          : _mm512_setzero_ps();
        avx512::transpose16(t);
        for (int64_t k = 0; k < nj; ++k) _mm512_store_ps(BT + (jb + k) * kLanes + 16 * v, t[k]);
      } else {
        for (int64_t k = 0; k < nj; ++k)
          for (int64_t i = 0; i < 16; ++i)
            BT[(jb + k) * kLanes + 16 * v + i] = i < rows ? b[(16 * v + i) * bsi + (jb + k) * bsj] : 0.f;
      }
    }
  }
}

}  // namespace tiles
}  // namespace attn512
}  // namespace seqfast
