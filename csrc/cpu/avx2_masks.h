// Lane masks for AVX2 masked loads and stores (seqfast._C internal), shared by the own AVX2 GEMMs (sgemm_nt.cpp,
// sgemm_nn.cpp). Include only inside a SEQFAST_TARGET_AVX2_BEGIN region, after <immintrin.h>, in a translation unit
// without ATen headers (the rule of cpu/isa.h).
#pragma once

#include <algorithm>
#include <cstdint>

namespace seqfast {
namespace avx2 {

// Lanes [0, n) of 8 set (n clamped to 0..8).
inline __m256i mask8(int64_t n) {
  alignas(32) static const int32_t bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + 8 - std::clamp<int64_t>(n, 0, 8)));
}

// Lanes [0, n) of 4 set (n in 0..4).
inline __m128i mask4(int n) {
  alignas(16) static const int32_t bits[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + 4 - n));
}

}  // namespace avx2
}  // namespace seqfast
