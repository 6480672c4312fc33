// AVX-512 float32 GEMM: C = beta C + A @ B (+ bias), B pre-packed into 32-column panels. See sgemm.h for why.
//
// Blocking (tuned on a 2-core Zen4 machine):
//   register tile 8 rows x 32 columns = 16 zmm accumulators, 2 B loads + 8 broadcasts per k step;
//   KC = 512 rows of a panel (64 KB) per pass, MC = 64 rows of A per pass (A block stays in L2 while the panels of B
//   stream through it; the weight panels of an RNN step are read once per step from L3).
// This translation unit is compiled for AVX-512 by the target pragma below and includes no ATen headers, so no
// AVX-512 instantiation of a shared inline function can leak into default-ISA code; callers check available().
#include "cpu/sgemm.h"

#include "cpu/config.h"
#include "cpu/isa.h"

#include <algorithm>
#include <cstring>
#include <omp.h>

namespace seqfast {
namespace sgemm {

// Compiled for the baseline ISA, outside the AVX-512 region: this is the guard.
bool available() { return cpu::has_avx512() && cpu::config().own_gemm; }

}  // namespace sgemm
}  // namespace seqfast

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX512_GEMM 1
SEQFAST_TARGET_AVX512_BEGIN
#include <immintrin.h>

#include "cpu/avx512_math.h"
#endif

namespace seqfast {
namespace sgemm {

#ifdef SEQFAST_HAVE_AVX512_GEMM
namespace {

constexpr int64_t kMR = 8;
constexpr int64_t kKC = 512;
constexpr int64_t kMC = 64;

enum Init { kZero = 0, kLoad = 1, kBias = 2 };

// One MR x 32 tile of C over kc steps of k. bp points at row k0 of a packed panel (32 floats per k).
template <int MR>
inline __attribute__((always_inline)) void tile(int64_t kc, const float* a, int64_t ar, int64_t ak,
                                                const float* bp, float* c, int64_t ldc, int init, __mmask16 m0,
                                                __mmask16 m1, const float* bias) {
  // A tile that adds into C (the second and later k blocks) starts with C loads; the next tile's rows of C (same
  // panel, the MR rows below) are fetched now, a whole tile ahead. Why: C of an input projection (M 1024, N 4096: 16
  // MB) is out of cache by the next k block, and each tile stalled on its 2 MR line misses. Same process, 2 threads,
  // M 1024 K 1024 N 4096: 447 against 407 GFLOP/s (1 thread 225 / 208); no change with one k block.
  if (init == kLoad)
    for (int r = 0; r < MR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(c + (MR + r) * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + (MR + r) * ldc + 16), _MM_HINT_T0);
    }
  __m512 acc0[MR], acc1[MR];
  if (init == kLoad) {
    for (int r = 0; r < MR; ++r) {
      acc0[r] = _mm512_maskz_loadu_ps(m0, c + r * ldc);
      acc1[r] = _mm512_maskz_loadu_ps(m1, c + r * ldc + 16);
    }
  } else if (init == kBias) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, bias), b1 = _mm512_maskz_loadu_ps(m1, bias + 16);
    for (int r = 0; r < MR; ++r) {
      acc0[r] = b0;
      acc1[r] = b1;
    }
  } else {
    for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);
    bp += kNR;
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * ar]);
      acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
    }
    a += ak;
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc0[r]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc1[r]);
  }
}

// Rows [0, m) (m < MR handled by smaller tiles) of one panel.
inline void panel_rows(int64_t m, int64_t kc, const float* a, int64_t ar, int64_t ak, const float* bp, float* c,
                       int64_t ldc, int init, __mmask16 m0, __mmask16 m1, const float* bias) {
  int64_t r = 0;
  for (; r + kMR <= m; r += kMR) tile<kMR>(kc, a + r * ar, ar, ak, bp, c + r * ldc, ldc, init, m0, m1, bias);
  const float* ar_ = a + r * ar;
  float* cr = c + r * ldc;
  switch (m - r) {
    case 7: tile<7>(kc, ar_, ar, ak, bp, cr, ldc, init, m0, m1, bias); break;
    case 6: tile<6>(kc, ar_, ar, ak, bp, cr, ldc, init, m0, m1, bias); break;
    case 5: tile<5>(kc, ar_, ar, ak, bp, cr, ldc, init, m0, m1, bias); break;
    case 4: tile<4>(kc, ar_, ar, ak, bp, cr, ldc, init, m0, m1, bias); break;
    case 3: tile<3>(kc, ar_, ar, ak, bp, cr, ldc, init, m0, m1, bias); break;
    case 2: tile<2>(kc, ar_, ar, ak, bp, cr, ldc, init, m0, m1, bias); break;
    case 1: tile<1>(kc, ar_, ar, ak, bp, cr, ldc, init, m0, m1, bias); break;
    default: break;
  }
}

using avx512::mask16;

