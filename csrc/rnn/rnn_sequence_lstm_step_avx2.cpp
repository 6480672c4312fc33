// Fused AVX2 LSTM step: gate GEMMs and cell update in registers. See lstm_step_avx2 in rnn_sequence_lstm_step.h.
// Compiled for AVX2 + FMA by the target pragma below; no ATen headers here (the rule of cpu/isa.h).
#include <algorithm>

#include "cpu/config.h"
#include "cpu/isa.h"
#include "rnn/rnn_sequence_lstm_step.h"

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX2_LSTM 1
SEQFAST_TARGET_AVX2_BEGIN
#include <immintrin.h>

#include "cpu/avx2_masks.h"
#include "cpu/avx2_math.h"
#include "cpu/avx2_transpose.h"
#endif

namespace seqfast {
namespace lstm_step_avx2 {

#ifdef SEQFAST_HAVE_AVX2_LSTM
namespace {

// Rows per register tile: 3 x 4 gate vectors = 12 of the 16 ymm registers as accumulators, 3 for the rows'
// broadcasts and 1 for the weight vector they share (see accumulate).
constexpr int kMR = 3;

using avx2::mask8;
using avx2::sigmoid_ps;
using avx2::tanh_ps;

// Accumulators of a tile (rows past a tile's MR unused): named variables, not an array. GCC keeps an array of 12 ymm
// (384 bytes, above its limit for replacing an aggregate by scalars) in memory and stored all 12 to the stack on every
// k.
struct Acc {
  __m256 i0, f0, g0, o0, i1, f1, g1, o1, i2, f2, g2, o2;
};

// a += rows x w over k < K (row r's gate q at lane j: sum_k rows[r][k] * w[k][8q + j]). Per k the MR broadcasts come
// first, then each weight vector is loaded once and used by every row: 12 + 3 + 1 registers at MR = 3, exactly the
// 16 of AVX2. PF: also a cache line per k, pf + 64 k, of the chunk after this one (see group).
template <int MR, bool PF = false>
inline __attribute__((always_inline)) void accumulate(Acc& acc, const float* const (&rows)[3], int64_t K,
                                                      const float* w, const char* pf = nullptr) {
  __m256 i0 = acc.i0, f0 = acc.f0, g0 = acc.g0, o0 = acc.o0, i1 = acc.i1, f1 = acc.f1, g1 = acc.g1, o1 = acc.o1,
         i2 = acc.i2, f2 = acc.f2, g2 = acc.g2, o2 = acc.o2;
  const float* r0 = rows[0];
  const float* r1 = rows[MR > 1 ? 1 : 0];
  const float* r2 = rows[MR > 2 ? 2 : 0];
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k, w += 32) {
    const __m256 v0 = _mm256_broadcast_ss(r0 + k);
    const __m256 v1 = MR > 1 ? _mm256_broadcast_ss(r1 + k) : v0;
    const __m256 v2 = MR > 2 ? _mm256_broadcast_ss(r2 + k) : v0;
    if constexpr (PF) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
#define SEQFAST_GATE(q, a0, a1, a2)                          \
  {                                                          \
    const __m256 wq = _mm256_load_ps(w + 8 * q);             \
    a0 = _mm256_fmadd_ps(v0, wq, a0);                        \
    if constexpr (MR > 1) a1 = _mm256_fmadd_ps(v1, wq, a1);  \
    if constexpr (MR > 2) a2 = _mm256_fmadd_ps(v2, wq, a2);  \
  }
    SEQFAST_GATE(0, i0, i1, i2)
    SEQFAST_GATE(1, f0, f1, f2)
    SEQFAST_GATE(2, g0, g1, g2)
    SEQFAST_GATE(3, o0, o1, o2)
#undef SEQFAST_GATE
  }
  acc = Acc{i0, f0, g0, o0, i1, f1, g1, o1, i2, f2, g2, o2};
}

// Whole-vector loads and stores for a full 8-unit block (full), masked ones for the last, partial block: AVX2's
// masked store (vmaskmovps) is slow on AMD cores, and a step makes up to 6 stores per row and block.
inline __attribute__((always_inline)) __m256 load(bool full, const float* p, __m256i m) {
  return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m);
}
inline __attribute__((always_inline)) void store(bool full, float* p, __m256i m, __m256 v) {
  if (full) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, m, v);
}

