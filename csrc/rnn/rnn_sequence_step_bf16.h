// Fused bfloat16 LSTM, GRU and Elman RNN steps for x86-64 CPUs with AVX-512 and AVX512_BF16 (seqfast._C internal;
// rnn_sequence_step_bf16.cpp).
//
// The bfloat16 twins of lstm_step::step (rnn_sequence_lstm_step.h): for a tile of up to 6 batch rows x 16 units the
// gate pre-activations (4 groups of 6 float32 zmm accumulators) start at the bias and accumulate x_t W_ih^T and
// h_{t-1} W_hh^T with vdpbf16ps (two bfloat16 products per lane per instruction, float32 sums), from weights packed
// pair-interleaved per 16-unit block (per pair of k, one 32-value vector per gate: each unit's two k side by side),
// and the cell update runs on them in float32 before anything is stored. LSTM: groups i, f, g, o from both products,
// the cell state kept in float32 between steps. GRU: r and z from both products, the n gate's input part and hidden
// part (W_hn h + b_hn, which r scales) in groups of their own. RNN: four 16-unit groups of a 64-unit block stand in
// for the gates (one product sum per unit). h is rounded to bfloat16 once per step (round to
// nearest even, as torch rounds) and read back as the next step's bfloat16 operand, as torch's bfloat16 RNNs do.
// Why: on such a CPU seqfast's float32 kernels on upcast copies lost to torch's oneDNN bfloat16 LSTM (0.5-0.8x), and
// the bf16-GEMM loop (one GEMM call and a pointwise pass per step) to both.
//
// Callers check available() first. No allocation, no threading: the layer splits the units between its threads in
// 16-unit blocks and calls lstm() / gru() / rnn() per thread and step.
#pragma once

#include <cstdint>

namespace seqfast {
namespace step_bf16 {

constexpr int64_t kUnits = 16;     // units per packed block (LSTM, GRU), and per group of an RNN block
constexpr int64_t kRnnUnits = 64;  // units per packed RNN block: four groups of 16 stand in for the gates

// AVX-512 + AVX512_BF16 on this CPU (cpu/isa.h), the own AVX-512 kernels on (config().fused) and
// config().bf16_rnn_step. On AMX CPUs torch's bfloat16 GEMMs run on tiles and outrun the steps' vdpbf16ps from a few
// hundred thousand multiply-adds per step: seqfast._rules gives those calls to torch's op there.
bool available();

// bfloat16 elements of the packed weights of G gate blocks (LSTM 4, GRU 3) for `nunits` units with K inputs:
// ceil(nunits / 16) blocks x ceil(K / 2) pairs x G x 32.
inline int64_t pack_size(int64_t K, int64_t nunits, int64_t G) {
  return (nunits + kUnits - 1) / kUnits * ((K + 1) / 2) * G * kUnits * 2;
}

// Packs W [G H, K] bfloat16 (torch layout: gate blocks of H rows each; row stride ldw; raw 16-bit patterns) for units
// [u0, u1); past K and past u1 the pairs hold zeros.
void pack_weights(const uint16_t* w, int64_t ldw, int64_t K, int64_t H, int64_t G, int64_t u0, int64_t u1,
                  uint16_t* dst);

// The Elman RNN's W [H, K] for units [u0, u1) in blocks of 64 units, each packed as pack_weights packs a 4-gate
// block of 16 (group q = units 16q .. 16q + 15 of the block): pack_size(K, 64 * blocks, 1) elements.
void pack_rnn_weights(const uint16_t* w, int64_t ldw, int64_t K, int64_t u0, int64_t u1, uint16_t* dst);

struct StepArgs {
  int64_t rows = 0;                  // active batch rows of this step
  const uint16_t* x = nullptr;       // bfloat16 input rows (row r at x + r * ldx), I elements each
  int64_t ldx = 0, I = 0;
  const uint16_t* wx = nullptr;      // pack_weights(W_ih) for [u0, u1)
  const uint16_t* const* h = nullptr;  // previous hidden rows, bfloat16 (H elements each)
  const uint16_t* wh = nullptr;      // pack_weights(W_hh) for [u0, u1)
  int64_t H = 0;
  // lstm_step::pack_bias (16-unit blocks, 4 groups) for [u0, u1) of a float32 [4H]: LSTM b_ih + b_hh; GRU
  // [b_ir + b_hr, b_iz + b_hz, b_in, b_hn]; RNN: b_ih + b_hh of units [u0, u0 + 64 blocks), zero past u1
  const float* bias = nullptr;
  bool relu = false;                 // RNN: relu, else tanh
  const float* const* cprev = nullptr;  // LSTM: previous cell rows, float32
  float* c = nullptr;                // LSTM: this step's cell rows, float32 (row r at c + r * H)
  uint16_t* hout = nullptr;          // this step's hidden rows, bfloat16 (row r at hout + r * H)
  // rows of 4H float32 for the backward (row r at ws + r * 4H), or nullptr: LSTM the activated gates [i f g o]; GRU
  // [r z n hn] as kern::gru_fwd_row writes them
  float* ws = nullptr;
  int64_t u0 = 0, u1 = 0;            // unit range; u0 a multiple of 16
};

void lstm(const StepArgs& a);
void gru(const StepArgs& a);
void rnn(const StepArgs& a);

}  // namespace step_bf16
}  // namespace seqfast
