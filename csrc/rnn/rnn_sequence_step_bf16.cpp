// Fused bfloat16 LSTM and GRU steps on AVX512_BF16 (vdpbf16ps). See rnn_sequence_step_bf16.h.
// Compiled for AVX-512 + AVX512_BF16 by the target pragma below; no ATen headers here (the rule of cpu/isa.h).
#include "rnn/rnn_sequence_step_bf16.h"

#include <algorithm>
#include <cstring>

#include "cpu/config.h"
#include "cpu/isa.h"

namespace seqfast {
namespace step_bf16 {

// Compiled for the baseline ISA, outside the target region: this is the guard.
bool available() {
  return cpu::has_avx512_bf16() && cpu::config().fused && cpu::config().bf16_rnn_step;
}

}  // namespace step_bf16
}  // namespace seqfast

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_BF16_LSTM 1
SEQFAST_TARGET_AVX512_BF16_BEGIN
#include <immintrin.h>

namespace seqfast {
namespace step_bf16 {
namespace {
// this unit's own copies of the AVX-512 math (see cpu/isa.h): seqfast::step_bf16::(anonymous)::seqfast::avx512
#include "cpu/avx512_math.h"
}  // namespace
}  // namespace step_bf16
}  // namespace seqfast
#endif

namespace seqfast {
namespace step_bf16 {

#ifdef SEQFAST_HAVE_BF16_LSTM
namespace {

constexpr int kMR = 6;  // rows per register tile: 6 x 4 gate vectors = 24 accumulators

using seqfast::avx512::lstm_update;
using seqfast::avx512::mask16;
using seqfast::avx512::sigmoid_ps;
using seqfast::avx512::store_gates;
using seqfast::avx512::tanh_ps;
using seqfast::avx512::transpose16;

// Two bfloat16 values of a row, (k, k + 1), as one 32-bit word broadcast to every lane; the second is 0 past the row.
inline __m512i pair(const uint16_t* row, int64_t k, bool last_single) {
  uint32_t v;
  if (last_single) {
    v = row[k];
  } else {
    std::memcpy(&v, row + k, sizeof(v));
  }
  return _mm512_set1_epi32(int32_t(v));
}

inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// acc[r][d(q)] += sum_k rows[r][k] * w[k][16q + lane] over k < K and the G gate groups q of the packed weights, two
// k per instruction; group 2 goes to accumulator D2 (the GRU's hidden part of n: 3), the others to their own.
template <int MR, int G, int D2>
inline __attribute__((always_inline)) void accumulate(__m512 (&acc)[MR][4], const uint16_t* const (&rows)[MR],
                                                      int64_t K, const uint16_t* w) {
  constexpr int d[4] = {0, 1, D2, 3};
  const int64_t pairs = K / 2;
  for (int64_t p = 0; p <= pairs; ++p) {
    const bool single = p == pairs;  // the last k alone (odd K): its packed pair and broadcast word hold 0 for k + 1
    if (single && !(K & 1)) break;
    __m512i wv[G];
    for (int q = 0; q < G; ++q) wv[q] = _mm512_load_si512(w + 32 * q);
    w += 32 * G;
    for (int r = 0; r < MR; ++r) {
      const __m512i v = pair(rows[r], 2 * p, single);
      for (int q = 0; q < G; ++q) acc[r][d[q]] = dot2(acc[r][d[q]], v, wv[q]);
    }
  }
}

// The 16 bfloat16 values of a row from `u` (lanes past the mask 0) widened to float32.
inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// The accumulators of rows [r0, r0 + MR) x the units of block blk: the bias, then both products.
template <int MR, int G>
inline __attribute__((always_inline)) void products(__m512 (&acc)[MR][4], const StepArgs& a, int64_t r0,
                                                    int64_t blk) {
  for (int q = 0; q < 4; ++q) {
    const __m512 b = a.bias ? _mm512_load_ps(a.bias + blk * 64 + 16 * q) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) acc[r][q] = b;
  }
  if (a.x) {
    const uint16_t* xr[MR];
    for (int r = 0; r < MR; ++r) xr[r] = a.x + (r0 + r) * a.ldx;
    accumulate<MR, G, 2>(acc, xr, a.I, a.wx + blk * pack_size(a.I, kUnits, G));
  }
  const uint16_t* hr[MR];
  for (int r = 0; r < MR; ++r) hr[r] = a.h[r0 + r];
  accumulate<MR, G, G == 4 ? 2 : 3>(acc, hr, a.H, a.wh + blk * pack_size(a.H, kUnits, G));
}

// LSTM rows [r0, r0 + MR) x units of block blk.
template <int MR>
void lstm_tile(const StepArgs& a, int64_t r0, int64_t blk) {
  const int64_t u = a.u0 + blk * kUnits;
  const __mmask16 m = mask16(a.u1 - u);
  __m512 acc[MR][4];
  products<MR, 4>(acc, a, r0, blk);
  const int64_t H = a.H;
  for (int r = 0; r < MR; ++r) {
    const int64_t row = r0 + r;
    __m512 h;
    const __m512 c = lstm_update(acc[r], _mm512_maskz_loadu_ps(m, a.cprev[row] + u), h);
    _mm512_mask_storeu_ps(a.c + row * H + u, m, c);
    _mm256_mask_storeu_epi16(a.hout + row * H + u, m, (__m256i)_mm512_cvtneps_pbh(h));
    if (a.ws) store_gates(a.ws + row * 4 * H + u, H, m, acc[r]);
  }
}

// GRU rows [r0, r0 + MR) x units of block blk: r, z, n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)),
// h' = (1 - z) n + z h.
template <int MR>
void gru_tile(const StepArgs& a, int64_t r0, int64_t blk) {
  const int64_t u = a.u0 + blk * kUnits;
  const __mmask16 m = mask16(a.u1 - u);
  __m512 acc[MR][4];
  products<MR, 3>(acc, a, r0, blk);
  const int64_t H = a.H;
  for (int r = 0; r < MR; ++r) {
    const int64_t row = r0 + r;
    const __m512 rg = sigmoid_ps(acc[r][0]), z = sigmoid_ps(acc[r][1]);
    const __m512 n = tanh_ps(_mm512_fmadd_ps(rg, acc[r][3], acc[r][2]));
    const __m512 hp = load_bf16(a.h[row] + u, m);
    const __m512 h = _mm512_fmadd_ps(z, _mm512_sub_ps(hp, n), n);
    _mm256_mask_storeu_epi16(a.hout + row * H + u, m, (__m256i)_mm512_cvtneps_pbh(h));
    if (a.ws) {
      float* wr = a.ws + row * 4 * H + u;
      _mm512_mask_storeu_ps(wr, m, rg);
      _mm512_mask_storeu_ps(wr + H, m, z);
      _mm512_mask_storeu_ps(wr + 2 * H, m, n);
      _mm512_mask_storeu_ps(wr + 3 * H, m, acc[r][3]);
    }
  }
}

// Every block (of `units` units) of the step, in row tiles of kMR and one remainder tile.
template <template <int> class Tile, int64_t units>
void run(const StepArgs& a) {
  const int64_t nb = (a.u1 - a.u0 + units - 1) / units;
  for (int64_t blk = 0; blk < nb; ++blk) {
    int64_t r = 0;
    for (; r + kMR <= a.rows; r += kMR) Tile<kMR>::run(a, r, blk);
    switch (a.rows - r) {
      case 5: Tile<5>::run(a, r, blk); break;
      case 4: Tile<4>::run(a, r, blk); break;
      case 3: Tile<3>::run(a, r, blk); break;
      case 2: Tile<2>::run(a, r, blk); break;
      case 1: Tile<1>::run(a, r, blk); break;
      default: break;
    }
  }
}
// Elman RNN rows [r0, r0 + MR) x the 64 units of block blk (its four 16-unit groups): h' = tanh or relu of the sum.
template <int MR>
void rnn_tile(const StepArgs& a, int64_t r0, int64_t blk) {
  __m512 acc[MR][4];
  products<MR, 4>(acc, a, r0, blk);
  for (int q = 0; q < 4; ++q) {
    const int64_t u = a.u0 + blk * kRnnUnits + q * kUnits;
    const __mmask16 m = mask16(a.u1 - u);
    if (!m) break;
    for (int r = 0; r < MR; ++r) {
      const __m512 h = a.relu ? _mm512_max_ps(acc[r][q], _mm512_setzero_ps()) : tanh_ps(acc[r][q]);
      _mm256_mask_storeu_epi16(a.hout + (r0 + r) * a.H + u, m, (__m256i)_mm512_cvtneps_pbh(h));
    }
  }
}

template <int MR>
struct RnnTile {
  static void run(const StepArgs& a, int64_t r0, int64_t blk) { rnn_tile<MR>(a, r0, blk); }
};
template <int MR>
struct LstmTile {
  static void run(const StepArgs& a, int64_t r0, int64_t blk) { lstm_tile<MR>(a, r0, blk); }
};
template <int MR>
struct GruTile {
  static void run(const StepArgs& a, int64_t r0, int64_t blk) { gru_tile<MR>(a, r0, blk); }
};

}  // namespace

namespace {
// Packs weight rows [row0, row0 + n) (n <= 16; zeros past n and past K) as group q of a G-group block at d. A pair of
// k is one 32-bit word: 16 rows x 16 pairs (32 k) are read k-contiguous, transposed in registers as 32-bit words
// (permutes only: the bits pass unchanged) and stored as 16 pair rows of the block's group-interleaved layout.
void pack_group(const uint16_t* w, int64_t ldw, int64_t K, int64_t row0, int64_t n, int64_t G, int64_t q,
                uint16_t* d) {
  const int64_t pairs = (K + 1) / 2;
  for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
    const int64_t nk = std::min<int64_t>(32, K - 2 * p0), np = std::min<int64_t>(16, pairs - p0);
    const __mmask32 km = nk >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << nk) - 1u);
    __m512 r[16];
    for (int64_t j = 0; j < 16; ++j)
      r[j] = j < n ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(km, w + (row0 + j) * ldw + 2 * p0))
                   : _mm512_setzero_ps();
    transpose16(r);
    for (int64_t kk = 0; kk < np; ++kk)
      _mm512_store_ps(reinterpret_cast<float*>(d + ((p0 + kk) * G + q) * 32), r[kk]);
  }
}
}  // namespace

