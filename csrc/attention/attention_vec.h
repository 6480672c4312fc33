// Row-wise elementwise helpers shared by the attention kernels (internal; not part of seqfast's API).
//
// Why not at::vec::Vectorized: the extension is built for the baseline x86-64 ISA, where ATen's Vectorized<float>
// is its scalar fallback, whose exp() is a loop of std::exp calls. The softmax exp is the only non-GEMM hot spot of
// flash attention, so the helpers are a branch-free polynomial exp/tanh in loops the compiler vectorises
// (`#pragma omp simd`; setup.py builds with -fopenmp).
// ISA (cpu/isa.h): the helpers (attention_rows.inc) are compiled three times, in the baseline, the AVX2 and the
// AVX-512 target regions, as attn_vec::base::Rows, avx2::Rows and avx512::Rows. The kernels are templates on the
// Rows type and with_rows() picks one per call from the CPU's features (detected once), so the wheel runs on any
// x86-64 CPU and still uses the wide units where present.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/isa.h"
#include "cpu/sgemm.h"

namespace seqfast {
namespace attn_vec {

// exp(x) for float, ~2 ulp on [-87, 88]; returns exactly 0 below -87 (so exp(-inf) == 0, which the masking relies
// on) and propagates NaN. Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 polynomial
// (Cephes expf coefficients), then scaling by 2^n built directly in the exponent bits.
// always_inline: inlined into each ISA region's loops (a baseline function may be inlined into a wider target).
__attribute__((always_inline)) static inline float fast_expf(float x) {
  float xc = x > 88.3762626647949f ? 88.3762626647949f : x;
  xc = xc < -87.5f ? -87.5f : xc;
  // round-to-nearest via the 1.5 * 2^23 trick (std::floor would be a libm call that blocks vectorisation at the
  // baseline ISA; no -ffast-math, so the compiler keeps the add/sub pair).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  const float res = y * s;
  return x < -87.0f ? 0.0f : res;
}

// tanh(x) for float, ~few ulp. |x| < 0.125: odd Taylor polynomial (avoids the cancellation of 1 - e^{-2|x|});
// otherwise sign(x) (1 - e)/(1 + e) with e = exp(-2|x|) (never overflows; e -> 0 gives +-1).
__attribute__((always_inline)) static inline float fast_tanhf(float x) {
  const float ax = __builtin_fabsf(x);  // builtin: std::fabs would not inline into the ISA regions
  const float x2 = x * x;
  float p = 62.0f / 2835.0f;
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  const float small = x + x * x2 * p;
  const float e = fast_expf(-2.0f * ax);
  float big = (1.0f - e) / (1.0f + e);
  big = x < 0.0f ? -big : big;
  return ax < 0.125f ? small : big;
}

static inline float exp_(float x) { return fast_expf(x); }
static inline double exp_(double x) { return std::exp(x); }
static inline float tanh_(float x) { return fast_tanhf(x); }
static inline double tanh_(double x) { return std::tanh(x); }

namespace base {
#include "attention/attention_rows.inc"
}  // namespace base

#ifdef SEQFAST_X86_TARGETS
SEQFAST_TARGET_AVX2_BEGIN
namespace avx2 {
#include "attention/attention_rows.inc"
}  // namespace avx2
SEQFAST_TARGET_END

SEQFAST_TARGET_AVX512_BEGIN
namespace avx512 {
#include "attention/attention_rows.inc"
}  // namespace avx512
SEQFAST_TARGET_END
#endif

// f(Rows{}) with the widest Rows this CPU runs: AVX-512 where the AVX-512 kernels may run (sgemm::available(), so
// config own_gemm = false also forces the AVX2 loops), else AVX2+FMA, else the baseline.
template <class F>
inline void with_rows(const F& f) {
#ifdef SEQFAST_X86_TARGETS
  if (sgemm::available()) return f(avx512::Rows{});
  if (cpu::has_avx2_fma()) return f(avx2::Rows{});
#endif
  f(base::Rows{});
}

}  // namespace attn_vec
}  // namespace seqfast