// The cell update of one row from its 4 gate pre-activations.
inline __attribute__((always_inline)) void cell_row(const lstm_step::StepArgs& a, int64_t row, int64_t u, bool full,
                                                    __m256i m, __m256 pi, __m256 pf, __m256 pg, __m256 po) {
  const int64_t H = a.H;
  const __m256 i = sigmoid_ps(pi), f = sigmoid_ps(pf), g = tanh_ps(pg), o = sigmoid_ps(po);
  const __m256 cp = load(full, a.cprev[row] + u, m);
  const __m256 c = _mm256_fmadd_ps(f, cp, _mm256_mul_ps(i, g));
  const __m256 h = _mm256_mul_ps(o, tanh_ps(c));
  store(full, a.c + row * H + u, m, c);
  store(full, a.hout + row * H + u, m, h);
  if (a.gates) {
    float* gr = a.gates + row * 4 * H + u;
    store(full, gr, m, i);
    store(full, gr + H, m, f);
    store(full, gr + 2 * H, m, g);
    store(full, gr + 3 * H, m, o);
  }
}

// The accumulators of a tile of mr rows (1..3) before the products: the rows' input pre-activations (torch gate
// layout, read before the gates may overwrite them), or the bias. A tile's rows past mr repeat its last row (never
// read past the step's rows).
inline __attribute__((always_inline)) Acc start(const lstm_step::StepArgs& a, int64_t r0, int mr, int64_t blk,
                                                bool full, __m256i m) {
  if (a.pre) {
    const int64_t H = a.H, u = a.u0 + blk * kUnits;
    const float* p0 = a.pre + r0 * a.ldpre + u;
    const float* p1 = a.pre + (r0 + std::min(1, mr - 1)) * a.ldpre + u;
    const float* p2 = a.pre + (r0 + std::min(2, mr - 1)) * a.ldpre + u;
    return Acc{load(full, p0, m),         load(full, p0 + H, m),     load(full, p0 + 2 * H, m),
               load(full, p0 + 3 * H, m), load(full, p1, m),         load(full, p1 + H, m),
               load(full, p1 + 2 * H, m), load(full, p1 + 3 * H, m), load(full, p2, m),
               load(full, p2 + H, m),     load(full, p2 + 2 * H, m), load(full, p2 + 3 * H, m)};
  }
  const float* b = a.bias + blk * 32;
  const __m256 bi = _mm256_load_ps(b), bf = _mm256_load_ps(b + 8), bg = _mm256_load_ps(b + 16),
               bo = _mm256_load_ps(b + 24);
  return Acc{bi, bf, bg, bo, bi, bf, bg, bo, bi, bf, bg, bo};
}

// The cell updates of a tile's mr rows (1..3) from its accumulators.
inline __attribute__((always_inline)) void finish(const lstm_step::StepArgs& a, int64_t r0, int mr, int64_t u,
                                                  bool full, __m256i m, const Acc& acc) {
  cell_row(a, r0, u, full, m, acc.i0, acc.f0, acc.g0, acc.o0);
  if (mr > 1) cell_row(a, r0 + 1, u, full, m, acc.i1, acc.f1, acc.g1, acc.o1);
  if (mr > 2) cell_row(a, r0 + 2, u, full, m, acc.i2, acc.f2, acc.g2, acc.o2);
}