void pack_weights(const uint16_t* w, int64_t ldw, int64_t K, int64_t H, int64_t G, int64_t u0, int64_t u1,
                  uint16_t* dst) {
  const int64_t nb = (u1 - u0 + kUnits - 1) / kUnits;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t ub = u0 + b * kUnits, nu = std::min<int64_t>(kUnits, u1 - ub);
    for (int64_t q = 0; q < G; ++q) pack_group(w, ldw, K, q * H + ub, nu, G, q, dst + b * pack_size(K, kUnits, G));
  }
}

void pack_rnn_weights(const uint16_t* w, int64_t ldw, int64_t K, int64_t u0, int64_t u1, uint16_t* dst) {
  const int64_t nb = (u1 - u0 + kRnnUnits - 1) / kRnnUnits;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t q = 0; q < 4; ++q) {
      const int64_t ub = u0 + b * kRnnUnits + q * kUnits;
      pack_group(w, ldw, K, ub, std::clamp<int64_t>(u1 - ub, 0, kUnits), 4, q, dst + b * pack_size(K, kUnits, 4));
    }
}

void lstm(const StepArgs& a) { run<LstmTile, kUnits>(a); }
void gru(const StepArgs& a) { run<GruTile, kUnits>(a); }
void rnn(const StepArgs& a) { run<RnnTile, kRnnUnits>(a); }

#else  // no x86 target regions: never called (available() is false)

void pack_weights(const uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint16_t*) {}
void pack_rnn_weights(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint16_t*) {}
void lstm(const StepArgs&) {}
void gru(const StepArgs&) {}
void rnn(const StepArgs&) {}

#endif

}  // namespace step_bf16
}  // namespace seqfast

#ifdef SEQFAST_HAVE_BF16_LSTM
SEQFAST_TARGET_END
#endif
