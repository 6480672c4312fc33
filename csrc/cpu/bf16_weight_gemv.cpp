// Small-batch float32 products with bfloat16 weights read in place. See bf16_weight_gemv.h for why.
// The kernels below are compiled for AVX2 + FMA by the target pragma and include no ATen headers (the rule of
// sgemm.cpp): callers check available().
#include "cpu/bf16_weight_gemv.h"

#include "cpu/isa.h"

#include <algorithm>
#include <cstring>

namespace seqfast {
namespace bf16w {

// Compiled for the baseline ISA, outside the AVX2 region: this is the guard.
bool available() {
#ifdef SEQFAST_X86_TARGETS
  return cpu::has_avx2_fma();
#else
  return false;
#endif
}

}  // namespace bf16w
}  // namespace seqfast

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_BF16W 1
SEQFAST_TARGET_AVX2_BEGIN
#include <immintrin.h>

#include "cpu/avx2_bf16.h"
#include "cpu/avx2_masks.h"
#include "cpu/avx2_reduce.h"
#endif

namespace seqfast {
namespace bf16w {

#ifdef SEQFAST_HAVE_BF16W
namespace {

using avx2::mask8;

inline __m256 load_w(const uint16_t* p) { return avx2::load_bf16(p); }
inline __m256 load_w(const uint16_t* p, int64_t n) { return avx2::load_bf16(p, n); }

// acc[r][b] += sum_k x[b][k] w[r * K + k].
template <int NB, int NR>
inline void dot(const float* const* x, const uint16_t* w, int64_t K, __m256 (&acc)[NR][NB]) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = _mm256_loadu_ps(x[b] + k);
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = load_w(w + r * K + k);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_fmadd_ps(wv, xv[b], acc[r][b]);
    }
  }
  if (k < K) {
    const int64_t n = K - k;
    const __m256i m = mask8(n);
    __m256 xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = _mm256_maskload_ps(x[b] + k, m);
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = load_w(w + r * K + k, n);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_fmadd_ps(wv, xv[b], acc[r][b]);
    }
  }
}

// y[b][j + r] (+)= the products of weight rows j .. j + NR - 1 with rows b < NB.
template <int NB, int NR>
inline void rows(const float* const* x1, const uint16_t* w1, int64_t K1, const float* const* x2, const uint16_t* w2,
                 int64_t K2, float* const* y, int64_t j, bool accumulate) {
  __m256 acc[NR][NB];
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  dot<NB, NR>(x1, w1 + j * K1, K1, acc);
  if (w2) dot<NB, NR>(x2, w2 + j * K2, K2, acc);
  if constexpr (NR == 8) {
    for (int b = 0; b < NB; ++b) {  // the eight sums of one row at once, one store
      __m256 s = avx2::reduce8(acc[0][b], acc[1][b], acc[2][b], acc[3][b], acc[4][b], acc[5][b], acc[6][b], acc[7][b]);
      if (accumulate) s = _mm256_add_ps(s, _mm256_loadu_ps(y[b] + j));
      _mm256_storeu_ps(y[b] + j, s);
    }
  } else {
    for (int r = 0; r < NR; ++r)
      for (int b = 0; b < NB; ++b) {
        const float s = avx2::hsum8(acc[r][b]);
        y[b][j + r] = accumulate ? y[b][j + r] + s : s;
      }
  }
}

template <int NB>
void gemv_nb(const float* const* x1, const uint16_t* w1, int64_t K1, const float* const* x2, const uint16_t* w2,
             int64_t K2, float* const* y, int64_t j0, int64_t j1, bool accumulate) {
  // as many weight rows at once as keep the accumulators, the rows of x and one weight vector in 16 registers
  constexpr int NR = NB == 1 ? 8 : (NB == 2 ? 4 : 2);
  int64_t j = j0;
  for (; j + NR <= j1; j += NR) rows<NB, NR>(x1, w1, K1, x2, w2, K2, y, j, accumulate);
  for (; j < j1; ++j) rows<NB, 1>(x1, w1, K1, x2, w2, K2, y, j, accumulate);
}

