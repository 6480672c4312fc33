// An 8 x 8 float transpose in registers and the 8-row packing built on it (seqfast._C internal), for packing weights
// into the layouts of the AVX2 kernels: the fused LSTM step (rnn/rnn_sequence_lstm_step_avx2.cpp) and the packed
// outer-product GEMM (cpu/sgemm_nn.cpp). Include only inside a SEQFAST_TARGET_AVX2_BEGIN region, after
// <immintrin.h>, in a translation unit without ATen headers (the rule of cpu/isa.h).
#pragma once

#include <cstdint>

namespace seqfast {
namespace avx2 {

// dst[kk * ld + j] = rows[j][k0 + kk] for kk, j < 8: 8 loads, 24 shuffles and 8 stores in place of 64 scalar copies
// with a strided destination.
inline __attribute__((always_inline)) void transpose8(const float* const (&rows)[8], int64_t k0, float* dst,
                                                      int64_t ld) {
  const __m256 r0 = _mm256_loadu_ps(rows[0] + k0), r1 = _mm256_loadu_ps(rows[1] + k0),
               r2 = _mm256_loadu_ps(rows[2] + k0), r3 = _mm256_loadu_ps(rows[3] + k0),
               r4 = _mm256_loadu_ps(rows[4] + k0), r5 = _mm256_loadu_ps(rows[5] + k0),
               r6 = _mm256_loadu_ps(rows[6] + k0), r7 = _mm256_loadu_ps(rows[7] + k0);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ld, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ld, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// dst[k * ld + j] = rows[j][k] for k < K, j < 8, and 0 where rows[j] is null: the packers' common step (8 weight
// rows into the 8 lanes of each k). With all 8 rows present, whole 8-column chunks of k go through transpose8; the
// rest is copied one float at a time.
inline void pack8(const float* const (&rows)[8], int64_t K, float* dst, int64_t ld) {
  bool all = true;
  for (int j = 0; j < 8; ++j) all = all && rows[j] != nullptr;
  const int64_t k8 = all ? K / 8 * 8 : 0;
  for (int64_t k = 0; k < k8; k += 8) transpose8(rows, k, dst + k * ld, ld);
  for (int j = 0; j < 8; ++j)
    for (int64_t k = k8; k < K; ++k) dst[k * ld + j] = rows[j] ? rows[j][k] : 0.f;
}

}  // namespace avx2
}  // namespace seqfast
