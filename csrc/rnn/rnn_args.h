// Argument checks of the RNN kernel entries (seqfast._C internal). The kernels read tensors through raw pointers
// with a row stride equal to the row length, so every entry checks each tensor's device, dtype and shape
// (RuntimeError naming the argument, as torch raises) and makes it contiguous: a strided or expand()-ed bias
// (stride 0) is materialised, never read as if it were dense. The Python layer validates first; this is the last
// line before memory is read.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>

namespace seqfast {
namespace rnn_args {

// Any size of that dimension.
constexpr int64_t kAny = -1;

// t defined, on the CPU, of dtype `dtype` (Undefined: any floating type) and of `sizes` (kAny: any); returned
// contiguous.
inline at::Tensor need(const char* fn, const char* name, const at::Tensor& t, std::initializer_list<int64_t> sizes,
                       at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  if (dtype == at::ScalarType::Undefined) {
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", name, " must be floating point, got ", t.scalar_type());
  } else {
    TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must have dtype ", dtype, " (as the input), got ",
                t.scalar_type());
  }
  bool ok = t.dim() == int64_t(sizes.size());
  int64_t d = 0;
  for (int64_t s : sizes) {  // (d advances past a kAny too)
    ok = ok && (s == kAny || t.size(d) == s);
    ++d;
  }
  if (!ok) {
    std::string want = "[";
    d = 0;
    for (int64_t s : sizes) want += (d++ ? ", " : "") + (s == kAny ? std::string("*") : std::to_string(s));
    TORCH_CHECK(false, fn, ": ", name, " must have shape ", want, "], got ", t.sizes());
  }
  return t.contiguous();
}

// An optional bias: absent / undefined stays absent; otherwise [n] of `dtype`, contiguous.
inline std::optional<at::Tensor> need_opt(const char* fn, const char* name, const std::optional<at::Tensor>& t,
                                          int64_t n, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return need(fn, name, *t, {n}, dtype);
}

// Packed-sequence batch sizes: 1-D int64 CPU, every size in [0, B], non-increasing, summing to N (the rows of x).
inline at::Tensor need_batch_sizes(const char* fn, const at::Tensor& bs, int64_t B, int64_t N) {
  TORCH_CHECK(bs.defined() && bs.device().is_cpu() && bs.dim() == 1 && bs.scalar_type() == at::kLong, fn,
              ": batch_sizes must be a 1-D int64 CPU tensor, got ", bs.defined() ? bs.sizes() : at::IntArrayRef{});
  const at::Tensor c = bs.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  int64_t sum = 0;
  for (int64_t t = 0; t < c.numel(); ++t) {
    TORCH_CHECK(p[t] >= 0 && p[t] <= B, fn, ": batch_sizes[", t, "] = ", p[t], " is outside [0, ", B,
                "] (the rows of h0)");
    TORCH_CHECK(t == 0 || p[t] <= p[t - 1], fn, ": batch_sizes must be non-increasing, got ", p[t - 1 >= 0 ? t - 1 : 0],
                " then ", p[t], " at step ", t);
    sum += p[t];
  }
  TORCH_CHECK(sum == N, fn, ": batch_sizes sum to ", sum, " but the input has ", N, " rows");
  return c;
}

}  // namespace rnn_args
}  // namespace seqfast
