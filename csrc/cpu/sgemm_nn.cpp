// AVX2 outer-product float32 GEMM with B read in place: C = beta C + A @ B. See sgemm_nn.h for why.
// Compiled for AVX2 + FMA by the target pragma below; no ATen headers (the rule of sgemm.cpp). Callers check
// sgemm_nt::available().
#include "cpu/sgemm_nn.h"

#include "cpu/isa.h"

#include <algorithm>

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX2_GEMM_NN 1
SEQFAST_TARGET_AVX2_BEGIN
#include <immintrin.h>

#include "cpu/avx2_masks.h"
#include "cpu/avx2_transpose.h"
#endif

namespace seqfast {
namespace sgemm_nn {

#ifdef SEQFAST_HAVE_AVX2_GEMM_NN
namespace {

constexpr int kMR = 6;         // rows of A per register tile
constexpr int64_t kNR = 16;    // columns of B per tile (two ymm)
constexpr int64_t kKC = 256;   // k per pass: a 256 x 16 slice of B (16 KB) stays in L1 across the row tiles
// Rows of A per pass: a block of 3/8 of this core's L2 (cpu::l2_cache_bytes; 512 KB: 192 rows x 256 k) stays there
// across the panels; whole 6-row tiles, at least one.
inline int64_t a_block_rows() {
  return std::max<int64_t>(kMR, cpu::l2_cache_bytes() * 3 / 8 / (kKC * 4) / kMR * kMR);
}

using avx2::mask8;

// C[0:MR, 0:16] (+)= A[0:MR, 0:kc] @ B[0:kc, 0:16]; FULL: all 16 columns live (else masked by m0 / m1).
// The accumulators are named variables (row r: x<r> columns 0-7, y<r> columns 8-15), not arrays: GCC kept the
// arrays of the 3-5 row tiles in memory and stored them to the stack on every k (8 stores per k at 5 rows), which
// held those tiles to 34-38 GFLOP/s against 99 for the 6-row tile on a Zen 3 core.
template <int MR, bool FULL>
inline __attribute__((always_inline)) void tile(int64_t kc, const float* a, int64_t ar, int64_t ak, const float* b,
                                                int64_t ldb, bool load, float* c, int64_t ldc, __m256i m0,
                                                __m256i m1) {
  const __m256 z = _mm256_setzero_ps();
  __m256 x0 = z, y0 = z, x1 = z, y1 = z, x2 = z, y2 = z, x3 = z, y3 = z, x4 = z, y4 = z, x5 = z, y5 = z;
#define SEQFAST_NN_LOAD(r)                                                                              \
  if constexpr (MR > r) {                                                                               \
    x##r = FULL ? _mm256_loadu_ps(c + r * ldc) : _mm256_maskload_ps(c + r * ldc, m0);                   \
    y##r = FULL ? _mm256_loadu_ps(c + r * ldc + 8) : _mm256_maskload_ps(c + r * ldc + 8, m1);           \
  }
#define SEQFAST_NN_FMA(r)                                                                               \
  if constexpr (MR > r) {                                                                               \
    const __m256 av = _mm256_broadcast_ss(a + r * ar);                                                  \
    x##r = _mm256_fmadd_ps(av, b0, x##r);                                                               \
    y##r = _mm256_fmadd_ps(av, b1, y##r);                                                               \
  }
#define SEQFAST_NN_STORE(r)                                                                             \
  if constexpr (MR > r) {                                                                               \
    if (FULL) {                                                                                         \
      _mm256_storeu_ps(c + r * ldc, x##r);                                                              \
      _mm256_storeu_ps(c + r * ldc + 8, y##r);                                                          \
    } else {                                                                                            \
      _mm256_maskstore_ps(c + r * ldc, m0, x##r);                                                       \
      _mm256_maskstore_ps(c + r * ldc + 8, m1, y##r);                                                   \
    }                                                                                                   \
  }
  if (load) {
    SEQFAST_NN_LOAD(0) SEQFAST_NN_LOAD(1) SEQFAST_NN_LOAD(2) SEQFAST_NN_LOAD(3) SEQFAST_NN_LOAD(4) SEQFAST_NN_LOAD(5)
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = FULL ? _mm256_loadu_ps(b) : _mm256_maskload_ps(b, m0);
    const __m256 b1 = FULL ? _mm256_loadu_ps(b + 8) : _mm256_maskload_ps(b + 8, m1);
    b += ldb;
    SEQFAST_NN_FMA(0) SEQFAST_NN_FMA(1) SEQFAST_NN_FMA(2) SEQFAST_NN_FMA(3) SEQFAST_NN_FMA(4) SEQFAST_NN_FMA(5)
    a += ak;
  }
  SEQFAST_NN_STORE(0) SEQFAST_NN_STORE(1) SEQFAST_NN_STORE(2) SEQFAST_NN_STORE(3) SEQFAST_NN_STORE(4)
  SEQFAST_NN_STORE(5)
#undef SEQFAST_NN_LOAD
#undef SEQFAST_NN_FMA
#undef SEQFAST_NN_STORE
}

// Every row of A against one 16-column panel (nj live columns) for k in [0, kc).
template <bool FULL>
void panel(int64_t M, int64_t kc, const float* a, int64_t ar, int64_t ak, const float* b, int64_t ldb, bool load,
           float* c, int64_t ldc, int64_t nj) {
  const __m256i m0 = mask8(nj), m1 = mask8(nj - 8);
  int64_t r = 0;
  for (; r + kMR <= M; r += kMR) tile<kMR, FULL>(kc, a + r * ar, ar, ak, b, ldb, load, c + r * ldc, ldc, m0, m1);
  const float* ar_ = a + r * ar;
  float* cr = c + r * ldc;
  switch (M - r) {
    case 5: tile<5, FULL>(kc, ar_, ar, ak, b, ldb, load, cr, ldc, m0, m1); break;
    case 4: tile<4, FULL>(kc, ar_, ar, ak, b, ldb, load, cr, ldc, m0, m1); break;
    case 3: tile<3, FULL>(kc, ar_, ar, ak, b, ldb, load, cr, ldc, m0, m1); break;
    case 2: tile<2, FULL>(kc, ar_, ar, ak, b, ldb, load, cr, ldc, m0, m1); break;
    case 1: tile<1, FULL>(kc, ar_, ar, ak, b, ldb, load, cr, ldc, m0, m1); break;
    default: break;
  }
}

// C = beta C + A @ B over the blocks both entry points share: k in passes of kKC, rows in L2-sized blocks, each
// 16-column panel's k-slice (at b_at(j, k0), row stride ldb) read by every row tile of the block. Inlined into each
// entry point so that their constant strides reach the tiles (out of line, the packed product ran ~2% slower).
template <class BAt>
inline __attribute__((always_inline)) void blocked(int64_t M, int64_t N, int64_t K, const float* a, int64_t ar,
                                                   int64_t ak, const BAt& b_at, int64_t ldb, float beta, float* c,
                                                   int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (beta == 0.f)
      for (int64_t r = 0; r < M; ++r) std::fill(c + r * ldc, c + r * ldc + N, 0.f);
    return;
  }
  const int64_t block = a_block_rows();
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    const bool load = k0 > 0 || beta != 0.f;
    for (int64_t m0 = 0; m0 < M; m0 += block) {
      const int64_t mc = std::min(block, M - m0);
      const float* ab = a + m0 * ar + k0 * ak;
      float* cb = c + m0 * ldc;
      for (int64_t j = 0; j < N; j += kNR) {
        const int64_t nj = std::min(kNR, N - j);
        const float* bb = b_at(j, k0);
        if (nj == kNR) panel<true>(mc, kc, ab, ar, ak, bb, ldb, load, cb + j, ldc, nj);
        else panel<false>(mc, kc, ab, ar, ak, bb, ldb, load, cb + j, ldc, nj);
      }
    }
  }
}

}  // namespace

void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* b, int64_t ldb,
          float beta, float* c, int64_t ldc) {
  blocked(M, N, K, a, ar, ak, [&](int64_t j, int64_t k0) { return b + k0 * ldb + j; }, ldb, beta, c, ldc);
}

void pack_rows(const float* w, int64_t ldw, int64_t N, int64_t K, float* dst) {
  for (int64_t j0 = 0; j0 < N; j0 += kNR) {
    float* d = dst + j0 * K;  // panel j0 / 16: K x 16 floats
    for (int64_t h = 0; h < kNR; h += 8) {  // the panel's two halves of 8 rows (null past N: zeros)
      const float* rows[8];
      for (int64_t j = 0; j < 8; ++j) rows[j] = j0 + h + j < N ? w + (j0 + h + j) * ldw : nullptr;
      avx2::pack8(rows, K, d + h, kNR);
    }
  }
}

void gemm_packed(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* packed, float beta,
                 float* c, int64_t ldc) {
  blocked(M, N, K, a, lda, 1, [&](int64_t j, int64_t k0) { return packed + j * K + k0 * kNR; }, kNR, beta, c, ldc);
}

int64_t nt_scratch_floats(int64_t N) { return packed_size(N, kKC); }

void gemm_nt(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* w, int64_t ldw, float beta,
             float* c, int64_t ldc, const float* bias, float* scratch) {
  if (M <= 0 || N <= 0) return;
  if (bias) {
    // C = beta C + bias first, then every k-slice accumulates.
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < N; ++j) c[r * ldc + j] = (beta != 0.f ? c[r * ldc + j] : 0.f) + bias[j];
    beta = 1.f;
  }
  if (K <= 0) return gemm(M, N, 0, a, lda, 1, nullptr, 0, beta, c, ldc);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    pack_rows(w + k0, ldw, N, kc, scratch);
    blocked(M, N, kc, a + k0, lda, 1, [&](int64_t j, int64_t) { return scratch + j * kc; }, kNR,
            k0 > 0 ? 1.f : beta, c, ldc);
  }
}

void gemm_nn_packing(int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* b,
                     int64_t ldb, float beta, float* c, int64_t ldc, float* scratch) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) return gemm(M, N, 0, a, ar, ak, b, ldb, beta, c, ldc);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    for (int64_t j0 = 0; j0 < N; j0 += kNR) {  // panel j0 / 16: kc rows of 16 floats, zeros past N
      const int64_t nj = std::min(kNR, N - j0);
      const __m256i m0 = mask8(nj), m1 = mask8(nj - 8);
      float* d = scratch + j0 * kc;
      const float* src = b + k0 * ldb + j0;
      for (int64_t k = 0; k < kc; ++k, src += ldb, d += kNR) {
        _mm256_store_ps(d, nj == kNR ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, m0));
        _mm256_store_ps(d + 8, nj == kNR ? _mm256_loadu_ps(src + 8) : _mm256_maskload_ps(src + 8, m1));
      }
    }
    blocked(M, N, kc, a + k0 * ak, ar, ak, [&](int64_t j, int64_t) { return scratch + j * kc; }, kNR,
            k0 > 0 ? 1.f : beta, c, ldc);
  }
}

#else  // no x86 target regions: never available (sgemm_nt::available() is false)

void gemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float, float*, int64_t) {}
void pack_rows(const float*, int64_t, int64_t, int64_t, float*) {}
void gemm_packed(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float, float*, int64_t) {}
int64_t nt_scratch_floats(int64_t) { return 0; }
void gemm_nn_packing(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float, float*,
                     int64_t, float*) {}
void gemm_nt(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float, float*, int64_t,
             const float*, float*) {}

#endif

}  // namespace sgemm_nn
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX2_GEMM_NN
SEQFAST_TARGET_END
#endif
