// The dot-product-form GEMM of sgemm_nt.h on AVX-512 vectors: the same tiles, loop order and blocking as the AVX2
// form (sgemm_nt_body.inc), 16 lanes per multiply-add. Why: the form reads the weights in place (a cell step's
// products, one-off products of few rows), and on a Zen 5 core the AVX2 form reaches half the multiply-add rate
// its two 512-bit FMA pipes give. This translation unit is compiled for AVX-512 by the target pragma below and
// includes no ATen headers (the rule of cpu/isa.h); sgemm_nt::gemm2 calls it only where avx512_available().
#include "cpu/sgemm_nt.h"

#include "cpu/isa.h"

#include <algorithm>
#include <cstdint>

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX512_GEMM_NT 1
SEQFAST_TARGET_AVX512_BEGIN
#include <immintrin.h>
#endif

namespace seqfast {
namespace sgemm_nt {

#ifdef SEQFAST_HAVE_AVX512_GEMM_NT
namespace {

// The AVX-512 vector of sgemm_nt_body.inc.
struct V {
  using T = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kW = 16;
  static constexpr int kNJ = 8;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static Mask mask(int64_t n) { return n >= 16 ? Mask(0xFFFF) : n <= 0 ? Mask(0) : Mask((1u << n) - 1u); }
  static T load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  // each 16-lane sum folded to 8 lanes, then the AVX2 form's horizontal-add tree
  static __m256 fold(T a) { return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)); }
  static __m128 hsum4(T a, T b, T c, T d) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(fold(a), fold(b)), _mm256_hadd_ps(fold(c), fold(d)));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  }
};

// Lanes [0, n) of 4 set (n in 0..4): this unit's own copy (the AVX2 units' is compiled for AVX2).
inline __m128i mask4(int n) {
  alignas(16) static const int32_t bits[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + 4 - n));
}

#include "cpu/sgemm_nt_body.inc"

}  // namespace

void gemm2_avx512(int64_t M, int64_t N, int64_t K1, const float* a1, int64_t lda1, const float* w1, int64_t ldw1,
                  int64_t K2, const float* a2, int64_t lda2, const float* w2, int64_t ldw2, float beta, float* c,
                  int64_t ldc, const float* bias) {
  run2(M, N, Operand{K1, a1, lda1, w1, ldw1}, Operand{K2, a2, lda2, w2, ldw2}, beta, c, ldc, bias);
}

#else  // no x86 target regions: never called (avx512_available() is false)

void gemm2_avx512(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, int64_t, const float*,
                  int64_t, const float*, int64_t, float, float*, int64_t, const float*) {}

#endif

}  // namespace sgemm_nt
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX512_GEMM_NT
SEQFAST_TARGET_END
#endif
