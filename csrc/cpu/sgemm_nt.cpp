// AVX2 dot-product-form float32 GEMM: C = beta C + A @ W^T (+ bias). See sgemm_nt.h for why.
// This translation unit is compiled for AVX2 + FMA by the target pragma below and includes no ATen headers (the same
// rule as sgemm.cpp): callers check available().
#include "cpu/sgemm_nt.h"

#include "cpu/config.h"
#include "cpu/isa.h"

#include <algorithm>
#include <cstring>

namespace seqfast {
namespace sgemm_nt {

// Compiled for the baseline ISA, outside the AVX2 region: this is the guard.
bool available() { return cpu::has_avx2_fma() && cpu::config().own_gemm; }

}  // namespace sgemm_nt
}  // namespace seqfast

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX2_GEMM_NT 1
SEQFAST_TARGET_AVX2_BEGIN
#include <immintrin.h>

#include "cpu/avx2_masks.h"
#endif

namespace seqfast {
namespace sgemm_nt {

#ifdef SEQFAST_HAVE_AVX2_GEMM_NT
namespace {

constexpr int kMR = 3;                       // A rows per register tile
constexpr int kNJ = 4;                       // W rows per register tile (one 4-float store per A row)
// Loop order: a tile of 4 W rows stays in L1 while every 3-row tile of a block of A passes over it, and the A block
// (3/8 of this core's L2, cpu::l2_cache_bytes) stays in L2 across the W tiles. Per 8 k the 12 FMAs then load 4 W
// vectors from L1 and 3 A vectors from L2; the opposite order (A tile in L1, a W block streamed from L2 for each A
// tile: 4 L2 loads per 12 FMAs) ran 5-12% slower on the Zen 3 EPYC (single thread, M 9-258, K 256-512, N 768-2048).
inline int64_t a_block_bytes() { return cpu::l2_cache_bytes() * 3 / 8; }
// k per pass: 4 W rows of 1024 floats (16 KB) leave half of a 32 KB L1 to the A rows. Longer rows are summed in
// passes, each pass adding its partial dot products into C.
constexpr int64_t kKC = 1024;

using avx2::mask4;
using avx2::mask8;

// The four horizontal sums of a, b, c, d as one vector [sum a, sum b, sum c, sum d].
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// C[0:MR, 0:NJ] of one tile; NJ < 4 only at the right edge (stores masked to NJ columns).
template <int MR, int NJ>
inline __attribute__((always_inline)) void tile(int64_t K, const float* a, int64_t lda, const float* w, int64_t ldw,
                                                float beta, float* c, int64_t ldc, const float* bias) {
  __m256 s[MR][kNJ];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < kNJ; ++j) s[r][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 av[MR];
    for (int r = 0; r < MR; ++r) av[r] = _mm256_loadu_ps(a + r * lda + k);
    for (int j = 0; j < NJ; ++j) {
      const __m256 wv = _mm256_loadu_ps(w + j * ldw + k);
      for (int r = 0; r < MR; ++r) s[r][j] = _mm256_fmadd_ps(av[r], wv, s[r][j]);
    }
  }
  if (k < K) {
    const __m256i m = mask8(K - k);
    __m256 av[MR];
    for (int r = 0; r < MR; ++r) av[r] = _mm256_maskload_ps(a + r * lda + k, m);
    for (int j = 0; j < NJ; ++j) {
      const __m256 wv = _mm256_maskload_ps(w + j * ldw + k, m);
      for (int r = 0; r < MR; ++r) s[r][j] = _mm256_fmadd_ps(av[r], wv, s[r][j]);
    }
  }
  const __m128i m = mask4(NJ);
  const __m128 b = bias ? _mm_maskload_ps(bias, m) : _mm_setzero_ps();
  for (int r = 0; r < MR; ++r) {
    __m128 v = _mm_add_ps(hsum4(s[r][0], s[r][1], s[r][2], s[r][3]), b);
    if (beta != 0.f) v = _mm_add_ps(v, _mm_maskload_ps(c + r * ldc, m));
    _mm_maskstore_ps(c + r * ldc, m, v);
  }
}

// A rows [0, m) x W rows [0, NJ) of one W tile.
template <int NJ>
inline void cols(int64_t m, int64_t K, const float* a, int64_t lda, const float* w, int64_t ldw, float beta, float* c,
                 int64_t ldc, const float* bias) {
  int64_t r = 0;
  for (; r + kMR <= m; r += kMR) tile<kMR, NJ>(K, a + r * lda, lda, w, ldw, beta, c + r * ldc, ldc, bias);
  if (m - r == 2) tile<2, NJ>(K, a + r * lda, lda, w, ldw, beta, c + r * ldc, ldc, bias);
  else if (m - r == 1) tile<1, NJ>(K, a + r * lda, lda, w, ldw, beta, c + r * ldc, ldc, bias);
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* w, int64_t ldw, float beta,
          float* c, int64_t ldc, const float* bias) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // C = beta C + bias
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < N; ++j) c[r * ldc + j] = (beta != 0.f ? c[r * ldc + j] : 0.f) + (bias ? bias[j] : 0.f);
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    // the first pass applies beta and the bias; later passes add to what it stored
    const float pass_beta = k0 == 0 ? beta : 1.f;
    const float* pass_bias = k0 == 0 ? bias : nullptr;
    const int64_t mb = std::max<int64_t>(kMR, a_block_bytes() / (kc * int64_t(sizeof(float))) / kMR * kMR);
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
      const int64_t m = std::min(mb, M - m0);
      const float* ab = a + m0 * lda + k0;
      float* cb = c + m0 * ldc;
      int64_t j = 0;
      for (; j + kNJ <= N; j += kNJ)
        cols<kNJ>(m, kc, ab, lda, w + j * ldw + k0, ldw, pass_beta, cb + j, ldc, pass_bias ? pass_bias + j : nullptr);
      const float* wj = w + j * ldw + k0;
      const float* bj = pass_bias ? pass_bias + j : nullptr;
      switch (N - j) {
        case 3: cols<3>(m, kc, ab, lda, wj, ldw, pass_beta, cb + j, ldc, bj); break;
        case 2: cols<2>(m, kc, ab, lda, wj, ldw, pass_beta, cb + j, ldc, bj); break;
        case 1: cols<1>(m, kc, ab, lda, wj, ldw, pass_beta, cb + j, ldc, bj); break;
        default: break;
      }
    }
  }
}

#else  // no x86 target regions: never available

void gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float, float*, int64_t,
          const float*) {}

#endif

}  // namespace sgemm_nt
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX2_GEMM_NT
SEQFAST_TARGET_END
#endif