// C = beta C (+ bias) when K == 0.
void scale_only(int64_t M, int64_t N, float beta, float* c, int64_t ldc, const float* bias) {
  if (beta != 0.f) return;
  for (int64_t r = 0; r < M; ++r) {
    if (bias) std::memcpy(c + r * ldc, bias, size_t(N) * sizeof(float));
    else std::memset(c + r * ldc, 0, size_t(N) * sizeof(float));
  }
}

}  // namespace

void pack_b(int64_t K, int64_t N, const float* src, int64_t sk, int64_t sj, float* dst) {
  const int64_t np = (N + kNR - 1) / kNR;
  for (int64_t p = 0; p < np; ++p) {
    const int64_t j0 = p * kNR, nj = std::min(kNR, N - j0);
    float* d = dst + p * K * kNR;
    if (sj == 1) {
      // Rows of B are contiguous: copy 32-float row segments.
      for (int64_t k = 0; k < K; ++k) {
        const float* s = src + k * sk + j0;
        _mm512_store_ps(d + k * kNR, _mm512_maskz_loadu_ps(mask16(nj), s));
        _mm512_store_ps(d + k * kNR + 16, _mm512_maskz_loadu_ps(mask16(nj - 16), s + 16));
      }
    } else if (sk != 1) {
      // General strides (not used by seqfast's callers today): element by element.
      for (int64_t k = 0; k < K; ++k)
        for (int64_t jj = 0; jj < kNR; ++jj) d[k * kNR + jj] = jj < nj ? src[k * sk + (j0 + jj) * sj] : 0.f;
    } else {
      // Transposed source (e.g. a torch weight [N, K] for B = W^T, or a Q block for Q^T): 16 x 16 blocks read as
      // 16 k-contiguous source rows, transposed in registers, stored as 16 panel rows.
      for (int64_t h = 0; h < 2; ++h) {
        const int64_t jn = std::min<int64_t>(16, nj - 16 * h);  // live source rows of this half (may be <= 0)
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
          const int64_t nk = std::min<int64_t>(16, K - k0);
          __m512 r[16];
          for (int64_t jj = 0; jj < 16; ++jj)
            r[jj] = jj < jn ? _mm512_maskz_loadu_ps(mask16(nk), src + (j0 + 16 * h + jj) * sj + k0)
                            : _mm512_setzero_ps();
          avx512::transpose16(r);
          for (int64_t kk = 0; kk < nk; ++kk) _mm512_store_ps(d + (k0 + kk) * kNR + 16 * h, r[kk]);
        }
      }
    }
  }
}

namespace {
// Copies the A block rows [0, mb) x k [0, kc) into MR-interleaved tiles: tile t at dst + t * kc * kMR, element
// (r, k) at k * kMR + r. The micro-kernel's broadcasts then walk one contiguous stream whatever A's strides
// (a transposed A, e.g. dgates^T in a weight gradient, otherwise touches a new cache line at every k).
void pack_a(int64_t mb, int64_t kc, const float* a, int64_t ar, int64_t ak, float* dst) {
  // Row-contiguous A (ar == 1: a transposed operand such as dgates^T): per k, the whole tiles' rows are one
  // contiguous run of the source, copied into each tile's column k. Why not tile by tile: that walked the block's k
  // rows (a stride of a whole source row apart) once per tile, and the copy took a quarter of the product's time.
  // Same process, weight gradients dg^T x, GFLOP/s 2 threads before / after: [512, 128] over 8192 rows 299 / 370,
  // [1024, 256] over 2048 336 / 414, [1536, 512] over 8192 343 / 371, [4096, 1024] over 1024 408 / 444.
  const int64_t whole = ar == 1 ? mb / kMR : 0;
  for (int64_t k = 0; k < kc && whole > 0; ++k) {
    const float* src = a + k * ak;
    for (int64_t t = 0; t < whole; ++t) _mm256_store_ps(dst + t * kc * kMR + k * kMR, _mm256_loadu_ps(src + t * kMR));
  }
  for (int64_t t = whole; t * kMR < mb; ++t) {
    const int64_t r0 = t * kMR, nr = std::min(kMR, mb - r0);
    float* d = dst + t * kc * kMR;
    if (ar == 1 && nr == kMR) {
      for (int64_t k = 0; k < kc; ++k) _mm256_store_ps(d + k * kMR, _mm256_loadu_ps(a + r0 + k * ak));
    } else {
      for (int64_t r = 0; r < nr; ++r) {
        const float* src = a + (r0 + r) * ar;
        for (int64_t k = 0; k < kc; ++k) d[k * kMR + r] = src[k * ak];
      }
    }
  }
}
}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* bp, float beta,
          float* c, int64_t ldc, const float* bias, int64_t pstride) {
  if (M <= 0 || N <= 0) return;
  if (pstride <= 0) pstride = K * kNR;
  if (K <= 0) return scale_only(M, N, beta, c, ldc, bias);
  const int64_t np = (N + kNR - 1) / kNR;
  // Pack a transposed A (k-strided) when its block is reused by enough panels to pay for the copy (a weight
  // gradient's dgates^T gains; row-major A gains nothing, its rows are already k-contiguous streams).
  const bool pack = (np >= 4 || (np >= 2 && K >= 1024)) && ak != 1;
  alignas(64) static thread_local float abuf[kMC * kKC];
  for (int64_t m0 = 0; m0 < M; m0 += kMC) {
    const int64_t mb = std::min(kMC, M - m0);
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      const int init = (k0 > 0 || beta != 0.f) ? kLoad : (bias ? kBias : kZero);
      const float* ab = a + m0 * ar + k0 * ak;
      if (pack) pack_a(mb, kc, ab, ar, ak, abuf);
      for (int64_t p = 0; p < np; ++p) {
        const int64_t nj = std::min(kNR, N - p * kNR);
        const __mmask16 m0k = mask16(nj), m1k = mask16(nj - 16);
        const float* bpp = bp + p * pstride + k0 * kNR;
        float* cp = c + m0 * ldc + p * kNR;
        const float* bias_p = bias ? bias + p * kNR : nullptr;
        if (pack) {
          // packed tiles: A(r, k) of tile t at abuf + t * kc * MR + k * MR + r
          int64_t r = 0, t = 0;
          for (; r + kMR <= mb; r += kMR, ++t)
            tile<kMR>(kc, abuf + t * kc * kMR, 1, kMR, bpp, cp + r * ldc, ldc, init, m0k, m1k, bias_p);
          if (r < mb) panel_rows(mb - r, kc, abuf + t * kc * kMR, 1, kMR, bpp, cp + r * ldc, ldc, init, m0k, m1k, bias_p);
        } else {
          panel_rows(mb, kc, ab, ar, ak, bpp, cp, ldc, init, m0k, m1k, bias_p);
        }
      }
    }
  }
}

