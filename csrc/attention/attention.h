// C++ CPU kernels for attention (seqfast._C). Declarations only; see attention.cpp / additive_attention.cpp.
// Every argument is checked (shape, dtype, device) before a kernel reads it; bad input raises RuntimeError.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace seqfast {

// Flash-style scaled dot-product attention forward.
//   q [N,Hq,Lq,D], k [N,Hk,Lk,D], v [N,Hk,Lk,Dv] (Hq % Hk == 0; query head h reads kv head h / (Hq/Hk)),
//   bias: optional additive mask, q's dtype, any strides (0-strides from expand() are fine), shape [N,Hq,Lq,Lk].
//   is_causal: top-left alignment (query i sees keys j <= i).
// Returns (out [N,Hq,Lq,Dv] in q's dtype, lse [N,Hq,Lq]).
//   lse dtype: float64 for float64 inputs, float32 otherwise. A fully masked row (every key -inf or causally
//   masked) gives out 0 and lse = -inf, the contract of seqfast/reference/attention.py. NaN/Inf in q, k, v or bias
//   reach the output as in torch (NaN); only rows whose every key is masked give 0.
std::tuple<at::Tensor, at::Tensor> sdpa_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& bias, bool is_causal,
                                                double scale);

// Whether bfloat16 calls (other than the forward decoder step) compute in float32 on upcast copies here, the results
// rounded to bfloat16 once (attention.cpp: bf16_upcasts): where the own float32 blocks run, not on AMX CPUs.
bool sdpa_bf16_upcasts();

// Flash-style backward. out / lse are what sdpa_forward returned (a fully masked row, lse = -inf, gets 0 grads).
// Returns (dq, dk [N,Hk,Lk,D], dv [N,Hk,Lk,Dv]),
// all in q's dtype; for GQA dk/dv are summed over the query heads of each group. fold_kv, where k and v are the same
// tensor: dk holds dK + dV and dv is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const std::optional<at::Tensor>& bias, bool is_causal,
                                                             double scale, bool fold_kv = false);

// Fused additive (Bahdanau) attention, one decoder step.
//   qp [N,A], kp [N,S,A], v [A], values [N,S,Dv], mask [N,S] bool (True = keep) or None.
// Returns (context [N,Dv], weights [N,S]). A row with every key masked gives zero context and zero weights.
std::tuple<at::Tensor, at::Tensor> additive_attention_forward(const at::Tensor& qp, const at::Tensor& kp,
                                                              const at::Tensor& v, const at::Tensor& values,
                                                              const std::optional<at::Tensor>& mask);

// Backward of the above: returns (dqp [N,A], dkp [N,S,A], dv [A], dvalues [N,S,Dv]).
// grad_weights must be defined (zeros if unused). tanh is recomputed, not stored.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_backward(
    const at::Tensor& grad_context, const at::Tensor& grad_weights, const at::Tensor& qp, const at::Tensor& kp,
    const at::Tensor& v, const at::Tensor& values, const std::optional<at::Tensor>& mask,
    const at::Tensor& weights);

}  // namespace seqfast
