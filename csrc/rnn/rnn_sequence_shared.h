// What the sequence layers' translation units share (seqfast._C internal): the step schedule of a packed or padded
// layer, the previous-state rows of a step, and the summed biases (rnn_sequence.cpp: the fused layers;
// rnn_sequence_proj.cpp: the LSTM with a projection). Baseline ISA, ATen allowed.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace seqfast {
namespace seq {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Step schedule derived from batch_sizes.
struct Steps {
  int64_t T = 0;
  std::vector<int64_t> bs, off;
  bool reverse = false;
  // padded input: T steps of B rows each
  Steps(int64_t steps, int64_t B, bool rev) : T(steps), bs(steps, B), off(steps), reverse(rev) {
    for (int64_t t = 0; t < T; ++t) off[t] = t * B;
  }
  Steps(const Tensor& batch_sizes, bool rev) : reverse(rev) {
    Tensor b = batch_sizes.to(at::kLong).contiguous();
    T = b.numel();
    bs.resize(T);
    off.resize(T);
    const int64_t* p = b.const_data_ptr<int64_t>();
    int64_t o = 0;
    for (int64_t t = 0; t < T; ++t) {
      bs[t] = p[t];
      off[t] = o;
      o += p[t];
    }
  }
  // t of the p-th processed step
  int64_t at(int64_t p) const { return reverse ? T - 1 - p : p; }
  // Previous processed step of time t, or -1.
  int64_t prev(int64_t t) const {
    if (reverse) return t + 1 < T ? t + 1 : -1;
    return t - 1;
  }
  // Number of rows of step t whose previous state is a row of the previous processed step (the rest read h0).
  int64_t n_from_prev(int64_t t) const {
    const int64_t tp = prev(t);
    return tp < 0 ? 0 : std::min(bs[t], bs[tp]);
  }
  // Time of the last processed step of batch row b, or -1 if the row is never active.
  int64_t last_step(int64_t b) const {
    if (T == 0 || bs[0] <= b) return -1;
    if (reverse) return 0;
    int64_t len = 0;
    while (len < T && bs[len] > b) ++len;
    return len - 1;
  }
};

inline bool has(const OptTensor& b) { return b.has_value() && b->defined(); }

// Pointers to the previous-state rows of step t: rows [0, nprev) of the previous step in `buf`, the rest from init.
template <typename T>
inline const T* prev_row(const Steps& s, int64_t t, int64_t b, const T* buf, const T* init, int64_t H) {
  const int64_t tp = s.prev(t);
  if (tp >= 0 && b < s.bs[tp]) return buf + (s.off[tp] + b) * H;
  return init + b * H;
}

// [N,H] matrix of the previous state of every row (for dW_hh = dgates^T @ Hprev as one GEMM).
inline Tensor gather_prev(const Steps& s, const Tensor& buf, const Tensor& init) {
  const int64_t H = buf.size(1);
  Tensor out = at::empty_like(buf);
  const int64_t es = buf.element_size();
  const char* bp = static_cast<const char*>(buf.const_data_ptr());
  const char* ip = static_cast<const char*>(init.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t np = s.n_from_prev(t), tp = s.prev(t), bs = s.bs[t];
    if (np > 0) std::memcpy(op + s.off[t] * H * es, bp + s.off[tp] * H * es, np * H * es);
    if (bs > np) std::memcpy(op + (s.off[t] + np) * H * es, ip + np * H * es, (bs - np) * H * es);
  }
  return out;
}

// b_ih + b_hh (either may be absent: undefined when both are) in dtype `dt`. Same-dtype biases are summed in one
// loop rather than by ATen's add, whose dispatch costs about as much as a batch-1 step.
inline Tensor summed_bias(const OptTensor& b_ih, const OptTensor& b_hh, at::ScalarType dt) {
  if (!has(b_ih) || !has(b_hh)) return has(b_ih) ? b_ih->to(dt) : has(b_hh) ? b_hh->to(dt) : Tensor();
  if (b_ih->scalar_type() != dt || b_hh->scalar_type() != dt || !b_ih->is_contiguous() || !b_hh->is_contiguous())
    return b_ih->to(dt) + b_hh->to(dt);
  Tensor sum = at::empty(b_ih->sizes(), b_ih->options());
  AT_DISPATCH_FLOATING_TYPES(dt, "seqfast::summed_bias", [&] {
    const scalar_t* a = b_ih->const_data_ptr<scalar_t>();
    const scalar_t* b = b_hh->const_data_ptr<scalar_t>();
    scalar_t* o = sum.data_ptr<scalar_t>();
    for (int64_t i = 0; i < sum.numel(); ++i) o[i] = a[i] + b[i];
  });
  return sum;
}

}  // namespace seq
}  // namespace seqfast
