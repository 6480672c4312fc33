// Fused additive (Bahdanau) attention for one decoder step, CPU.
//
// score[n,s] = v . tanh(qp[n] + kp[n,s]);  weights = masked softmax over s;  context = weights @ values.
// The plain formula materialises tanh(qp[:,None] + kp) as an [N,S,A] tensor and makes ~5 passes over it; here each
// batch row does one pass over kp (score = fused add + tanh + dot, never stored), a softmax over S scores, and one pass
// over values. Backward recomputes tanh instead of storing [N,S,A]. Parallel over the batch.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention/attention.h"
#include "attention/attention_vec.h"
#include "cpu/team.h"

namespace seqfast {
namespace {

namespace av = attn_vec;

template <class R, typename T>
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
  cpu::parallel_for(N, 1, [&](int64_t b, int64_t e, int) {
    for (int64_t n = b; n < e; ++n) {
      T* wr = W + n * S;
      T* cr = C + n * Dv;
      const bool* mr = mask ? mask + n * S : nullptr;
      for (int64_t s = 0; s < S; ++s)
        wr[s] = (mr && !mr[s]) ? ninf : R::score_row(Q + n * A, K + (n * S + s) * A, Vw, A);
      std::fill(cr, cr + Dv, T(0));
      const T mx = R::row_max(wr, S);
      if (mx == ninf) {  // every key masked (or S == 0): zero weights and context
        std::fill(wr, wr + S, T(0));
        continue;
      }
      const T inv = T(1) / R::row_exp_sub_sum(wr, S, mx);
      for (int64_t s = 0; s < S; ++s) {
        wr[s] *= inv;
        if (wr[s] != T(0)) R::axpy(cr, X + (n * S + s) * Dv, wr[s], Dv);
      }
    }
  });
}

template <class R, typename T>
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
  const int64_t nch = cpu::parallel_chunks(N, 1);
  std::vector<T> dv_part(static_cast<size_t>(nch) * A, T(0));  // dv is a sum over the batch: per-chunk partials
  cpu::parallel_for(N, 1, [&](int64_t b, int64_t e, int chunk) {
    T* dvp = dv_part.data() + chunk * A;
    std::vector<T> ds(S);
    for (int64_t n = b; n < e; ++n) {
      const T* wr = W + n * S;
      const T* gcr = GC + n * Dv;
      T sum = 0;
      for (int64_t s = 0; s < S; ++s) {
        ds[s] = GW[n * S + s] + R::dot(X + (n * S + s) * Dv, gcr, Dv);  // dL/dw_s
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
          R::bwd_row(Q + n * A, K + (n * S + s) * A, Vw, dsc, dk, dq, dvp, A);
        } else {
          std::fill(dk, dk + A, T(0));
        }
      }
    }
  });
  T* dV = dv.data_ptr<T>();
  std::fill(dV, dV + A, T(0));
  for (int64_t t = 0; t < nch; ++t)
    for (int64_t a = 0; a < A; ++a) dV[a] += dv_part[t * A + a];
}

// float64 and float32 run natively; bfloat16 / float16 compute in float32 (the op is memory-light per FLOP).
at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Shapes every entry checks before a kernel reads a raw pointer (RuntimeError naming the argument).
void check_inputs(const char* fn, const at::Tensor& qp, const at::Tensor& kp, const at::Tensor& v,
                  const at::Tensor& values) {
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor*>{"qp", &qp}, {"kp", &kp}, {"v", &v}, {"values", &values}}) {
    TORCH_CHECK(t->defined() && t->device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), fn, ": ", name, " must be floating point, got ",
                t->scalar_type());
  }
  TORCH_CHECK(kp.dim() == 3, fn, ": kp must be [N, S, A], got ", kp.sizes());
  const int64_t N = kp.size(0), S = kp.size(1), A = kp.size(2);
  TORCH_CHECK(qp.dim() == 2 && qp.size(0) == N && qp.size(1) == A, fn, ": qp must be [", N, ", ", A, "], got ",
              qp.sizes());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == A, fn, ": v must be [", A, "], got ", v.sizes());
  TORCH_CHECK(values.dim() == 3 && values.size(0) == N && values.size(1) == S, fn, ": values must be [", N, ", ", S,
              ", Dv], got ", values.sizes());
}

