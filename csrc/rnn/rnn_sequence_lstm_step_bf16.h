// Fused bfloat16 LSTM step for x86-64 CPUs with AVX-512 and AVX512_BF16 (seqfast._C internal;
// rnn_sequence_lstm_step_bf16.cpp).
//
// The bfloat16 twin of lstm_step::step (rnn_sequence_lstm_step.h): for a tile of up to 6 batch rows x 16 units the 4
// gate pre-activations (24 float32 zmm accumulators) start at the bias and accumulate x_t W_ih^T and h_{t-1} W_hh^T
// with vdpbf16ps (two bfloat16 products per lane per instruction, float32 sums), from weights packed pair-interleaved
// per 16-unit block ([i16 f16 g16 o16] per pair of k, each unit's two k side by side), and the cell update runs on
// them in float32 before anything is stored. The cell state stays float32 between steps; h is rounded to bfloat16
// once per step (round to nearest even, as torch rounds) and read back as the next step's bfloat16 operand, as
// torch's bfloat16 LSTM does. Why: on such a CPU the float32 kernels on upcast copies lost to torch's oneDNN
// bfloat16 LSTM (0.5-0.8x): they move twice the weight bytes and run half the multiply-adds per instruction.
//
// Callers check available() first. No allocation, no threading: the layer splits the units between its threads in
// 16-unit blocks and calls step() per thread and step, as for the float32 step.
#pragma once

#include <cstdint>

namespace seqfast {
namespace lstm_step_bf16 {

constexpr int64_t kUnits = 16;  // units per packed block

// AVX-512 + AVX512_BF16 and no AMX on this CPU (cpu/isa.h; AMX CPUs keep torch's op, seqfast._rules), the own
// AVX-512 kernels on (config().fused) and config().bf16_lstm_step.
bool available();

// bfloat16 elements of the packed gate weights of `nunits` units with K inputs: ceil(nunits / 16) blocks x
// ceil(K / 2) pairs x 128.
inline int64_t pack_size(int64_t K, int64_t nunits) {
  return (nunits + kUnits - 1) / kUnits * ((K + 1) / 2) * 4 * kUnits * 2;
}

// Packs W [4H, K] bfloat16 (torch layout: gate blocks i, f, g, o of H rows each; row stride ldw; raw 16-bit patterns)
// for units [u0, u1); past K and past u1 the pairs hold zeros.
void pack_weights(const uint16_t* w, int64_t ldw, int64_t K, int64_t H, int64_t u0, int64_t u1, uint16_t* dst);

struct StepArgs {
  int64_t rows = 0;                  // active batch rows of this step
  const uint16_t* x = nullptr;       // bfloat16 input rows (row r at x + r * ldx), I elements each
  int64_t ldx = 0, I = 0;
  const uint16_t* wx = nullptr;      // pack_weights(W_ih) for [u0, u1)
  const uint16_t* const* h = nullptr;  // previous hidden rows, bfloat16 (H elements each)
  const uint16_t* wh = nullptr;      // pack_weights(W_hh) for [u0, u1)
  int64_t H = 0;
  const float* bias = nullptr;       // lstm_step::pack_bias (16-unit blocks) for [u0, u1): b_ih + b_hh in float32
  const float* const* cprev = nullptr;  // previous cell rows, float32
  float* c = nullptr;                // this step's cell rows, float32 (row r at c + r * H)
  uint16_t* hout = nullptr;          // this step's hidden rows, bfloat16 (row r at hout + r * H)
  float* gates = nullptr;            // activated gates rows [i f g o], float32 (row r at gates + r * 4H), or nullptr
  int64_t u0 = 0, u1 = 0;            // unit range; u0 a multiple of 16
};

void step(const StepArgs& a);

}  // namespace lstm_step_bf16
}  // namespace seqfast