#else  // no AVX-512 build: never available (cpu::has_avx512() is false there)

void pack_b(int64_t, int64_t, const float*, int64_t, int64_t, float*) {}
void gemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, float, float*, int64_t,
          const float*, int64_t) {}

#endif

// Thread tid's share of np panels of an N-column B: first panel p0, columns [j0, j1) (may be empty).
inline void panel_share(int64_t np, int64_t N, int tid, int nth, int64_t& p0, int64_t& j0, int64_t& j1) {
  p0 = np * tid / nth;
  j0 = p0 * kNR;
  j1 = std::min(N, np * (tid + 1) / nth * kNR);
}

void gemm_parallel(int nt, int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* bp,
                   float beta, float* c, int64_t ldc, const float* bias) {
  const int64_t np = (N + kNR - 1) / kNR;
  if (nt <= 1 || omp_in_parallel() || M <= 0 || N <= 0) return gemm(M, N, K, a, ar, ak, bp, beta, c, ldc, bias);
  // Wide B: split its panels (each thread streams its own part of B). Narrow B (a weight gradient [4H, I] with a
  // small I, or dx with a small I): split the rows of A instead, so that no two threads pack or stream the same A
  // (with panel splits the LSTM B64 H128 backward lost to MKL).
  const bool by_rows = np < 4 * int64_t(nt) && M >= 16 * int64_t(nt);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    if (by_rows) {
      constexpr int64_t kAlign = 8;  // whole register tiles per thread
      const int64_t nblk = (M + kAlign - 1) / kAlign;
      const int64_t r0 = std::min(M, nblk * tid / nth * kAlign), r1 = std::min(M, nblk * (tid + 1) / nth * kAlign);
      if (r1 > r0) gemm(r1 - r0, N, K, a + r0 * ar, ar, ak, bp, beta, c + r0 * ldc, ldc, bias);
    } else {
      int64_t p0, j0, j1;
      panel_share(np, N, tid, nth, p0, j0, j1);
      if (j1 > j0)
        gemm(M, j1 - j0, K, a, ar, ak, bp + p0 * K * kNR, beta, c + j0, ldc, bias ? bias + j0 : nullptr);
    }
  }
}

void pack_b_parallel(int nt, int64_t K, int64_t N, const float* src, int64_t sk, int64_t sj, float* dst) {
  const int64_t np = (N + kNR - 1) / kNR;
  nt = int(std::min<int64_t>(nt, np));
  if (nt <= 1 || omp_in_parallel() || K * N < (int64_t(1) << 16)) return pack_b(K, N, src, sk, sj, dst);
#pragma omp parallel num_threads(nt)
  {
    int64_t p0, j0, j1;
    panel_share(np, N, omp_get_thread_num(), omp_get_num_threads(), p0, j0, j1);
    if (j1 > j0) pack_b(K, j1 - j0, src + j0 * sj, sk, sj, dst + p0 * K * kNR);
  }
}

}  // namespace sgemm
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX512_GEMM
SEQFAST_TARGET_END
#endif
