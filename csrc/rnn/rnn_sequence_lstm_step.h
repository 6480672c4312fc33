// Fused float32 LSTM step for x86-64 CPUs with AVX-512 (seqfast._C internal; rnn_sequence_lstm_step.cpp).
//
// One step of one layer for a range of hidden units, entirely in registers: for a tile of 6 batch rows x 16 units
// the 4 gate pre-activations (6 x 64 floats = 24 zmm accumulators) start at the bias, accumulate x_t W_ih^T and
// h_{t-1} W_hh^T from weights packed gate-interleaved (per 16-unit block: [i16 f16 g16 o16] per k), and the cell
// update runs on them before anything is stored: c and h are written, and the activated gates only when a backward
// will need them. Compared with GEMM-then-pointwise this never writes or re-reads the [B, 4H] pre-activations and
// needs no separate projection pass.
//
// Callers check sgemm::available() (same ISA requirement) first. No allocation, no threading: the RNN layer splits
// the units between its threads in 16-unit blocks and calls step() per thread and step.
#pragma once

#include <cstdint>

namespace seqfast {
namespace lstm_step {

constexpr int64_t kUnits = 16;  // units per packed block

// Floats needed for the packed gate weights of `nunits` units with K inputs: ceil(nunits / 16) blocks x K x 64.
inline int64_t pack_size(int64_t K, int64_t nunits) { return (nunits + kUnits - 1) / kUnits * K * 4 * kUnits; }

// Packs W [4H, K] (torch layout: gate blocks i, f, g, o of H rows each; row stride ldw) for units [u0, u1).
void pack_weights(const float* w, int64_t ldw, int64_t K, int64_t H, int64_t u0, int64_t u1, float* dst);
// Packs bias [4H] (or zeros when bias == nullptr) for units [u0, u1) in blocks of `units` (16 here, 8 for
// lstm_step_avx2): ceil(n / units) x 4 units floats. Scalar code outside the ISA regions, shared by both steps.
void pack_bias(const float* bias, int64_t H, int64_t u0, int64_t u1, int64_t units, float* dst);

struct StepArgs {
  int64_t rows = 0;              // active batch rows of this step
  const float* x = nullptr;      // input rows (row r at x + r * ldx), I floats each; nullptr: no input term
  int64_t ldx = 0, I = 0;
  const float* wx = nullptr;     // pack_weights(W_ih) for [u0, u1)
  const float* const* h = nullptr;      // previous hidden row pointers (H floats each)
  const float* wh = nullptr;            // pack_weights(W_hh) for [u0, u1)
  int64_t H = 0;
  const float* bias = nullptr;          // pack_bias for [u0, u1)
  // Precomputed input pre-activations (x_t W_ih^T + bias, torch gate layout: gate q of unit u at q * H + u; row r at
  // pre + r * ldpre): required by step_small; for step, in place of x and the bias (then nullptr). May alias `gates`
  // (each tile reads its pre-activations before it writes the same positions), so the backward's workspace is
  // filled in place.
  const float* pre = nullptr;
  int64_t ldpre = 0;
  const float* const* cprev = nullptr;  // previous cell row pointers
  float* c = nullptr;            // this step's cell rows (row r at c + r * H)
  float* hout = nullptr;         // this step's hidden rows (row r at hout + r * H)
  float* gates = nullptr;        // activated gates rows [i f g o] (row r at gates + r * 4H), or nullptr
  int64_t u0 = 0, u1 = 0;        // unit range; u0 a multiple of 16
};

void step(const StepArgs& a);

// The same step for 1-2 rows (a.rows <= 2), with `pre` required and W_hh read in place: w_hh is the torch-layout
// [4H, H] matrix (row stride H), nothing packed. At one or two rows a step is a single pass over W_hh, so packing it
// (a transpose per call) would cost a good part of the whole sequence; instead each output's dot product runs along
// W's contiguous rows and 16 partial-sum vectors are reduced into one with a shuffle tree (16 / rows units per block,
// both rows in one vector for the cell update). a.wx, a.wh, a.bias and a.x are ignored.
void step_small(const StepArgs& a, const float* w_hh);

// The backward's recurrent product for 1-2 rows, W in place: y[b][0:N] = sum over j in the row blocks
// [j0[i], j0[i] + n) of x[b][j] * w[j][0:N] (w row-major, row stride ldw). For the LSTM each thread passes its own
// units' four gate-row blocks of W_hh (x = the step's gate grads): it reads only rows it owns, contiguously, and the
// threads' partial sums are added afterwards.
void gemv_t_small(int64_t rows, const float* const* x, const int64_t* j0, int nblocks, int64_t n, const float* w,
                  int64_t ldw, int64_t N, float* const* y);

}  // namespace lstm_step

// The same fused step for x86-64 CPUs with AVX2 + FMA and no AVX-512 (rnn_sequence_lstm_step_avx2.cpp): 8-unit
// blocks packed [i8 f8 g8 o8] per k, register tiles of 3 batch rows x 4 gate vectors (12 ymm accumulators), the cell
// update on them before anything is stored. It replaces the per-thread GEMM + pointwise of the fused time loop, whose
// recurrent GEMM ran at about 55 GFLOP/s per core on a Zen 3, and the separate input-projection GEMM.
// Callers check available() first; same StepArgs (pre, step_small: AVX-512 only).
namespace lstm_step_avx2 {

constexpr int64_t kUnits = 8;  // units per packed block

bool available();  // AVX2 + FMA present (cpu/isa.h), config().own_gemm and config().avx2_lstm_step

inline int64_t pack_size(int64_t K, int64_t nunits) { return (nunits + kUnits - 1) / kUnits * K * 4 * kUnits; }
// As lstm_step::pack_weights, in 8-unit blocks (u0 a multiple of 8); the bias: lstm_step::pack_bias with units = 8.
void pack_weights(const float* w, int64_t ldw, int64_t K, int64_t H, int64_t u0, int64_t u1, float* dst);
void step(const lstm_step::StepArgs& a);

}  // namespace lstm_step_avx2
}  // namespace seqfast
