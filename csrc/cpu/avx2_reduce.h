// Horizontal reductions of ymm registers (seqfast._C internal), shared by the AVX2 kernels that end their dot
// products in registers: the decoder step (attention_decode_avx2.cpp), the bfloat16-weight GEMV
// (bf16_weight_gemv.cpp) and the small-batch GEMV (rnn/rnn_pointwise.h). Include only inside a
// SEQFAST_TARGET_AVX2_BEGIN region, after <immintrin.h> (the rule of cpu/isa.h).
#pragma once

namespace seqfast {
namespace avx2 {

inline float hsum8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax8(__m256 x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// [sum a0, sum a1, ..., sum a7]: the horizontal sums of 8 vectors in one vector (7 hadds, 2 lane permutes). With
// short dot products the reductions, one per output, otherwise cost as much as the multiply-adds.
inline __m256 reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // [0123 lo | 0123 hi]
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));  // [4567 lo | 4567 hi]
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

}  // namespace avx2
}  // namespace seqfast
