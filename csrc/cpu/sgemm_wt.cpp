// The broadcast-form GEMM of sgemm_wt.h. This translation unit is compiled for AVX-512 by the target pragma below and
// includes no ATen headers (the rule of cpu/isa.h); callers check available().
#include "cpu/sgemm_wt.h"

#include "cpu/isa.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace seqfast {
namespace sgemm_wt {

// Compiled for the baseline ISA, outside the AVX-512 region: this is the guard.
bool available() { return sgemm::available(); }

bool streams_weights(int64_t weight_floats) {
  return weight_floats * int64_t(sizeof(float)) > int64_t(cpu::l3_cache_bytes()) / 2;
}

}  // namespace sgemm_wt
}  // namespace seqfast

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX512_GEMM_WT 1
SEQFAST_TARGET_AVX512_BEGIN
#include <immintrin.h>
#endif

namespace seqfast {
namespace sgemm_wt {

#ifdef SEQFAST_HAVE_AVX512_GEMM_WT
namespace {

constexpr int64_t kNR = sgemm::kNR;  // A rows per panel (32 floats per k)

// One line of each of the next tile's kRows weight rows (row r at pf + r * wr), from element k on, into L2.
inline __attribute__((always_inline)) void fetch_rows(const float* pf, int64_t wr, int64_t k) {
  for (int r = 0; r < kRows; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf + r * wr + k), _MM_HINT_T1);
}

// acc[r][v] += sum over k < K of W(r, k) * panel(k, 16 v .. 16 v + 15), for the MR W rows at w (W(r, k) =
// w[r * wr + k * wk]) and NV of the panel's two 16-row halves (NV = 1: a tail panel of at most 16 live rows).
// pf (k-contiguous rows only; may be null): the next tile's kRows rows, at the same k, fetched into L2 a line per
// row every 16 k.
template <int MR, int NV>
inline __attribute__((always_inline)) void accumulate(__m512 (&acc)[kRows][2], int64_t K, const float* w, int64_t wr,
                                                      int64_t wk, const float* bp, const float* pf = nullptr) {
  if (wk == 1) {  // a torch weight's k-contiguous rows: each row one stream
    const float* row[MR];
    for (int r = 0; r < MR; ++r) row[r] = w + r * wr;
    for (int64_t k = 0; k < K; ++k, bp += kNR) {
      if (pf && (k & 15) == 0) fetch_rows(pf, wr, k);
      const __m512 b0 = _mm512_load_ps(bp);
      const __m512 b1 = NV == 2 ? _mm512_load_ps(bp + 16) : b0;
      for (int r = 0; r < MR; ++r) {
        const __m512 wv = _mm512_set1_ps(row[r][k]);
        acc[r][0] = _mm512_fmadd_ps(wv, b0, acc[r][0]);
        if (NV == 2) acc[r][1] = _mm512_fmadd_ps(wv, b1, acc[r][1]);
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k, bp += kNR, w += wk) {
      const __m512 b0 = _mm512_load_ps(bp);
      const __m512 b1 = NV == 2 ? _mm512_load_ps(bp + 16) : b0;
      for (int r = 0; r < MR; ++r) {
        const __m512 wv = _mm512_set1_ps(w[r * wr]);
        acc[r][0] = _mm512_fmadd_ps(wv, b0, acc[r][0]);
        if (NV == 2) acc[r][1] = _mm512_fmadd_ps(wv, b1, acc[r][1]);
      }
    }
  }
}

// Rows [0, 8) of an 8 x 8 block in registers, transposed in place (lane j of row i <-> lane i of row j).
inline __attribute__((always_inline)) void transpose8(__m256 (&r)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]),
               t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]),
               t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]),
               t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// C[m, 0:MR] (+)= tile row m for m < mcount: the tile's MR W rows x 16 NV A rows, transposed through a small buffer
// in 8 x 8 blocks, plus bias[0:MR] (if not null) and beta C.
template <int MR, int NV>
inline __attribute__((always_inline)) void store(const __m512 (&acc)[kRows][2], int64_t mcount, float* c,
                                                 int64_t ldc, float beta, const float* bias) {
  alignas(64) float buf[kRows][kNR];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) _mm512_store_ps(buf[r] + 16 * v, r < MR ? acc[r][v] : _mm512_setzero_ps());
  const __mmask8 cols = __mmask8((1u << MR) - 1u);
  const __m256 b = bias ? _mm256_maskz_loadu_ps(cols, bias) : _mm256_setzero_ps();
  for (int64_t m0 = 0; m0 < mcount; m0 += 8) {
    __m256 t[8];
    for (int r = 0; r < 8; ++r) t[r] = _mm256_load_ps(buf[r] + m0);
    transpose8(t);
    const int64_t n = std::min<int64_t>(8, mcount - m0);
    for (int64_t i = 0; i < n; ++i) {
      float* d = c + (m0 + i) * ldc;
      __m256 v = _mm256_add_ps(t[i], b);
      if (beta != 0.f) v = _mm256_add_ps(v, _mm256_maskz_loadu_ps(cols, d));
      _mm256_mask_storeu_ps(d, cols, v);
    }
  }
}

