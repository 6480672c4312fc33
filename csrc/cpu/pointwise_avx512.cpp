// AVX-512 RNN / LSTM / GRU pointwise rows; see pointwise_avx512.h. Compiled for AVX-512 by the target pragma below; no
// ATen headers here (the rule of cpu/isa.h).
#include "cpu/pointwise_avx512.h"

#include "cpu/config.h"
#include "cpu/isa.h"

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX512_POINTWISE 1
SEQFAST_TARGET_AVX512_BEGIN
#include <immintrin.h>

#include "cpu/avx512_math.h"
#endif

namespace seqfast {
namespace pointwise512 {

#ifdef SEQFAST_HAVE_AVX512_POINTWISE

void rnn_fwd_row(const float* pre, const float* b1, const float* b2, float* hy, bool relu, int64_t k0, int64_t k1) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 m = avx512::mask16(k1 - k);
    __m512 p = _mm512_maskz_loadu_ps(m, pre + k);
    if (b1) p = _mm512_add_ps(p, _mm512_maskz_loadu_ps(m, b1 + k));
    if (b2) p = _mm512_add_ps(p, _mm512_maskz_loadu_ps(m, b2 + k));
    __m512 y;
    if (relu) {  // max(p, 0), with p itself where p is NaN (MAXPS would return the 0)
      y = _mm512_mask_mov_ps(_mm512_max_ps(p, zero), _mm512_cmp_ps_mask(p, p, _CMP_UNORD_Q), p);
    } else {
      y = avx512::tanh_ps(p);
    }
    _mm512_mask_storeu_ps(hy + k, m, y);
  }
}

void lstm_fwd_row(float* g, const float* b1, const float* b2, const float* cp, float* cy, float* hy, int64_t H,
                  int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 m = avx512::mask16(k1 - k);
    __m512 gate[4];
    for (int q = 0; q < 4; ++q) {
      gate[q] = _mm512_maskz_loadu_ps(m, g + q * H + k);
      if (b1) gate[q] = _mm512_add_ps(gate[q], _mm512_maskz_loadu_ps(m, b1 + q * H + k));
      if (b2) gate[q] = _mm512_add_ps(gate[q], _mm512_maskz_loadu_ps(m, b2 + q * H + k));
    }
    __m512 h;
    const __m512 c = avx512::lstm_update(gate, _mm512_maskz_loadu_ps(m, cp + k), h);
    avx512::store_gates(g + k, H, m, gate);
    _mm512_mask_storeu_ps(cy + k, m, c);
    _mm512_mask_storeu_ps(hy + k, m, h);
  }
}

void gru_fwd_row(const float* gi, const float* bih, const float* gh, const float* bhh, const float* hp, float* hy,
                 float* ws, int64_t H, int64_t k0, int64_t k1, bool summed_rz) {
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 m = avx512::mask16(k1 - k);
    const auto ld = [&](const float* p) { return _mm512_maskz_loadu_ps(m, p + k); };
    __m512 pr = ld(gi), pz = ld(gi + H), pn = ld(gi + 2 * H), hn = ld(gh + 2 * H);
    if (!summed_rz) {
      pr = _mm512_add_ps(pr, ld(gh));
      pz = _mm512_add_ps(pz, ld(gh + H));
    }
    if (bih) {
      pr = _mm512_add_ps(pr, ld(bih));
      pz = _mm512_add_ps(pz, ld(bih + H));
      pn = _mm512_add_ps(pn, ld(bih + 2 * H));
    }
    if (bhh) {
      pr = _mm512_add_ps(pr, ld(bhh));
      pz = _mm512_add_ps(pz, ld(bhh + H));
      hn = _mm512_add_ps(hn, ld(bhh + 2 * H));
    }
    const __m512 r = avx512::sigmoid_ps(pr), z = avx512::sigmoid_ps(pz);
    const __m512 n = avx512::tanh_ps(_mm512_fmadd_ps(r, hn, pn));
    const __m512 h = _mm512_fmadd_ps(z, _mm512_sub_ps(ld(hp), n), n);  // (1 - z) n + z h
    if (ws) {
      _mm512_mask_storeu_ps(ws + k, m, r);
      _mm512_mask_storeu_ps(ws + H + k, m, z);
      _mm512_mask_storeu_ps(ws + 2 * H + k, m, n);
      _mm512_mask_storeu_ps(ws + 3 * H + k, m, hn);
    }
    _mm512_mask_storeu_ps(hy + k, m, h);
  }
}

#else  // no x86 target regions: never called (available() is false)

void rnn_fwd_row(const float*, const float*, const float*, float*, bool, int64_t, int64_t) {}
void lstm_fwd_row(float*, const float*, const float*, const float*, float*, float*, int64_t, int64_t, int64_t) {}
void gru_fwd_row(const float*, const float*, const float*, const float*, const float*, float*, float*, int64_t,
                 int64_t, int64_t, bool) {}

#endif

}  // namespace pointwise512
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX512_POINTWISE
SEQFAST_TARGET_END
#endif

namespace seqfast {
namespace pointwise512 {

bool available() { return cpu::has_avx512() && cpu::config().avx512_pointwise; }

}  // namespace pointwise512
}  // namespace seqfast