// k of one operand per chunk: a 128 x 32 slice of a packed block (16 KB, half of a 32 KB L1) is read by every row
// tile of a group before the next slice. Why: one tile ran over its whole block (K x 128 bytes: 64 KB at K = 512)
// before the next tile started, so every tile after the first re-read the block from L2, 4 vector loads per 12 FMAs
// (about 21 bytes per cycle at the FMA rate); the step ran at ~72% of the core's FMA peak on a Zen 3 however small
// the block. The accumulators go to memory between chunks: 24 moves per tile per 1536 FMAs.
constexpr int64_t kKChunk = 128;
// Row tiles per group: their accumulators (384 bytes each) and row chunks stay in L1 beside the weight slice.
constexpr int kGroupTiles = 8;

// acc += rows x w over k in [k0, k0 + kc) for tile r0 of MR rows; rows at src[r] (row stride ld) or at hp[r].
template <int MR>
inline __attribute__((always_inline)) void chunk(Acc& acc, const float* src, int64_t ld,
                                                 const float* const* hp, int64_t r0, int64_t k0, int64_t kc,
                                                 const float* w, const char* pf = nullptr) {
  const float* rows[3];
  for (int r = 0; r < 3; ++r) {
    const int64_t row = r0 + std::min(r, MR - 1);
    rows[r] = (src ? src + row * ld : hp[row]) + k0;
  }
  if (pf) accumulate<MR, true>(acc, rows, kc, w + k0 * 32, pf);
  else accumulate<MR>(acc, rows, kc, w + k0 * 32);
}

// Rows [r0, r0 + MR) x the 8 units of block blk over the whole of K: the order where every block fits L1 (K up to
// kKChunk), without the chunks' accumulator moves (those cost ~10% at hidden 128, 8 rows).
template <int MR>
void tile(const lstm_step::StepArgs& a, int64_t r0, int64_t blk) {
  const int64_t u = a.u0 + blk * kUnits;
  const __m256i m = mask8(a.u1 - u);
  const bool full = a.u1 - u >= kUnits;
  Acc acc = start(a, r0, MR, blk, full, m);
  if (a.x) chunk<MR>(acc, a.x, a.ldx, nullptr, r0, 0, a.I, a.wx + blk * a.I * 32);
  chunk<MR>(acc, nullptr, 0, a.h, r0, 0, a.H, a.wh + blk * a.H * 32);
  finish(a, r0, MR, u, full, m, acc);
}

// Rows [g0, g0 + n) (n <= kGroupTiles * kMR) x the 8 units of block blk, K in chunks.
void group(const lstm_step::StepArgs& a, int64_t g0, int64_t n, int64_t blk) {
  const int64_t u = a.u0 + blk * kUnits;
  const __m256i m = mask8(a.u1 - u);
  const bool full = a.u1 - u >= kUnits;
  const int nt = int((n + kMR - 1) / kMR);
  const int last = int(n - (nt - 1) * kMR);  // rows of the last tile: 1..3
  Acc acc[kGroupTiles];
  for (int t = 0; t < nt; ++t) acc[t] = start(a, g0 + t * kMR, t < nt - 1 ? kMR : last, blk, full, m);
  // one operand: rows (src or hp) of K floats against its packed weights w
  auto operand = [&](const float* src, int64_t ld, const float* const* hp, int64_t K, const float* w) {
    for (int64_t k0 = 0; k0 < K; k0 += kKChunk) {
      const int64_t kc = std::min(kKChunk, K - k0);
      for (int t = 0; t < nt; ++t) {
        const int64_t r0 = g0 + t * kMR;
        // Tiles 1 and 2 fetch the next chunk's weights (the memory right after this chunk: the block's next chunk,
        // or the next block's first), a line per k, kc lines each. Why: tile 0 of a chunk reads it from L3 (a
        // thread's packed W_hh outgrows L2 from hidden ~256) while the other tiles compute from L1, so in groups of
        // few tiles the stream stalled every chunk's first tile. Same-process A/B on a 2-vCPU Zen 3 (LSTM T32, no
        // grad, 15 rounds, both orders): 1.00-1.10x at B8-32 H256-1024, 1 and 2 threads (B8 H1024 1.07-1.10x),
        // 1.00x at B64 H256 (24-row groups). With 2 tiles (tile 1 fetching 2 lines per k): no effect, so not done.
        // After a thread's last block the lines lie past its packing: a prefetch never faults, and nothing reads them.
        const char* pf = t >= 1 && t <= 2 && nt >= 3
                             ? reinterpret_cast<const char*>(w + (k0 + kc) * 32) + (t - 1) * 64 * kc
                             : nullptr;
        if (t < nt - 1 || last == 3) chunk<3>(acc[t], src, ld, hp, r0, k0, kc, w, pf);
        else if (last == 2) chunk<2>(acc[t], src, ld, hp, r0, k0, kc, w, pf);
        else chunk<1>(acc[t], src, ld, hp, r0, k0, kc, w, pf);
      }
    }
  };
  if (a.x) operand(a.x, a.ldx, nullptr, a.I, a.wx + blk * a.I * 32);
  operand(nullptr, 0, a.h, a.H, a.wh + blk * a.H * 32);
  for (int t = 0; t < nt; ++t) finish(a, g0 + t * kMR, t < nt - 1 ? kMR : last, u, full, m, acc[t]);
}

}  // namespace

