// AVX-512 forms of the Elman RNN, LSTM and GRU rows' pointwise updates (seqfast._C internal; pointwise_avx512.cpp), for x86-64
// CPUs with AVX-512. rnn/rnn_pointwise.h's rows run on ATen's AVX2 vectors, whose exp is an out-of-line call; here
// 16 lanes and the inline exp of cpu/avx512_math.h. Why: at RNNCell B64 H64 the AVX2 update (tanh per element) was 15%
// of the step's samples (perf, Zen 5), the step itself a few microseconds, fixed-cost bound against ONNX Runtime.
//
// Single-threaded, no allocation, no ATen headers (the rule of cpu/isa.h). Callers check available() first.
#pragma once

#include <cstdint>

namespace seqfast {
namespace pointwise512 {

// AVX-512 present and config().avx512_pointwise (SEQFAST_CPU_NO_AVX512_POINTWISE unset).
bool available();

// hy[k] = act(pre[k] + b1[k] + b2[k]) for k in [k0, k1) (b1 / b2 may be null; hy may alias pre): act = tanh, or relu
// with NaN propagated as torch's relu propagates it.
void rnn_fwd_row(const float* pre, const float* b1, const float* b2, float* hy, bool relu, int64_t k0, int64_t k1);

// The LSTM cell update for units [k0, k1) of one row: g holds the pre-activations [i f g o] (4H; b1 / b2, optional,
// added here) and is left holding the activated gates; cy = f cp + i g, hy = o tanh(cy) (avx512::lstm_update, the
// fused LSTM step's own update).
void lstm_fwd_row(float* g, const float* b1, const float* b2, const float* cp, float* cy, float* hy, int64_t H,
                  int64_t k0, int64_t k1);

// The GRU update for units [k0, k1) of one row (rnn/rnn_pointwise.h: gru_fwd_row, whose layout and results it
// computes): gi the x-part pre-activations [r z n] (3H), gh the h-part W_hh h [r z n] (3H; its r and z not read when
// summed_rz: gi's already hold both parts), optional biases bih / bhh, hp the previous h; ws receives [r z n hn]
// (nullptr: not stored).
void gru_fwd_row(const float* gi, const float* bih, const float* gh, const float* bhh, const float* hp, float* hy,
                 float* ws, int64_t H, int64_t k0, int64_t k1, bool summed_rz);

}  // namespace pointwise512
}  // namespace seqfast
