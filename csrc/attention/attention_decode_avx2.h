// Decoder step (one query row per head) for x86-64 CPUs with AVX2 + FMA (seqfast._C internal;
// attention_decode_avx2.cpp). attention.cpp's decode_kernel calls it on every such CPU, AVX-512 ones included.
//
// The step is memory-bound: each K and V element is read once and used G times (G query heads per kv head), about
// 2 FLOP per loaded element. The generic row helpers (attention_rows.inc) spent more time in their horizontal
// reductions (one per key and head) and in reloading the output row per 4 keys than in reading K and V: on a 2-core
// Zen 3 they reached 39% of a plain read of the same bytes at 256 keys (K and V in L3) and 74-82% at 1024-4096
// (from memory). Here:
//   * scores of 8 keys at a time: 8 row dot products in 8 accumulators, reduced together by one hadd tree into one
//     vector of 8 scores (the 8-key block, 2 KB at D 64, stays in L1 across the G heads);
//   * an exact softmax over the kept scores (the whole key range fits `scores`: no online rescaling);
//   * P V with the output row in registers: 64 columns (8 accumulators) per pass over the keys, one broadcast and 8
//     FMAs per key.
// bfloat16 K / V / mask are read as their raw bits (uint16_t) and widened in registers, so a bfloat16 step streams
// half the bytes of a float32 one; the math is float32 either way.
// Callers check available() first. Single-threaded, no allocation; no ATen here (the rule of cpu/isa.h).
#pragma once

#include <cstdint>

namespace seqfast {
namespace attn_avx2 {

// AVX2 + FMA present (cpu/isa.h) and config().avx2_decode.
bool available();

// The G query heads of one kv head against its keys [0, kv_end). E: the stored type of K, V and the mask (float, or
// uint16_t holding bfloat16 bits).
template <typename E>
struct DecodeHead {
  const float* q = nullptr;   // query head g at q + g * sq (D floats; a bfloat16 query is widened by the caller)
  int64_t sq = 0, D = 0;
  const E* k = nullptr;       // key j at k + j * sk (D elements)
  int64_t sk = 0;
  const E* v = nullptr;       // value j at v + j * sv (Dv elements)
  int64_t sv = 0, Dv = 0;
  int64_t kv_end = 0;         // keys [0, kv_end) are visited
  float scale = 1.f;
  int64_t G = 1;              // query heads sharing this kv head
  const E* bias = nullptr;    // additive mask of head g, key j at bias + g * bsg + j * bsj, or nullptr
  int64_t bsg = 0, bsj = 0;
  float* out = nullptr;       // head g at out + g * so (Dv floats); 0 for a fully masked head, NaN if its scores are
  int64_t so = 0;
  float* lse = nullptr;       // head g at lse[g]; -inf for a fully masked head (NaN as above)
  bool prefetch = true;       // prefetch K and V rows ahead of the reads: for calls whose K and V come from memory
};

// scores: G * kv_end floats of scratch.
void decode_head(const DecodeHead<float>& a, float* scores);
void decode_head(const DecodeHead<uint16_t>& a, float* scores);

}  // namespace attn_avx2
}  // namespace seqfast