void pack_weights(const float* w, int64_t ldw, int64_t K, int64_t H, int64_t u0, int64_t u1, float* dst) {
  // Per block and gate: the block's 8 torch rows (units; zeros past u1) packed into the gate's 8 lanes of each k's
  // 32 floats [i8 f8 g8 o8].
  const int64_t nb = (u1 - u0 + kUnits - 1) / kUnits;
  for (int64_t b = 0; b < nb; ++b) {
    float* d = dst + b * K * 32;
    const int64_t ub = u0 + b * kUnits, nu = std::min<int64_t>(kUnits, u1 - ub);
    for (int64_t q = 0; q < 4; ++q) {
      const float* rows[8];
      for (int64_t j = 0; j < kUnits; ++j) rows[j] = j < nu ? w + (q * H + ub + j) * ldw : nullptr;
      avx2::pack8(rows, K, d + q * 8, 32);
    }
  }
}

void step(const lstm_step::StepArgs& a) {
  const int64_t nb = (a.u1 - a.u0 + kUnits - 1) / kUnits;
  if (a.H <= kKChunk && (!a.x || a.I <= kKChunk)) {  // every block fits L1: tile by tile
    for (int64_t blk = 0; blk < nb; ++blk) {
      int64_t r = 0;
      for (; r + kMR <= a.rows; r += kMR) tile<kMR>(a, r, blk);
      switch (a.rows - r) {
        case 2: tile<2>(a, r, blk); break;
        case 1: tile<1>(a, r, blk); break;
        default: break;
      }
    }
    return;
  }
  constexpr int64_t kGroupRows = kGroupTiles * kMR;
  for (int64_t blk = 0; blk < nb; ++blk)
    for (int64_t g0 = 0; g0 < a.rows; g0 += kGroupRows) group(a, g0, std::min(kGroupRows, a.rows - g0), blk);
}

#else

void pack_weights(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*) {}
void step(const lstm_step::StepArgs&) {}

#endif

}  // namespace lstm_step_avx2
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX2_LSTM
SEQFAST_TARGET_END
#endif

namespace seqfast {
namespace lstm_step_avx2 {

// Outside the AVX2 region: called on any CPU.
bool available() {
#ifdef SEQFAST_HAVE_AVX2_LSTM
  return cpu::has_avx2_fma() && cpu::config().own_gemm && cpu::config().avx2_lstm_step;
#else
  return false;
#endif
}

}  // namespace lstm_step_avx2
}  // namespace seqfast
