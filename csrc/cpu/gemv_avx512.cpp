// AVX-512 small-batch GEMV; see gemv_avx512.h. Compiled for AVX-512 by the target pragma below; no ATen headers here
// (the rule of cpu/isa.h).
#include "cpu/gemv_avx512.h"

#include <algorithm>

#include "cpu/config.h"
#include "cpu/isa.h"

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX512_GEMV 1
SEQFAST_TARGET_AVX512_BEGIN
#include <immintrin.h>

#include "cpu/avx512_math.h"
#endif

namespace seqfast {
namespace gemv512 {

#ifdef SEQFAST_HAVE_AVX512_GEMV
namespace {

using avx512::mask16;

// acc[(u * NB + b) * NR + r] += sum over k of x[b][k] w[r][k], k < K in steps of 16 U, vector u of each step into
// its own accumulators (rows past nr are not read).
template <int NB, int NR, int U>
inline __attribute__((always_inline)) void dot(const float* const* x, const float* w, int64_t K, int nr,
                                               __m512 (&acc)[16]) {
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U)
    for (int u = 0; u < U; ++u) {
      __m512 xv[NB];
      for (int b = 0; b < NB; ++b) xv[b] = _mm512_loadu_ps(x[b] + k + 16 * u);
      for (int r = 0; r < NR; ++r) {
        if (r >= nr) break;
        const __m512 wv = _mm512_loadu_ps(w + r * K + k + 16 * u);
        for (int b = 0; b < NB; ++b) acc[(u * NB + b) * NR + r] = _mm512_fmadd_ps(wv, xv[b], acc[(u * NB + b) * NR + r]);
      }
    }
  for (; k < K; k += 16) {
    const __mmask16 m = mask16(K - k);
    __m512 xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = _mm512_maskz_loadu_ps(m, x[b] + k);
    for (int r = 0; r < NR; ++r) {
      if (r >= nr) break;
      const __m512 wv = _mm512_maskz_loadu_ps(m, w + r * K + k);
      for (int b = 0; b < NB; ++b) acc[b * NR + r] = _mm512_fmadd_ps(wv, xv[b], acc[b * NR + r]);
    }
  }
}

// Rows [j, j + nr) (nr <= NR = 16 / (NB U)) for NB batch rows (the first nbv of them real; the rest repeat row 0
// and are not stored).
template <int NB, int U>
inline __attribute__((always_inline)) void rows(const float* const* x1, const float* w1, int64_t K1,
                                                const float* const* x2, const float* w2, int64_t K2, float* const* y,
                                                int nbv, int64_t j, int nr, bool accumulate) {
  constexpr int NR = 16 / (NB * U);
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  dot<NB, NR, U>(x1, w1 + j * K1, K1, nr, acc);
  if (w2) dot<NB, NR, U>(x2, w2 + j * K2, K2, nr, acc);
  __m512 s = avx512::reduce16(acc);  // lane (u NB + b) NR + r: part u of y[b][j + r]
  if constexpr (U == 2) s = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, _MM_SHUFFLE(1, 0, 3, 2)));
  const __mmask16 m = mask16(nr);
  for (int b = 0; b < nbv; ++b) {
    // lanes [b NR, b NR + nr) to y[b][j ...]
    __m512 v = b == 0 ? s : _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_set1_epi32(b * NR),
                                                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                                       10, 11, 12, 13, 14, 15)),
                                                  s);
    if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, y[b] + j));
    _mm512_mask_storeu_ps(y[b] + j, m, v);
  }
}

template <int NB, int U>
void gemv_nb(const float* const* x1, const float* w1, int64_t K1, const float* const* x2, const float* w2, int64_t K2,
             float* const* y, int nbv, int64_t j0, int64_t j1, bool accumulate) {
  constexpr int NR = 16 / (NB * U);
  int64_t j = j0;
  for (; j + NR <= j1; j += NR) rows<NB, U>(x1, w1, K1, x2, w2, K2, y, nbv, j, NR, accumulate);
  if (j < j1) rows<NB, U>(x1, w1, K1, x2, w2, K2, y, nbv, j, int(j1 - j), accumulate);
}

}  // namespace

void gemv(int64_t nb, const float* const* x1, const float* w1, int64_t K1, const float* const* x2, const float* w2,
          int64_t K2, float* const* y, int64_t j0, int64_t j1, bool accumulate) {
  for (int64_t b0 = 0; b0 < nb; b0 += 4) {
    const int m = int(std::min<int64_t>(4, nb - b0));
    const float* xa[4];
    const float* xb[4];
    for (int b = 0; b < 4; ++b) {  // batch rows past m repeat the first (read, never stored)
      xa[b] = x1[b0 + (b < m ? b : 0)];
      xb[b] = w2 ? x2[b0 + (b < m ? b : 0)] : nullptr;
    }
    float* const* yb = y + b0;
    if (m == 1) gemv_nb<1, 2>(xa, w1, K1, xb, w2, K2, yb, 1, j0, j1, accumulate);
    else if (m == 2) gemv_nb<2, 2>(xa, w1, K1, xb, w2, K2, yb, 2, j0, j1, accumulate);
    else gemv_nb<4, 1>(xa, w1, K1, xb, w2, K2, yb, m, j0, j1, accumulate);
  }
}

#else

void gemv(int64_t, const float* const*, const float*, int64_t, const float* const*, const float*, int64_t,
          float* const*, int64_t, int64_t, bool) {}

#endif

}  // namespace gemv512
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX512_GEMV
SEQFAST_TARGET_END
#endif

namespace seqfast {
namespace gemv512 {

bool available() { return cpu::has_avx512() && cpu::config().own_gemm && cpu::config().avx512_gemv; }

}  // namespace gemv512
}  // namespace seqfast
