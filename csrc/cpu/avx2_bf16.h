// bfloat16 <-> float32 in AVX2 registers (seqfast._C internal), shared by the kernels that read bfloat16 in place
// (attention_decode_avx2.cpp, bf16_weight_gemv.cpp). A bfloat16 is the high half of the float32 of the same value, so
// widening is a 16-bit shift. Include only inside a SEQFAST_TARGET_AVX2_BEGIN region, after <immintrin.h>, in a
// translation unit without ATen headers (the rule of cpu/isa.h).
#pragma once

#include <cstdint>
#include <cstring>

namespace seqfast {
namespace avx2 {

// Eight bfloat16 patterns from p as float32.
inline __m256 load_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The first n (< 8) of them, the other lanes 0; nothing past p + n is read.
inline __m256 load_bf16(const uint16_t* p, int64_t n) {
  alignas(16) uint16_t t[8] = {};
  std::memcpy(t, p, size_t(n) * sizeof(uint16_t));
  return load_bf16(t);
}

// Eight float32 to bfloat16 patterns, rounded to nearest even; NaN becomes 0xFFFF, as torch's vectorized
// float32 -> bfloat16 conversion (Tensor.to) writes it (c10's scalar conversion writes 0x7FC0: both are NaN).
inline __m128i to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), nan);
  // every lane is below 0x10000 now, so the unsigned saturating pack keeps it as is
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

}  // namespace avx2
}  // namespace seqfast
