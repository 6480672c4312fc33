// float32 exp / sigmoid / tanh, the LSTM cell update, a 16 x 16 transpose, a 16-vector horizontal sum and tail masks on zmm registers,
// shared by the AVX-512 translation units (lstm_step.cpp, attention_avx512.cpp, sgemm.cpp). Include only after
// `#pragma GCC target("avx512f,...")` and <immintrin.h>.
#pragma once

#include <cstdint>

namespace seqfast {
namespace avx512 {

// Lanes [0, n) of a 16-lane mask: all for n >= 16, none for n <= 0.
inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

// exp(x): x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for e^r (Cephes expf, ~1 ulp), scaled by 2^n with
// scalef, so large x gives +inf as expf does. x < -87.5 (results below the normal range, and -inf) gives exactly 0,
// which the softmax and the gates rely on for masked / saturated entries.
inline __m512 exp_ps(__m512 x) {
  const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.5f), _CMP_LT_OQ);
  // operand order: MAXPS/MINPS return their second operand when one is NaN, so NaN propagates as in expf
  x = _mm512_min_ps(_mm512_set1_ps(100.f), _mm512_max_ps(_mm512_set1_ps(-87.5f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_mask_mov_ps(_mm512_scalef_ps(p, n), under, _mm512_setzero_ps());
}

// 2^x for the attention softmax, whose arguments are (s - max) log2(e) <= 0: x = n + r with n = round(x), |r| <= 1/2,
// a degree-6 polynomial for 2^r (fitted to relative error on [-1/2, 1/2]: <= 1e-7 evaluated in float32), scaled by
// 2^n with scalef. Cheaper than exp_ps by the range reduction (no ln2 split, no clamp of large x): valid for
// x <= 127. x <= -200 (every result below float's range, and -inf) gives exactly 0, so masked scores give P = 0;
// NaN propagates.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.f), x);  // MAXPS returns its second operand (x) when x is NaN
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.534581097e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.339993090e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.618489072e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.550328642e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.402264625e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931471825e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 sigmoid_ps(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): no cancellation for large |x|, ~1e-7 absolute near 0.
inline __m512 tanh_ps(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 sign = _mm512_and_ps(x, _mm512_set1_ps(-0.f));
  const __m512 a = _mm512_andnot_ps(_mm512_set1_ps(-0.f), x);
  const __m512 e = exp_ps(_mm512_mul_ps(a, _mm512_set1_ps(-2.f)));
  return _mm512_or_ps(_mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e)), sign);
}

// The LSTM cell update on 16 units, shared by the float32 and bfloat16 LSTM steps: gate holds the pre-activations
// i, f, g, o and is left holding the activated gates (the backward's workspace); cp is the previous cell. Returns the
// new cell c; h = o tanh(c).
inline __m512 lstm_update(__m512 (&gate)[4], __m512 cp, __m512& h) {
  gate[0] = sigmoid_ps(gate[0]);
  gate[1] = sigmoid_ps(gate[1]);
  gate[2] = tanh_ps(gate[2]);
  gate[3] = sigmoid_ps(gate[3]);
  const __m512 c = _mm512_fmadd_ps(gate[1], cp, _mm512_mul_ps(gate[0], gate[2]));
  h = _mm512_mul_ps(gate[3], tanh_ps(c));
  return c;
}

// The four activated gates of lstm_update into a row of the [i f g o] workspace (gate q at gr + q H), lanes m.
inline void store_gates(float* gr, int64_t H, __mmask16 m, const __m512 (&gate)[4]) {
  for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(gr + q * H, m, gate[q]);
}

// One round of transpose16: swaps the off-diagonal B x B sub-blocks of row pairs (i, i + B). B is a template
// parameter so that every index is a constant and r[] stays in registers (a runtime B made GCC spill r[] to the stack).
template <int B>
inline void transpose16_round(__m512 (&r)[16]) {
  alignas(64) int lo[16], hi[16];
  for (int j = 0; j < 16; ++j) {
    lo[j] = (j & B) ? 16 + j - B : j;   // row i keeps its left part, takes row i+B's left part on the right
    hi[j] = (j & B) ? 16 + j : j + B;   // row i+B takes row i's right part on the left, keeps its right part
  }
  const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if (i & B) continue;
    const __m512 a = r[i], c = r[i + B];
    r[i] = _mm512_permutex2var_ps(a, ilo, c);
    r[i + B] = _mm512_permutex2var_ps(a, ihi, c);
  }
}

// In-register transpose of a 16 x 16 float block: four rounds swap the off-diagonal b x b sub-blocks of row pairs
// (i, i + b) for b = 8, 4, 2, 1.
inline void transpose16(__m512 (&r)[16]) {
  transpose16_round<8>(r);
  transpose16_round<4>(r);
  transpose16_round<2>(r);
  transpose16_round<1>(r);
}

// Horizontal sums of 16 vectors into one: lane L = sum of a[L]'s lanes. Each round adds the two halves (256, 128,
// 64, 32 bits) of pairs of vectors, so 15 adds and 30 shuffles replace 16 separate reductions; the last permute
// undoes the lane order the rounds leave ([0 2 1 3 8 10 9 11 4 6 5 7 12 14 13 15]).
inline __m512 reduce16(__m512 (&a)[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[i], a[i + 8], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[i], b[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i) {
    const __m512d x = _mm512_castps_pd(c[i]), y = _mm512_castps_pd(c[i + 2]);
    d[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(order, e);
}

}  // namespace avx512
}  // namespace seqfast