// A k range of one operand: K steps of k from the packing ap (panel p at ap + p * pstride) and the weight w (at the
// range's first k).
struct Part {
  int64_t K = 0;
  const float* ap = nullptr;
  int64_t pstride = 0;
  const float* w = nullptr;
  int64_t wr = 0, wk = 0;
};

// The MR W rows from n (c and bias at column n) against the panels of A rows [m_begin, M) (m_begin a multiple of
// kNR), both parts summed. n_end: the end of this thread's W rows.
template <int MR>
void rows(int64_t m_begin, int64_t M, int64_t n, int64_t n_end, const Part& o1, const Part& o2, float beta, float* c,
          int64_t ldc, const float* bias) {
  const float* w1 = o1.K > 0 ? o1.w + n * o1.wr : nullptr;
  const float* w2 = o2.K > 0 ? o2.w + n * o2.wr : nullptr;
  for (int64_t m0 = m_begin; m0 < M; m0 += kNR) {
    const int64_t mcount = std::min(kNR, M - m0);
    __m512 acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const int64_t p = m0 / kNR;
    // both 16-row halves of a panel, or one for a tail panel of at most 16 live rows
    const auto panel = [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      // The first panel also fetches the next whole tile's W rows into L2, so that its first panel does not wait on
      // L3 or memory: the weights of the largest cells (LSTMCell H1024: 32 MB) do not stay in cache between calls.
      const bool pf = m0 == m_begin && n + 2 * kRows <= n_end;
      const float* ahead1 = pf && w1 ? w1 + kRows * o1.wr : nullptr;
      const float* ahead2 = pf && w2 ? w2 + kRows * o2.wr : nullptr;
      if (w1) accumulate<MR, NV>(acc, o1.K, w1, o1.wr, o1.wk, o1.ap + p * o1.pstride, ahead1);
      if (w2) accumulate<MR, NV>(acc, o2.K, w2, o2.wr, o2.wk, o2.ap + p * o2.pstride, ahead2);
      store<MR, NV>(acc, mcount, c + m0 * ldc + n, ldc, beta, bias ? bias + n : nullptr);
    };
    if (mcount > 16) panel(std::integral_constant<int, 2>());
    else panel(std::integral_constant<int, 1>());
  }
}

// tile(mr, n) over W rows [n0, n1): whole 8-row tiles, then the remainder; mr is std::integral_constant<int, MR>,
// so each tile height is a compile-time constant of the tile function.
template <class Tile>
inline void each_tile(int64_t n0, int64_t n1, const Tile& tile) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) tile(std::integral_constant<int, kRows>(), n);
  switch (n1 - n) {
    case 7: tile(std::integral_constant<int, 7>(), n); break;
    case 6: tile(std::integral_constant<int, 6>(), n); break;
    case 5: tile(std::integral_constant<int, 5>(), n); break;
    case 4: tile(std::integral_constant<int, 4>(), n); break;
    case 3: tile(std::integral_constant<int, 3>(), n); break;
    case 2: tile(std::integral_constant<int, 2>(), n); break;
    case 1: tile(std::integral_constant<int, 1>(), n); break;
    default: break;
  }
}

// W rows [n0, n1) against both parts, for A rows [m_begin, M).
void pass(int64_t M, int64_t n0, int64_t n1, const Part& o1, const Part& o2, float beta, float* c, int64_t ldc,
          const float* bias, int64_t m_begin = 0) {
  each_tile(n0, n1,
            [&](auto mr, int64_t n) { rows<decltype(mr)::value>(m_begin, M, n, n1, o1, o2, beta, c, ldc, bias); });
}

// The part of operand o over k [k0, k0 + kc).
inline Part part(const Operand& o, int64_t k0, int64_t kc) {
  return Part{kc, o.ap + k0 * kNR, o.K * kNR, o.w + k0 * o.wk, o.wr, o.wk};
}

// ---- The narrow form (A of at most 16 rows, k pairs interleaved; see sgemm_wt.h) ----

