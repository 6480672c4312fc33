// float32 exp / sigmoid / tanh on ymm registers for the AVX2 translation units without ATen (the fused AVX2 LSTM
// step). The same method as avx512_math.h (Cephes expf range reduction and polynomial), with 2^n built in the
// exponent bits because AVX2 has no scalef. Include only inside a SEQFAST_TARGET_AVX2_BEGIN region, after
// <immintrin.h> (the rule of cpu/isa.h).
#pragma once

namespace seqfast {
namespace avx2 {

// exp(x), ~1 ulp on [-87.5, 88.3]. x < -87.5 (results below the normal range, and -inf) gives exactly 0, which the
// saturated gates rely on; x above 88.3 is clamped there (~2.1e38: a sigmoid of -x is then 0 to float precision, as
// with expf's +inf); NaN propagates.
inline __m256 exp_ps(__m256 x) {
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.5f), _CMP_LT_OQ);
  // operand order: MAXPS/MINPS return their second operand when one is NaN, so NaN propagates as in expf
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.5f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // n in [-126, 127] after the clamp: 2^n is a normal float (a NaN x gives a garbage scale, but p is NaN already)
  const __m256 scale =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, scale));
}

inline __m256 sigmoid_ps(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): no cancellation for large |x|, ~1e-7 absolute near 0.
inline __m256 tanh_ps(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
  const __m256 e = exp_ps(_mm256_mul_ps(a, _mm256_set1_ps(-2.f)));
  return _mm256_or_ps(_mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e)), sign);
}

}  // namespace avx2
}  // namespace seqfast
