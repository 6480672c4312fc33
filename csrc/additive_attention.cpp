// Fused additive (Bahdanau) attention for one decoder step, CPU.
//
// score[n,s] = v . tanh(qp[n] + kp[n,s]);  weights = masked softmax over s;  context = weights @ values.
// The plain formula materialises tanh(qp[:,None] + kp) as an [N,S,A] tensor and makes ~5 passes over it; here each
// batch row does one pass over kp (score = fused add + tanh + dot, never stored), a softmax over S scores, and one pass
// over values. Backward recomputes tanh instead of storing [N,S,A]. Parallel over the batch.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"
#include "attention_vec.h"

namespace seqfast {
namespace {

namespace av = attn_vec;

SEQFAST_CLONES static float score_row(const float* qp, const float* kp, const float* v, int64_t A) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t a = 0; a < A; ++a) s += v[a] * av::fast_tanhf(qp[a] + kp[a]);
  return s;
}
static double score_row(const double* qp, const double* kp, const double* v, int64_t A) {
  double s = 0.0;
  for (int64_t a = 0; a < A; ++a) s += v[a] * std::tanh(qp[a] + kp[a]);
  return s;
}

using av::axpy;
using av::dot;

// For one (n, s): t = tanh(qp + kp); dkp = ds * v * (1 - t^2); dqp += dkp; dv += ds * t.
SEQFAST_CLONES static void bwd_row(const float* qp, const float* kp, const float* v, float ds, float* dkp, float* dqp,
                                   float* dv, int64_t A) {
#pragma omp simd
  for (int64_t a = 0; a < A; ++a) {
    const float t = av::fast_tanhf(qp[a] + kp[a]);
    const float g = ds * v[a] * (1.0f - t * t);
    dkp[a] = g;
    dqp[a] += g;
    dv[a] += ds * t;
  }
}
static void bwd_row(const double* qp, const double* kp, const double* v, double ds, double* dkp, double* dqp,
                    double* dv, int64_t A) {
  for (int64_t a = 0; a < A; ++a) {
    const double t = std::tanh(qp[a] + kp[a]);
    const double g = ds * v[a] * (1.0 - t * t);
    dkp[a] = g;
    dqp[a] += g;
    dv[a] += ds * t;
  }
}

template <typename T>
void fwd_impl(const at::Tensor& qp, const at::Tensor& kp, const at::Tensor& v, const at::Tensor& values,
              const bool* mask, at::Tensor& ctx, at::Tensor& w) {
  const int64_t N = kp.size(0), S = kp.size(1), A = kp.size(2), Dv = values.size(2);
  const T* Q = qp.const_data_ptr<T>();
  const T* K = kp.const_data_ptr<T>();
  const T* Vw = v.const_data_ptr<T>();
  const T* X = values.const_data_ptr<T>();
  T* C = ctx.data_ptr<T>();
  T* W = w.data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      T* wr = W + n * S;
      T* cr = C + n * Dv;
      const bool* mr = mask ? mask + n * S : nullptr;
      for (int64_t s = 0; s < S; ++s)
        wr[s] = (mr && !mr[s]) ? ninf : score_row(Q + n * A, K + (n * S + s) * A, Vw, A);
      std::fill(cr, cr + Dv, T(0));
      const T mx = av::row_max(wr, S);
      if (mx == ninf) {  // every key masked (or S == 0): zero weights and context
        std::fill(wr, wr + S, T(0));
        continue;
      }
      const T inv = T(1) / av::row_exp_sub_sum(wr, S, mx);
      for (int64_t s = 0; s < S; ++s) {
        wr[s] *= inv;
        if (wr[s] != T(0)) axpy(cr, X + (n * S + s) * Dv, wr[s], Dv);
      }
    }
  });
}

