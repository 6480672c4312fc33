// Row-wise elementwise helpers shared by the attention kernels (internal; not part of seqfast's API).
//
// Why not at::vec::Vectorized: the extension is built with the compiler's baseline x86-64 flags (no -mavx2), and in
// that configuration ATen's Vectorized<float> is its scalar fallback, whose exp() is a loop of std::exp calls. The
// softmax exp is the only non-GEMM hot spot of flash attention, so we write a branch-free polynomial exp/tanh that the
// compiler auto-vectorises (`#pragma omp simd`; setup.py builds with -fopenmp) and let GCC's target_clones emit
// AVX-512 / AVX2+FMA / baseline copies of each row function, picked once at load time (ifunc). The wheel therefore runs
// on any x86-64 CPU and still uses the wide units where present. Clones are keyed on ISA features, not "arch=" names:
// an arch= clone is chosen only when the CPU model *is* that arch, so newer CPUs silently got the scalar default. Double precision keeps std::exp / std::tanh (the
// float64 path is for exact tests, not speed).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(SEQFAST_NO_TARGET_CLONES)
#define SEQFAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SEQFAST_CLONES
#endif

namespace seqfast {
namespace attn_vec {

// exp(x) for float, ~2 ulp on [-87, 88]; returns exactly 0 below -87 (so exp(-inf) == 0, which the masking relies
// on) and propagates NaN. Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 polynomial
// (Cephes expf coefficients), then scaling by 2^n built directly in the exponent bits.
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
  const float ax = __builtin_fabsf(x);  // builtin: std::fabs would not inline into the target clones
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

// ---- row helpers (float versions are cloned per ISA; double are plain) ----

SEQFAST_CLONES static float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
static double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// x[i] = exp(x[i] - sub); returns the sum of the new x.
SEQFAST_CLONES static float row_exp_sub_sum(float* x, int64_t n, float sub) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float e = fast_expf(x[i] - sub);
    x[i] = e;
    s += e;
  }
  return s;
}
static double row_exp_sub_sum(double* x, int64_t n, double sub) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double e = std::exp(x[i] - sub);
    x[i] = e;
    s += e;
  }
  return s;
}

// x[i] = exp(x[i] - sub) (no sum; backward's P = exp(S - lse)).
SEQFAST_CLONES static void row_exp_sub(float* x, int64_t n, float sub) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = fast_expf(x[i] - sub);
}
static void row_exp_sub(double* x, int64_t n, double sub) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] - sub);
}

// ds[i] = p[i] * (ds[i] - delta)   (dS = P * (dP - rowsum(dO * O)))
SEQFAST_CLONES static void row_dsoftmax(const float* p, float* ds, int64_t n, float delta) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) ds[i] = p[i] * (ds[i] - delta);
}
static void row_dsoftmax(const double* p, double* ds, int64_t n, double delta) {
  for (int64_t i = 0; i < n; ++i) ds[i] = p[i] * (ds[i] - delta);
}

// y += alpha * x
SEQFAST_CLONES static void axpy(float* y, const float* x, float alpha, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}
static void axpy(double* y, const double* x, double alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

SEQFAST_CLONES static float dot(const float* x, const float* y, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}
static double dot(const double* x, const double* y, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// out[r] = x . y_r for four rows y_r = y + r * ldy: one pass over x, four independent reductions (decoder step).
SEQFAST_CLONES static void dot4(const float* x, const float* y, int64_t ldy, int64_t n, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  const float *y0 = y, *y1 = y + ldy, *y2 = y + 2 * ldy, *y3 = y + 3 * ldy;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < n; ++i) {
    s0 += x[i] * y0[i];
    s1 += x[i] * y1[i];
    s2 += x[i] * y2[i];
    s3 += x[i] * y3[i];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}
static void dot4(const double* x, const double* y, int64_t ldy, int64_t n, double* out) {
  for (int r = 0; r < 4; ++r) out[r] = dot(x, y + r * ldy, n);
}

// acc += sum_r p[r * ldp] * x_r for four rows x_r = x + r * ldx (acc loaded/stored once per four rows).
SEQFAST_CLONES static void axpy4(float* acc, const float* x, int64_t ldx, const float* p, int64_t ldp, int64_t n) {
  const float p0 = p[0], p1 = p[ldp], p2 = p[2 * ldp], p3 = p[3 * ldp];
  const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += p0 * x0[i] + p1 * x1[i] + p2 * x2[i] + p3 * x3[i];
}
static void axpy4(double* acc, const double* x, int64_t ldx, const double* p, int64_t ldp, int64_t n) {
  for (int r = 0; r < 4; ++r) axpy(acc, x + r * ldx, p[r * ldp], n);
}

}  // namespace attn_vec
}  // namespace seqfast
