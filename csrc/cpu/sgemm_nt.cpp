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

// One product's operands: A [M, K] (row stride lda) and W [N, K] (row stride ldw), both k-contiguous.
struct Operand {
  int64_t K = 0;
  const float* a = nullptr;
  int64_t lda = 0;
  const float* w = nullptr;
  int64_t ldw = 0;
};

// The four horizontal sums of a, b, c, d as one vector [sum a, sum b, sum c, sum d].
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// s[r][j] += sum over k < K of a[r][k] * w[j][k] (lane-wise partial sums; NJ < 4 only at the right edge). PREFETCH:
// also ask for the next W tile's rows (the 4 rows after these) into L2, a cache line per row every 16 k, so that
// they arrive while this tile computes (see cols).
template <int MR, int NJ, bool PREFETCH = false>
inline __attribute__((always_inline)) void accumulate(__m256 (&s)[MR][kNJ], int64_t K, const float* a, int64_t lda,
                                                      const float* w, int64_t ldw) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if constexpr (PREFETCH) {
      if ((k & 15) == 0)
        for (int j = 0; j < kNJ; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(w + (kNJ + j) * ldw + k), _MM_HINT_T1);
    }
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
}

// C[0:MR, 0:NJ] of one tile over one or two operands (K2 = 0: one); NJ < 4 only at the right edge (stores masked to
// NJ columns there; whole-vector loads and stores otherwise, AVX2's masked store being slow on AMD cores).
template <int MR, int NJ, bool PREFETCH = false>
inline __attribute__((always_inline)) void tile(const Operand& o1, const Operand& o2, int64_t r0, int64_t j0,
                                                float beta, float* c, int64_t ldc, const float* bias) {
  __m256 s[MR][kNJ];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < kNJ; ++j) s[r][j] = _mm256_setzero_ps();
  accumulate<MR, NJ, PREFETCH>(s, o1.K, o1.a + r0 * o1.lda, o1.lda, o1.w + j0 * o1.ldw, o1.ldw);
  if (o2.K > 0) accumulate<MR, NJ, PREFETCH>(s, o2.K, o2.a + r0 * o2.lda, o2.lda, o2.w + j0 * o2.ldw, o2.ldw);
  const __m128i m = mask4(NJ);
  const __m128 b = !bias ? _mm_setzero_ps() : NJ == kNJ ? _mm_loadu_ps(bias + j0) : _mm_maskload_ps(bias + j0, m);
  for (int r = 0; r < MR; ++r) {
    float* cr = c + (r0 + r) * ldc + j0;
    __m128 v = _mm_add_ps(hsum4(s[r][0], s[r][1], s[r][2], s[r][3]), b);
    if constexpr (NJ == kNJ) {
      if (beta != 0.f) v = _mm_add_ps(v, _mm_loadu_ps(cr));
      _mm_storeu_ps(cr, v);
    } else {
      if (beta != 0.f) v = _mm_add_ps(v, _mm_maskload_ps(cr, m));
      _mm_maskstore_ps(cr, m, v);
    }
  }
}

// A rows [0, m) x W rows [j0, j0 + NJ) of one W tile. The first row tile of a full W tile prefetches the next W tile
// into L2. A tile is 4 short streams (one W row each, ldw apart) that the hardware's stream prefetchers pick up late
// and drop at every 4 KB page, so without it each tile's rows started cold from L3 or memory. Measured on the Zen 3
// EPYC (2 threads, W rotated through 16-96 MB so that it came from memory or L3, GFLOP/s without / with): M 8: 78 / 91
// (N 4096, K 1024), 56 / 72 (N 2048, K 512); M 2 at K 512 75 / 81; M 32: 134 / 138 (K 1024), 117 / 129 (K 512), 109 /
// 121 (K 256); M 64 137 / 139. A single row (a GEMV, which the hardware prefetchers keep at the memory's rate) read 56
// / 50 and 48 / 48: it does not prefetch.
template <int NJ>
inline void cols(int64_t m, const Operand& o1, const Operand& o2, int64_t j0, float beta, float* c, int64_t ldc,
                 const float* bias) {
  int64_t r = 0;
  if constexpr (NJ == kNJ) {
    if (m >= kMR) {
      tile<kMR, NJ, true>(o1, o2, 0, j0, beta, c, ldc, bias);
      r = kMR;
    } else if (m == 2) {
      tile<2, NJ, true>(o1, o2, 0, j0, beta, c, ldc, bias);
      r = 2;
    }
  }
  for (; r + kMR <= m; r += kMR) tile<kMR, NJ>(o1, o2, r, j0, beta, c, ldc, bias);
  if (m - r == 2) tile<2, NJ>(o1, o2, r, j0, beta, c, ldc, bias);
  else if (m - r == 1) tile<1, NJ>(o1, o2, r, j0, beta, c, ldc, bias);
}

