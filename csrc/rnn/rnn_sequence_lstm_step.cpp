// Fused AVX-512 LSTM step: gate GEMMs and cell update in registers. See rnn_sequence_lstm_step.h.
// Compiled for AVX-512 by the target pragma below; no ATen headers here (same reason as sgemm.cpp).
#include "rnn/rnn_sequence_lstm_step.h"

#include <algorithm>

#include "cpu/isa.h"

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX512_LSTM 1
SEQFAST_TARGET_AVX512_BEGIN
#include <immintrin.h>

#include "cpu/avx512_math.h"
#endif

namespace seqfast {
namespace lstm_step {

#ifdef SEQFAST_HAVE_AVX512_LSTM
namespace {

constexpr int kMR = 6;  // rows per register tile: 6 x 4 gate vectors = 24 accumulators

using avx512::lstm_update;
using avx512::reduce16;
using avx512::mask16;
using avx512::store_gates;

// acc[r][q] += sum_k rows[r][k] * w[k][16q + lane] over k < K.
template <int MR>
inline __attribute__((always_inline)) void accumulate(__m512 (&acc)[MR][4], const float* const (&rows)[MR], int64_t K,
                                                      const float* w) {
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_load_ps(w), w1 = _mm512_load_ps(w + 16), w2 = _mm512_load_ps(w + 32),
                 w3 = _mm512_load_ps(w + 48);
    w += 64;
    for (int r = 0; r < MR; ++r) {
      const __m512 v = _mm512_set1_ps(rows[r][k]);
      acc[r][0] = _mm512_fmadd_ps(v, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(v, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(v, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(v, w3, acc[r][3]);
    }
  }
}

// Rows [r0, r0 + MR) x units of block blk.
template <int MR>
void tile(const StepArgs& a, int64_t r0, int64_t blk) {
  const int64_t u = a.u0 + blk * kUnits;
  const __mmask16 m = mask16(a.u1 - u);
  __m512 acc[MR][4];
  if (a.pre) {  // the input pre-activations (bias included) from one GEMM over all steps
    for (int r = 0; r < MR; ++r)
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_maskz_loadu_ps(m, a.pre + (r0 + r) * a.ldpre + q * a.H + u);
  } else {
    for (int q = 0; q < 4; ++q) {
      const __m512 b = a.bias ? _mm512_load_ps(a.bias + blk * 64 + 16 * q) : _mm512_setzero_ps();
      for (int r = 0; r < MR; ++r) acc[r][q] = b;
    }
  }
  if (a.x) {
    const float* xr[MR];
    for (int r = 0; r < MR; ++r) xr[r] = a.x + (r0 + r) * a.ldx;
    accumulate<MR>(acc, xr, a.I, a.wx + blk * a.I * 64);
  }
  {
    const float* hr[MR];
    for (int r = 0; r < MR; ++r) hr[r] = a.h[r0 + r];
    accumulate<MR>(acc, hr, a.H, a.wh + blk * a.H * 64);
  }
  const int64_t H = a.H;
  for (int r = 0; r < MR; ++r) {
    const int64_t row = r0 + r;
    __m512 h;
    const __m512 c = lstm_update(acc[r], _mm512_maskz_loadu_ps(m, a.cprev[row] + u), h);
    _mm512_mask_storeu_ps(a.c + row * H + u, m, c);
    _mm512_mask_storeu_ps(a.hout + row * H + u, m, h);
    if (a.gates) store_gates(a.gates + row * 4 * H + u, H, m, acc[r]);
  }
}

// Lane b * U + j of a row-pair vector = row b, unit u + j (U = 16 / NB units per block, j < n valid).
template <int NB>
inline __m512 load_rows(const float* const* rows, int64_t off, int n) {
  if constexpr (NB == 1) {
    return _mm512_maskz_loadu_ps(mask16(n), rows[0] + off);
  } else {
    const __mmask8 m = __mmask8(mask16(n));
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_maskz_loadu_ps(m, rows[0] + off)),
                              _mm256_maskz_loadu_ps(m, rows[1] + off), 1);
  }
}
template <int NB>
inline void store_rows(float* base, int64_t stride, int64_t off, int n, __m512 v) {
  if constexpr (NB == 1) {
    _mm512_mask_storeu_ps(base + off, mask16(n), v);
  } else {
    const __mmask8 m = __mmask8(mask16(n));
    _mm256_mask_storeu_ps(base + off, m, _mm512_castps512_ps256(v));
    _mm256_mask_storeu_ps(base + stride + off, m, _mm512_extractf32x8_ps(v, 1));
  }
}

// One block of n <= 16 / NB units starting at unit u, NB rows.
template <int NB>
void small_block(const StepArgs& a, const float* w, int64_t u, int n) {
  constexpr int U = 16 / NB;
  const int64_t H = a.H;
  const float* pre[NB];
  for (int b = 0; b < NB; ++b) pre[b] = a.pre + b * a.ldpre;
  __m512 gate[4];
  for (int q = 0; q < 4; ++q) {
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    const float* wq = w + (q * H + u) * H;
    for (int64_t k = 0; k < H; k += 16) {
      const __mmask16 km = mask16(H - k);
      __m512 hv[NB];
      for (int b = 0; b < NB; ++b) hv[b] = _mm512_maskz_loadu_ps(km, a.h[b] + k);
      for (int j = 0; j < U; ++j) {
        if (j >= n) break;
        const __m512 wv = _mm512_maskz_loadu_ps(km, wq + j * H + k);
        for (int b = 0; b < NB; ++b) acc[b * U + j] = _mm512_fmadd_ps(hv[b], wv, acc[b * U + j]);
      }
    }
    gate[q] = _mm512_add_ps(reduce16(acc), load_rows<NB>(pre, q * H + u, n));
  }
  __m512 h;
  const __m512 c = lstm_update(gate, load_rows<NB>(a.cprev, u, n), h);
  store_rows<NB>(a.c, H, u, n, c);
  store_rows<NB>(a.hout, H, u, n, h);
  if (a.gates)
    for (int q = 0; q < 4; ++q) store_rows<NB>(a.gates + u, 4 * H, q * H, n, gate[q]);
}

// y[b][k : k + 16 NV] for gemv_t_small: NV x NB accumulators, W rows read sequentially.
template <int NB>
void gemv_t_cols(const float* const* x, const int64_t* j0, int nblocks, int64_t n, const float* w, int64_t ldw,
                 int64_t k, int nk, float* const* y) {
  constexpr int NV = 8;
  __mmask16 m[NV];
  for (int c = 0; c < NV; ++c) m[c] = mask16(nk - 16 * c);
  __m512 acc[NB][NV];
  for (int b = 0; b < NB; ++b)
    for (int c = 0; c < NV; ++c) acc[b][c] = _mm512_setzero_ps();
  for (int i = 0; i < nblocks; ++i)
    for (int64_t j = j0[i]; j < j0[i] + n; ++j) {
      const float* wr = w + j * ldw + k;
      __m512 wv[NV];
      for (int c = 0; c < NV; ++c) wv[c] = _mm512_maskz_loadu_ps(m[c], wr + 16 * c);
      for (int b = 0; b < NB; ++b) {
        const __m512 v = _mm512_set1_ps(x[b][j]);
        for (int c = 0; c < NV; ++c) acc[b][c] = _mm512_fmadd_ps(v, wv[c], acc[b][c]);
      }
    }
  for (int b = 0; b < NB; ++b)
    for (int c = 0; c < NV; ++c)
      if (m[c]) _mm512_mask_storeu_ps(y[b] + k + 16 * c, m[c], acc[b][c]);
}

}  // namespace

void pack_weights(const float* w, int64_t ldw, int64_t K, int64_t H, int64_t u0, int64_t u1, float* dst) {
  // Per block and gate: 16 unit rows x 16 k read k-contiguous, transposed in registers, stored as 16 k rows of the
  // block's [i16 f16 g16 o16] layout (units past u1 are zero).
  const int64_t nb = (u1 - u0 + kUnits - 1) / kUnits;
  for (int64_t b = 0; b < nb; ++b) {
    float* d = dst + b * K * 64;
    const int64_t ub = u0 + b * kUnits, nu = std::min<int64_t>(kUnits, u1 - ub);
    for (int64_t q = 0; q < 4; ++q)
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const int64_t nk = std::min<int64_t>(16, K - k0);
        const __mmask16 km = mask16(nk);
        __m512 r[16];
        for (int64_t j = 0; j < 16; ++j)
          r[j] = j < nu ? _mm512_maskz_loadu_ps(km, w + (q * H + ub + j) * ldw + k0) : _mm512_setzero_ps();
        avx512::transpose16(r);
        for (int64_t kk = 0; kk < nk; ++kk) _mm512_store_ps(d + (k0 + kk) * 64 + q * 16, r[kk]);
      }
  }
}

void step(const StepArgs& a) {
  const int64_t nb = (a.u1 - a.u0 + kUnits - 1) / kUnits;
  for (int64_t blk = 0; blk < nb; ++blk) {
    int64_t r = 0;
    for (; r + kMR <= a.rows; r += kMR) tile<kMR>(a, r, blk);
    switch (a.rows - r) {
      case 5: tile<5>(a, r, blk); break;
      case 4: tile<4>(a, r, blk); break;
      case 3: tile<3>(a, r, blk); break;
      case 2: tile<2>(a, r, blk); break;
      case 1: tile<1>(a, r, blk); break;
      default: break;
    }
  }
}

void step_small(const StepArgs& a, const float* w_hh) {
  const int64_t U = a.rows == 1 ? 16 : 8;
  for (int64_t u = a.u0; u < a.u1; u += U) {
    const int n = (int)std::min<int64_t>(U, a.u1 - u);
    if (a.rows == 1) small_block<1>(a, w_hh, u, n);
    else small_block<2>(a, w_hh, u, n);
  }
}

void gemv_t_small(int64_t rows, const float* const* x, const int64_t* j0, int nblocks, int64_t n, const float* w,
                  int64_t ldw, int64_t N, float* const* y) {
  for (int64_t k = 0; k < N; k += 128) {
    const int nk = (int)std::min<int64_t>(128, N - k);
    if (rows == 1) gemv_t_cols<1>(x, j0, nblocks, n, w, ldw, k, nk, y);
    else gemv_t_cols<2>(x, j0, nblocks, n, w, ldw, k, nk, y);
  }
}

#else

void pack_weights(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*) {}
void step(const StepArgs&) {}
void step_small(const StepArgs&, const float*) {}
void gemv_t_small(int64_t, const float* const*, const int64_t*, int, int64_t, const float*, int64_t, int64_t,
                  float* const*) {}

#endif

}  // namespace lstm_step
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX512_LSTM
SEQFAST_TARGET_END
#endif

namespace seqfast {
namespace lstm_step {

// Outside the AVX-512 region: the AVX2 step packs its bias with it too, on any CPU.
void pack_bias(const float* bias, int64_t H, int64_t u0, int64_t u1, int64_t units, float* dst) {
  const int64_t nb = (u1 - u0 + units - 1) / units;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t q = 0; q < 4; ++q)
      for (int64_t j = 0; j < units; ++j) {
        const int64_t u = u0 + b * units + j;
        dst[(b * 4 + q) * units + j] = (bias && u < u1) ? bias[q * H + u] : 0.f;
      }
}

}  // namespace lstm_step
}  // namespace seqfast
