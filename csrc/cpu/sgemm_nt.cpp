// AVX2 dot-product-form float32 GEMM: C = beta C + A @ W^T (+ bias). See sgemm_nt.h for why. The kernel's body is
// sgemm_nt_body.inc, shared with the AVX-512 twin (sgemm_nt_avx512.cpp), to which gemm2 hands the call where it runs.
// This translation unit is compiled for AVX2 + FMA by the target pragma below and includes no ATen headers (the same
// rule as sgemm.cpp): callers check available().
#include "cpu/sgemm_nt.h"

#include "cpu/config.h"
#include "cpu/isa.h"
#include "cpu/sgemm.h"

#include <algorithm>
#include <cstring>

namespace seqfast {
namespace sgemm_nt {

// Compiled for the baseline ISA, outside the AVX2 region: these are the guards.
bool available() { return cpu::has_avx2_fma() && cpu::config().own_gemm; }
bool avx512_available() { return sgemm::available() && cpu::config().avx512_nt; }

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

// The AVX2 vector of sgemm_nt_body.inc.
struct V {
  using T = __m256;
  using Mask = __m256i;
  static constexpr int64_t kW = 8;
  static constexpr int kNJ = 4;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static Mask mask(int64_t n) { return avx2::mask8(n); }
  static T load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static __m128 hsum4(T a, T b, T c, T d) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  }
};
using avx2::mask4;

#include "cpu/sgemm_nt_body.inc"

}  // namespace

bool one_pass(int64_t M, int64_t K1, int64_t K2) { return fits_one_pass(M, K1, K2); }

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
  if (avx512_available())
    return gemm2_avx512(M, N, K1, a1, lda1, w1, ldw1, K2, a2, lda2, w2, ldw2, beta, c, ldc, bias);
  run2(M, N, Operand{K1, a1, lda1, w1, ldw1}, Operand{K2, a2, lda2, w2, ldw2}, beta, c, ldc, bias);
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