// W(r, k), W(r, k + 1) in every lane pair (n = 1: W(r, k), 0).
inline __attribute__((always_inline)) __m512 wpair(const float* w, int64_t wk, int n = 2) {
  __m128d g;
  if (wk == 1 && n == 2) {
    g = _mm_load_sd(reinterpret_cast<const double*>(w));
  } else {
    alignas(16) float t[4] = {w[0], n == 2 ? w[wk] : 0.f, 0.f, 0.f};
    g = _mm_castps_pd(_mm_load_ps(t));
  }
  return _mm512_castpd_ps(_mm512_broadcastsd_pd(g));
}

// acc[r][v] += W row r's k pairs against the packed vectors: NV = 2, v = the 8-row half of A; NV = 1, v = even / odd
// pair (two independent chains). pf (k-contiguous rows; may be null): the next tile's rows, fetched a line per row
// every 8 pairs.
template <int MR, int NV>
inline __attribute__((always_inline)) void accumulate_narrow(__m512 (&acc)[kRows][2], int64_t K, const float* w,
                                                             int64_t wr, int64_t wk, const float* ap,
                                                             const float* pf = nullptr) {
  const int64_t pairs = K / 2;
  int64_t g = 0;
  if constexpr (NV == 2) {
    for (; g < pairs; ++g, ap += 32) {
      if (pf && (g & 7) == 0) fetch_rows(pf, wr, 2 * g);
      const __m512 b0 = _mm512_load_ps(ap), b1 = _mm512_load_ps(ap + 16);
      for (int r = 0; r < MR; ++r) {
        const __m512 wv = wpair(w + r * wr + 2 * g * wk, wk);
        acc[r][0] = _mm512_fmadd_ps(wv, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(wv, b1, acc[r][1]);
      }
    }
    if (2 * g < K) {  // odd K: the last k alone (A holds 0 beside it)
      const __m512 b0 = _mm512_load_ps(ap), b1 = _mm512_load_ps(ap + 16);
      for (int r = 0; r < MR; ++r) {
        const __m512 wv = wpair(w + r * wr + 2 * g * wk, wk, 1);
        acc[r][0] = _mm512_fmadd_ps(wv, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(wv, b1, acc[r][1]);
      }
    }
  } else {
    for (; g + 2 <= pairs; g += 2, ap += 32) {
      if (pf && (g & 7) == 0) fetch_rows(pf, wr, 2 * g);
      const __m512 b0 = _mm512_load_ps(ap), b1 = _mm512_load_ps(ap + 16);
      for (int r = 0; r < MR; ++r) {
        const float* wp = w + r * wr + 2 * g * wk;
        acc[r][0] = _mm512_fmadd_ps(wpair(wp, wk), b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(wpair(wp + 2 * wk, wk), b1, acc[r][1]);
      }
    }
    for (; 2 * g < K; ++g, ap += 16) {  // an odd last pair, and a lone last k
      const __m512 b0 = _mm512_load_ps(ap);
      const int n = int(std::min<int64_t>(2, K - 2 * g));
      for (int r = 0; r < MR; ++r) acc[r][0] = _mm512_fmadd_ps(wpair(w + r * wr + 2 * g * wk, wk, n), b0, acc[r][0]);
    }
  }
}

// C[m, n .. n + MR) (+)= the tile's sums for m < M: lane pairs added, A row m at lane 2 (m % 8) of vector m / 8.
template <int MR, int NV>
void rows_narrow(int64_t M, int64_t n, int64_t n_end, const Operand& o1, const Operand& o2, float beta, float* c,
                 int64_t ldc,
                 const float* bias) {
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  // the next whole tile's rows (k-contiguous weights that do not stay in the L3 only: see streams_weights)
  const bool next = n + 2 * kRows <= n_end;
  const auto ahead = [&](const Operand& o) {
    return next && o.stream && o.wk == 1 ? o.w + (n + kRows) * o.wr : nullptr;
  };
  if (o1.K > 0) accumulate_narrow<MR, NV>(acc, o1.K, o1.w + n * o1.wr, o1.wr, o1.wk, o1.ap, ahead(o1));
  if (o2.K > 0) accumulate_narrow<MR, NV>(acc, o2.K, o2.w + n * o2.wr, o2.wr, o2.wk, o2.ap, ahead(o2));
  alignas(64) float buf[kRows][32];
  for (int r = 0; r < MR; ++r) {
    if constexpr (NV == 1) {
      const __m512 s = _mm512_add_ps(acc[r][0], acc[r][1]);
      _mm512_store_ps(buf[r], _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1)));
    } else {
      for (int v = 0; v < 2; ++v)
        _mm512_store_ps(buf[r] + 16 * v, _mm512_add_ps(acc[r][v], _mm512_permute_ps(acc[r][v], 0xB1)));
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    float* d = c + m * ldc + n;
    for (int r = 0; r < MR; ++r) {
      const float v = buf[r][2 * m] + (bias ? bias[n + r] : 0.f);
      d[r] = beta != 0.f ? d[r] + v : v;
    }
  }
}

template <int NV>
void pass_narrow(int64_t M, int64_t n0, int64_t n1, const Operand& o1, const Operand& o2, float beta, float* c,
                 int64_t ldc, const float* bias) {
  each_tile(n0, n1,
            [&](auto mr, int64_t n) { rows_narrow<decltype(mr)::value, NV>(M, n, n1, o1, o2, beta, c, ldc, bias); });
}

void pack_narrow(int64_t M, int64_t K, const float* a, int64_t lda, float* dst) {
  const int64_t rows = 8 * narrow_vectors(M);
  for (int64_t g = 0; g < (K + 1) / 2; ++g, dst += 2 * rows)
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t i = 0; i < 2; ++i) {
        const int64_t k = 2 * g + i;
        dst[2 * m + i] = m < M && k < K ? a[m * lda + k] : 0.f;
      }
}

}  // namespace