// The mask as a contiguous [N, S] bool tensor: broadcast from any shape that broadcasts to [N, S] ([1, S], [N, 1],
// [S]); anything else raises.
at::Tensor mask_rows(const char* fn, const std::optional<at::Tensor>& mask, int64_t N, int64_t S) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device().is_cpu() && m.dim() <= 2, fn, ": mask must be a CPU tensor broadcastable to [", N, ", ", S,
              "], got ", m.sizes());
  const bool ok = (m.dim() < 2 || m.size(0) == N || m.size(0) == 1) && (m.dim() < 1 || m.size(-1) == S || m.size(-1) == 1);
  TORCH_CHECK(ok, fn, ": mask must be broadcastable to [", N, ", ", S, "], got ", m.sizes());
  return m.to(at::kBool).expand({N, S}).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> additive_attention_forward(const at::Tensor& qp_, const at::Tensor& kp_,
                                                              const at::Tensor& v_, const at::Tensor& values_,
                                                              const std::optional<at::Tensor>& mask) {
  check_inputs("additive_attention_forward", qp_, kp_, v_, values_);
  const auto ct = compute_type(qp_.scalar_type());
  const at::Tensor qp = qp_.to(ct).contiguous(), kp = kp_.to(ct).contiguous(), v = v_.to(ct).contiguous();
  const at::Tensor values = values_.to(ct).contiguous();
  const int64_t N = kp.size(0), S = kp.size(1), Dv = values.size(2);
  const at::Tensor m = mask_rows("additive_attention_forward", mask, N, S);
  at::Tensor ctx = at::empty({N, Dv}, qp.options());
  at::Tensor w = at::empty({N, S}, qp.options());
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "seqfast_additive_attention_forward", [&] {
      av::with_rows([&](auto rows) {
        fwd_impl<decltype(rows), scalar_t>(qp, kp, v, values, m.defined() ? m.const_data_ptr<bool>() : nullptr, ctx, w);
      });
    });
  }
  const auto out_t = qp_.scalar_type();
  return {ctx.to(out_t), w.to(out_t)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_backward(
    const at::Tensor& grad_context, const at::Tensor& grad_weights, const at::Tensor& qp_, const at::Tensor& kp_,
    const at::Tensor& v_, const at::Tensor& values_, const std::optional<at::Tensor>& /*mask: encoded in weights*/,
    const at::Tensor& weights) {
  const char* fn = "additive_attention_backward";
  check_inputs(fn, qp_, kp_, v_, values_);
  const int64_t N = kp_.size(0), S = kp_.size(1), Dv = values_.size(2);
  TORCH_CHECK(weights.defined() && weights.sizes() == at::IntArrayRef({N, S}), fn, ": weights must be [", N, ", ", S,
              "], got ", weights.sizes());
  TORCH_CHECK(grad_weights.defined() && grad_weights.sizes() == at::IntArrayRef({N, S}), fn, ": grad_weights must be [",
              N, ", ", S, "], got ", grad_weights.sizes());
  TORCH_CHECK(grad_context.defined() && grad_context.sizes() == at::IntArrayRef({N, Dv}), fn,
              ": grad_context must be [", N, ", ", Dv, "], got ", grad_context.sizes());
  const auto ct = compute_type(qp_.scalar_type());
  const at::Tensor qp = qp_.to(ct).contiguous(), kp = kp_.to(ct).contiguous(), v = v_.to(ct).contiguous();
  const at::Tensor values = values_.to(ct).contiguous(), w = weights.to(ct).contiguous();
  const at::Tensor gc = grad_context.to(ct).contiguous(), gw = grad_weights.to(ct).contiguous();
  at::Tensor dqp = at::empty(qp.sizes(), qp.options()), dkp = at::empty(kp.sizes(), kp.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options()), dvalues = at::empty(values.sizes(), values.options());
  if (kp.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "seqfast_additive_attention_backward", [&] {
      av::with_rows(
          [&](auto rows) { bwd_impl<decltype(rows), scalar_t>(gc, gw, qp, kp, v, values, w, dqp, dkp, dv, dvalues); });
    });
  }
  const auto out_t = qp_.scalar_type();
  return {dqp.to(out_t), dkp.to(out_t), dv.to(out_t), dvalues.to(out_t)};
}

}  // namespace seqfast