// A rows per block at kc floats per row (a multiple of kMR).
inline int64_t a_rows(int64_t kc) {
  return std::max<int64_t>(kMR, a_block_bytes() / (kc * int64_t(sizeof(float))) / kMR * kMR);
}

// One pass: C[M, N] = beta C + A1 W1^T + A2 W2^T (+ bias) with both k ranges short enough for one pass (o2.K may be
// 0), A in row blocks that stay in L2.
void pass(int64_t M, int64_t N, const Operand& o1, const Operand& o2, float beta, float* c, int64_t ldc,
          const float* bias) {
  const int64_t mb = a_rows(o1.K + o2.K);
  for (int64_t m0 = 0; m0 < M; m0 += mb) {
    const int64_t m = std::min(mb, M - m0);
    const Operand b1{o1.K, o1.a + m0 * o1.lda, o1.lda, o1.w, o1.ldw};
    const Operand b2{o2.K, o2.K > 0 ? o2.a + m0 * o2.lda : nullptr, o2.lda, o2.w, o2.ldw};
    float* cb = c + m0 * ldc;
    int64_t j = 0;
    for (; j + kNJ <= N; j += kNJ) cols<kNJ>(m, b1, b2, j, beta, cb, ldc, bias);
    switch (N - j) {
      case 3: cols<3>(m, b1, b2, j, beta, cb, ldc, bias); break;
      case 2: cols<2>(m, b1, b2, j, beta, cb, ldc, bias); break;
      case 1: cols<1>(m, b1, b2, j, beta, cb, ldc, bias); break;
      default: break;
    }
  }
}

// C = beta C + A W^T (+ bias) for one operand of any K, in passes of at most kKC: the first applies beta and the
// bias, later passes add to what it stored.
void single(int64_t M, int64_t N, const Operand& o, float beta, float* c, int64_t ldc, const float* bias) {
  for (int64_t k0 = 0; k0 < o.K; k0 += kKC) {
    const Operand p{std::min(kKC, o.K - k0), o.a + k0, o.lda, o.w + k0, o.ldw};
    pass(M, N, p, Operand{}, k0 == 0 ? beta : 1.f, c, ldc, k0 == 0 ? bias : nullptr);
  }
}

}  // namespace

bool one_pass(int64_t M, int64_t K1, int64_t K2) { return K1 + K2 <= kKC && M <= a_rows(K1 + K2); }

void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* w, int64_t ldw, float beta,
          float* c, int64_t ldc, const float* bias) {
  gemm2(M, N, K, a, lda, w, ldw, 0, nullptr, 0, nullptr, 0, beta, c, ldc, bias);
}

void gemm2(int64_t M, int64_t N, int64_t K1, const float* a1, int64_t lda1, const float* w1, int64_t ldw1, int64_t K2,
           const float* a2, int64_t lda2, const float* w2, int64_t ldw2, float beta, float* c, int64_t ldc,
           const float* bias) {
  if (M <= 0 || N <= 0) return;
  if (K1 + K2 <= 0) {  // C = beta C + bias
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < N; ++j) c[r * ldc + j] = (beta != 0.f ? c[r * ldc + j] : 0.f) + (bias ? bias[j] : 0.f);
    return;
  }
  const Operand o1{K1, a1, lda1, w1, ldw1}, o2{K2, a2, lda2, w2, ldw2};
  // Both in one pass while their rows fit one pass and all M rows one A block: past that block the W tiles would be
  // streamed once per block (LSTMCell B64 H512: 0.93x of operand by operand, whose shorter rows fit one block).
  if (K1 > 0 && K2 > 0 && one_pass(M, K1, K2)) return pass(M, N, o1, o2, beta, c, ldc, bias);
  // one operand, or rows too long for one pass or too many for one block: operand by operand
  if (K1 > 0) single(M, N, o1, beta, c, ldc, bias);
  if (K2 > 0) single(M, N, o2, K1 > 0 ? 1.f : beta, c, ldc, K1 > 0 ? nullptr : bias);
}

#else  // no x86 target regions: never available

void gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float, float*, int64_t,
          const float*) {}
void gemm2(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, int64_t, const float*, int64_t,
           const float*, int64_t, float, float*, int64_t, const float*) {}
bool one_pass(int64_t, int64_t, int64_t) { return false; }

#endif

}  // namespace sgemm_nt
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX2_GEMM_NT
SEQFAST_TARGET_END
#endif