void pack(int64_t M, int64_t K, const float* a, int64_t lda, float* dst) {
  if (M <= kNarrowRows) return pack_narrow(M, K, a, lda, dst);
  sgemm::pack_b(K, M, a, 1, lda, dst);
}

void gemm(int64_t M, int64_t n0, int64_t n1, const Operand& o1, const Operand& o2, float beta, float* c, int64_t ldc,
          const float* bias) {
  if (M <= 0 || n1 <= n0) return;
  // the narrow form's packed A is small (16 rows at most): no k blocks
  if (M <= kNarrowRows) {
    if (narrow_vectors(M) == 2) return pass_narrow<2>(M, n0, n1, o1, o2, beta, c, ldc, bias);
    return pass_narrow<1>(M, n0, n1, o1, o2, beta, c, ldc, bias);
  }
  // Every W tile reads all of A's panels: while they fit in half of this core's L2 (cpu::l2_cache_bytes) both
  // operands run in one pass.
  const int64_t Mp = (M + kNR - 1) / kNR * kNR;
  const int64_t budget = int64_t(cpu::l2_cache_bytes()) / 2 / int64_t(sizeof(float));  // floats
  if (Mp * (o1.K + o2.K) <= budget) return pass(M, n0, n1, part(o1, 0, o1.K), part(o2, 0, o2.K), beta, c, ldc, bias);
  // Past that: groups of A rows whose panels over the whole k range fit (at least two panels), each W tile summing all
  // of k in registers and storing C once; else k blocks of all rows, each pass adding into C. Why groups: the k-block
  // passes re-read C (M x N, out of cache) at every tile store. Same process, with the W prefetch above, GFLOP/s k
  // blocks / groups, 2 threads: M 256 K 2048 N 1024 (RNNCell B256 H1024) 457 / 480, N 4096 (LSTMCell) 445 / 486,
  // M 256 K 1024 N 2048 461 / 490, M 128 K 2048 N 1024 487 / 495, M 256 K 1536 N 1536 491 / 507; 1 thread 1.02-1.14x.
  const int64_t group = budget / (kNR * (o1.K + o2.K)) * kNR;  // rows of A whose panels fit the budget
  if (group >= 2 * kNR) {
    for (int64_t m0 = 0; m0 < M; m0 += group)
      pass(std::min(M, m0 + group), n0, n1, part(o1, 0, o1.K), part(o2, 0, o2.K), beta, c, ldc, bias, m0);
    return;
  }
  const int64_t kc = std::max<int64_t>(64, budget / Mp / 16 * 16);
  bool first = true;
  for (const Operand* o : {&o1, &o2}) {
    for (int64_t k0 = 0; k0 < o->K; k0 += kc) {
      pass(M, n0, n1, part(*o, k0, std::min(kc, o->K - k0)), Part{}, first ? beta : 1.f, c, ldc, first ? bias : nullptr);
      first = false;
    }
  }
}

#else  // no x86 target regions: never called (available() is false)

void pack(int64_t, int64_t, const float*, int64_t, float*) {}
void gemm(int64_t, int64_t, int64_t, const Operand&, const Operand&, float, float*, int64_t, const float*) {}

#endif

}  // namespace sgemm_wt
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX512_GEMM_WT
SEQFAST_TARGET_END
#endif