template <typename T>
void bwd_impl(const at::Tensor& gc, const at::Tensor& gw, const at::Tensor& qp, const at::Tensor& kp,
              const at::Tensor& v, const at::Tensor& values, const at::Tensor& w, at::Tensor& dqp, at::Tensor& dkp,
              at::Tensor& dv, at::Tensor& dvalues) {
  const int64_t N = kp.size(0), S = kp.size(1), A = kp.size(2), Dv = values.size(2);
  const T* GC = gc.const_data_ptr<T>();
  const T* GW = gw.const_data_ptr<T>();
  const T* Q = qp.const_data_ptr<T>();
  const T* K = kp.const_data_ptr<T>();
  const T* Vw = v.const_data_ptr<T>();
  const T* X = values.const_data_ptr<T>();
  const T* W = w.const_data_ptr<T>();
  T* dQ = dqp.data_ptr<T>();
  T* dK = dkp.data_ptr<T>();
  T* dX = dvalues.data_ptr<T>();
  const int64_t nth = at::get_num_threads();
  std::vector<T> dv_part(static_cast<size_t>(nth) * A, T(0));  // dv is a sum over the batch: per-thread partials
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    T* dvp = dv_part.data() + at::get_thread_num() * A;
    std::vector<T> ds(S);
    for (int64_t n = b; n < e; ++n) {
      const T* wr = W + n * S;
      const T* gcr = GC + n * Dv;
      T sum = 0;
      for (int64_t s = 0; s < S; ++s) {
        ds[s] = GW[n * S + s] + dot(X + (n * S + s) * Dv, gcr, Dv);  // dL/dw_s
        sum += wr[s] * ds[s];
      }
      T* dq = dQ + n * A;
      std::fill(dq, dq + A, T(0));
      for (int64_t s = 0; s < S; ++s) {
        const T dsc = wr[s] * (ds[s] - sum);  // softmax backward; masked keys have w = 0 -> 0
        T* dx = dX + (n * S + s) * Dv;
        for (int64_t c = 0; c < Dv; ++c) dx[c] = wr[s] * gcr[c];
        T* dk = dK + (n * S + s) * A;
        if (dsc != T(0)) {
          bwd_row(Q + n * A, K + (n * S + s) * A, Vw, dsc, dk, dq, dvp, A);
        } else {
          std::fill(dk, dk + A, T(0));
        }
      }
    }
  });
  T* dV = dv.data_ptr<T>();
  std::fill(dV, dV + A, T(0));
  for (int64_t t = 0; t < nth; ++t)
    for (int64_t a = 0; a < A; ++a) dV[a] += dv_part[t * A + a];
}

// float64 and float32 run natively; bfloat16 / float16 compute in float32 (the op is memory-light per FLOP).
at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> additive_attention_forward(const at::Tensor& qp_, const at::Tensor& kp_,
                                                              const at::Tensor& v_, const at::Tensor& values_,
                                                              const std::optional<at::Tensor>& mask) {
  const auto ct = compute_type(qp_.scalar_type());
  const at::Tensor qp = qp_.to(ct).contiguous(), kp = kp_.to(ct).contiguous(), v = v_.to(ct).contiguous();
  const at::Tensor values = values_.to(ct).contiguous();
  at::Tensor m;
  if (mask.has_value() && mask->defined()) m = mask->to(at::kBool).contiguous();
  const int64_t N = kp.size(0), S = kp.size(1), Dv = values.size(2);
  at::Tensor ctx = at::empty({N, Dv}, qp.options());
  at::Tensor w = at::empty({N, S}, qp.options());
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "seqfast_additive_attention_forward", [&] {
      fwd_impl<scalar_t>(qp, kp, v, values, m.defined() ? m.const_data_ptr<bool>() : nullptr, ctx, w);
    });
  }
  const auto out_t = qp_.scalar_type();
  return {ctx.to(out_t), w.to(out_t)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_backward(
    const at::Tensor& grad_context, const at::Tensor& grad_weights, const at::Tensor& qp_, const at::Tensor& kp_,
    const at::Tensor& v_, const at::Tensor& values_, const std::optional<at::Tensor>& /*mask: encoded in weights*/,
    const at::Tensor& weights) {
  const auto ct = compute_type(qp_.scalar_type());
  const at::Tensor qp = qp_.to(ct).contiguous(), kp = kp_.to(ct).contiguous(), v = v_.to(ct).contiguous();
  const at::Tensor values = values_.to(ct).contiguous(), w = weights.to(ct).contiguous();
  const at::Tensor gc = grad_context.to(ct).contiguous(), gw = grad_weights.to(ct).contiguous();
  at::Tensor dqp = at::empty(qp.sizes(), qp.options()), dkp = at::empty(kp.sizes(), kp.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options()), dvalues = at::empty(values.sizes(), values.options());
  if (kp.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "seqfast_additive_attention_backward", [&] {
      bwd_impl<scalar_t>(gc, gw, qp, kp, v, values, w, dqp, dkp, dv, dvalues);
    });
  }
  const auto out_t = qp_.scalar_type();
  return {dqp.to(out_t), dkp.to(out_t), dv.to(out_t), dvalues.to(out_t)};
}

}  // namespace seqfast