// y[b * K + k] += sum_{j in [j0, j1)} d[b * ldd + j] w[j * K + k] for b < NB: two weight rows per pass over y, which
// stays in L1 (the caller's rows are few).
template <int NB>
void gemv_t_nb(const float* d, int64_t ldd, const uint16_t* w, int64_t K, int64_t j0, int64_t j1, float* y) {
  const int64_t tail = K % 8, kv = K - tail;
  const __m256i m = mask8(tail);
  int64_t j = j0;
  for (; j + 2 <= j1; j += 2) {
    __m256 d0[NB], d1[NB];
    for (int b = 0; b < NB; ++b) {
      d0[b] = _mm256_set1_ps(d[b * ldd + j]);
      d1[b] = _mm256_set1_ps(d[b * ldd + j + 1]);
    }
    const uint16_t *wa = w + j * K, *wb = wa + K;
    for (int64_t k = 0; k < kv; k += 8) {
      const __m256 va = load_w(wa + k), vb = load_w(wb + k);
      for (int b = 0; b < NB; ++b) {
        float* yb = y + b * K + k;
        _mm256_storeu_ps(yb, _mm256_fmadd_ps(vb, d1[b], _mm256_fmadd_ps(va, d0[b], _mm256_loadu_ps(yb))));
      }
    }
    if (tail) {
      const __m256 va = load_w(wa + kv, tail), vb = load_w(wb + kv, tail);
      for (int b = 0; b < NB; ++b) {
        float* yb = y + b * K + kv;
        _mm256_maskstore_ps(yb, m, _mm256_fmadd_ps(vb, d1[b], _mm256_fmadd_ps(va, d0[b], _mm256_maskload_ps(yb, m))));
      }
    }
  }
  if (j < j1) {
    __m256 d0[NB];
    for (int b = 0; b < NB; ++b) d0[b] = _mm256_set1_ps(d[b * ldd + j]);
    const uint16_t* wa = w + j * K;
    for (int64_t k = 0; k < kv; k += 8) {
      const __m256 va = load_w(wa + k);
      for (int b = 0; b < NB; ++b) {
        float* yb = y + b * K + k;
        _mm256_storeu_ps(yb, _mm256_fmadd_ps(va, d0[b], _mm256_loadu_ps(yb)));
      }
    }
    if (tail) {
      const __m256 va = load_w(wa + kv, tail);
      for (int b = 0; b < NB; ++b) {
        float* yb = y + b * K + kv;
        _mm256_maskstore_ps(yb, m, _mm256_fmadd_ps(va, d0[b], _mm256_maskload_ps(yb, m)));
      }
    }
  }
}

}  // namespace

void gemv(int64_t nb, const float* const* x1, const uint16_t* w1, int64_t K1, const float* const* x2,
          const uint16_t* w2, int64_t K2, float* const* y, int64_t j0, int64_t j1, bool accumulate) {
  for (int64_t b0 = 0; b0 < nb; b0 += 4) {
    const float* const* xx2 = w2 ? x2 + b0 : nullptr;
    switch (std::min<int64_t>(4, nb - b0)) {
      case 1: gemv_nb<1>(x1 + b0, w1, K1, xx2, w2, K2, y + b0, j0, j1, accumulate); break;
      case 2: gemv_nb<2>(x1 + b0, w1, K1, xx2, w2, K2, y + b0, j0, j1, accumulate); break;
      case 3: gemv_nb<3>(x1 + b0, w1, K1, xx2, w2, K2, y + b0, j0, j1, accumulate); break;
      default: gemv_nb<4>(x1 + b0, w1, K1, xx2, w2, K2, y + b0, j0, j1, accumulate); break;
    }
  }
}

void gemv_t(int64_t nb, const float* d, int64_t ldd, const uint16_t* w, int64_t K, int64_t j0, int64_t j1, float* y,
            bool accumulate) {
  if (!accumulate) std::fill(y, y + nb * K, 0.0f);
  for (int64_t b0 = 0; b0 < nb; b0 += 4) {
    const float* db = d + b0 * ldd;
    float* yb = y + b0 * K;
    switch (std::min<int64_t>(4, nb - b0)) {
      case 1: gemv_t_nb<1>(db, ldd, w, K, j0, j1, yb); break;
      case 2: gemv_t_nb<2>(db, ldd, w, K, j0, j1, yb); break;
      case 3: gemv_t_nb<3>(db, ldd, w, K, j0, j1, yb); break;
      default: gemv_t_nb<4>(db, ldd, w, K, j0, j1, yb); break;
    }
  }
}

void outer(int64_t nb, const float* d, int64_t ldd, const float* x, int64_t K, int64_t j0, int64_t j1, uint16_t* dw) {
  if (nb <= 0) {  // no rows: a zero gradient
    std::fill(dw + j0 * K, dw + j1 * K, uint16_t(0));
    return;
  }
  const int64_t tail = K % 8, kv = K - tail;
  const __m256i m = mask8(tail);
  float dj[16];
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t b = 0; b < nb; ++b) dj[b] = d[b * ldd + j];
    uint16_t* out = dw + j * K;
    // the sums start from the first row's product, not from zero: a lone -0 product stays -0, as in a GEMM
    for (int64_t k = 0; k < kv; k += 8) {
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(x + k), _mm256_set1_ps(dj[0]));
      for (int64_t b = 1; b < nb; ++b) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + b * K + k), _mm256_set1_ps(dj[b]), acc);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), avx2::to_bf16(acc));
    }
    if (tail) {
      __m256 acc = _mm256_mul_ps(_mm256_maskload_ps(x + kv, m), _mm256_set1_ps(dj[0]));
      for (int64_t b = 1; b < nb; ++b)
        acc = _mm256_fmadd_ps(_mm256_maskload_ps(x + b * K + kv, m), _mm256_set1_ps(dj[b]), acc);
      alignas(16) uint16_t t[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), avx2::to_bf16(acc));
      std::memcpy(out + kv, t, size_t(tail) * sizeof(uint16_t));
    }
  }
}

#else  // no x86 target regions: never available

void gemv(int64_t, const float* const*, const uint16_t*, int64_t, const float* const*, const uint16_t*, int64_t,
          float* const*, int64_t, int64_t, bool) {}
void gemv_t(int64_t, const float*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*, bool) {}
void outer(int64_t, const float*, int64_t, const float*, int64_t, int64_t, int64_t, uint16_t*) {}

#endif

}  // namespace bf16w
}  // namespace seqfast

#ifdef SEQFAST_HAVE_BF16W
SEQFAST_TARGET_END
#endif
