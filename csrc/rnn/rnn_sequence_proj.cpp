// One LSTM layer with a projection (torch.nn.LSTM proj_size > 0), one direction over a whole sequence, forward and
// backward (rnn.h: lstm_proj_layer_forward / _backward, with the layout).
//
// Why its own loop: torch's CPU LSTM has no oneDNN path with a projection and runs its generic one (per step: the
// gate GEMM, five pointwise ops, the projection GEMM, each an ATen op), and seqfast's fused sequence kernels keep
// the hidden state at the gates' width. Here the input projection of all steps is one GEMM, each step two GEMMs on
// seqfast's kernels (step_product) around one fused pointwise pass (kern::lstm_fwd_row), and the backward forms
// every weight gradient in one GEMM over all steps. float32 / float64.
#include "rnn/rnn.h"
#include "rnn/rnn_args.h"
#include "rnn/rnn_pointwise.h"
#include "rnn/rnn_sequence_shared.h"
#include "cpu/gemm.h"
#include "cpu/sgemm_wt.h"

#include <ATen/Dispatch.h>
#include <vector>

namespace seqfast {
namespace {

using rnn_args::kAny;
using rnn_args::need;
using rnn_args::need_batch_sizes;
using rnn_args::need_opt;
using seq::gather_prev;
using seq::prev_row;
using seq::Steps;

// The operands both entries take, checked (rnn_args: RuntimeError naming the argument) and contiguous.
struct Operands {
  Tensor x, h0, c0, w_ih, w_hh, w_hr;
  at::ScalarType dt;
  int64_t N, I, B, H, P;
  Operands(const char* fn, const Tensor& x_, const Tensor& h0_, const Tensor& c0_, const Tensor& w_ih_,
           const Tensor& w_hh_, const Tensor& w_hr_) {
    x = need(fn, "x", x_, {kAny, kAny}, at::ScalarType::Undefined);
    dt = x.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, fn, ": x must be float32 or float64, got ", dt);
    N = x.size(0);
    I = x.size(1);
    c0 = need(fn, "c0", c0_, {kAny, kAny}, dt);
    B = c0.size(0);
    H = c0.size(1);
    w_hr = need(fn, "w_hr", w_hr_, {kAny, H}, dt);
    P = w_hr.size(0);
    h0 = need(fn, "h0", h0_, {B, P}, dt);
    w_ih = need(fn, "w_ih", w_ih_, {4 * H, I}, dt);
    w_hh = need(fn, "w_hh", w_hh_, {4 * H, P}, dt);
  }
};

// One step's product c[M, N] (= or +=) a[M, K] @ w^T, w a torch weight [N, K]: float32 at the rows the broadcast
// form takes (gemm::wt_takes) runs it, the weight read in place; else gemm::linear_out. Why: at 32 rows linear_out
// packed the weight on every call for these shapes (W_hr [256, 1024]: 75.6 us against 39.8 in place, Zen 5, 2
// threads).
void step_product(Tensor& c, const Tensor& a, const Tensor& w, bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1), N = c.size(1);
  if (M == 0) return;
  if (c.scalar_type() == at::kFloat && gemm::wt_takes(M, N, K)) {
    const gemm::WtProduct p{a.const_data_ptr<float>(), K, K, w.const_data_ptr<float>(), K, 1};
    if (gemm::wt_parallel(M, N, p, gemm::WtProduct{}, accumulate ? 1.f : 0.f, c.data_ptr<float>(), c.stride(0),
                          nullptr))
      return;
  }
  gemm::linear_out(c, a, w, accumulate);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_proj_layer_forward(
    const Tensor& x_, const Tensor& batch_sizes_, const Tensor& h0_, const Tensor& c0_, const Tensor& w_ih_,
    const Tensor& w_hh_, const OptTensor& b_ih_, const OptTensor& b_hh_, const Tensor& w_hr_, bool reverse) {
  const char* fn = "lstm_proj_layer_forward";
  const Operands a(fn, x_, h0_, c0_, w_ih_, w_hh_, w_hr_);
  const Tensor &x = a.x, &h0 = a.h0, &c0 = a.c0, &w_ih = a.w_ih, &w_hh = a.w_hh, &w_hr = a.w_hr;
  const auto dt = a.dt;
  const int64_t N = a.N, B = a.B, H = a.H, P = a.P;
  const auto b_ih = need_opt(fn, "b_ih", b_ih_, 4 * H, dt), b_hh = need_opt(fn, "b_hh", b_hh_, 4 * H, dt);
  const Tensor batch_sizes = need_batch_sizes(fn, batch_sizes_, B, N);
  kern::check_cpu();
  const Steps st(batch_sizes, reverse);
  // the input projection of every step in one GEMM, both biases folded in
  const Tensor bias = seq::summed_bias(b_ih, b_hh, dt);
  Tensor gates = gemm::mm(x, w_ih.t(), bias.defined() ? OptTensor(bias) : OptTensor()).contiguous();  // rows by pointer
  Tensor out = at::empty({N, P}, x.options()), cs = at::empty({N, H}, x.options()), hs = at::empty({N, H}, x.options());
  Tensor h = h0.clone(), c = c0.clone();
  AT_DISPATCH_FLOATING_TYPES(dt, "seqfast::lstm_proj_layer_forward", [&] {
    using T = scalar_t;
    for (int64_t s = 0; s < st.T; ++s) {
      const int64_t t = st.at(s), off = st.off[t], bs = st.bs[t];
      if (bs == 0) continue;
      Tensor g = gates.narrow(0, off, bs);
      step_product(g, h.narrow(0, 0, bs), w_hh, true);
      T* gp = g.data_ptr<T>();
      const T* cp = c.const_data_ptr<T>();
      T* cyp = cs.data_ptr<T>() + off * H;
      T* hyp = hs.data_ptr<T>() + off * H;
      kern::par_rows(bs, 8 * H, [&](int64_t r0, int64_t r1) {
        for (int64_t b = r0; b < r1; ++b)
          kern::lstm_fwd_row<T>(gp + b * 4 * H, nullptr, nullptr, cp + b * H, cyp + b * H, hyp + b * H, H, 0, H);
      });
      c.narrow(0, 0, bs).copy_(cs.narrow(0, off, bs));
      Tensor o = out.narrow(0, off, bs);
      step_product(o, hs.narrow(0, off, bs), w_hr, false);
      h.narrow(0, 0, bs).copy_(o);
    }
  });
  return {out, h, c, gates, cs, hs};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_proj_layer_backward(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& x_,
    const Tensor& batch_sizes_, const Tensor& h0_, const Tensor& c0_, const Tensor& w_ih_, const Tensor& w_hh_,
    const Tensor& w_hr_, const Tensor& out_, const Tensor& gates_, const Tensor& cs_, const Tensor& hs_, bool reverse,
    bool need_dx, bool need_dw_ih, bool need_dw_hh, bool need_dw_hr) {
  const char* fn = "lstm_proj_layer_backward";
  const Operands a(fn, x_, h0_, c0_, w_ih_, w_hh_, w_hr_);
  const Tensor &x = a.x, &h0 = a.h0, &c0 = a.c0, &w_ih = a.w_ih, &w_hh = a.w_hh, &w_hr = a.w_hr;
  const auto dt = a.dt;
  const int64_t N = a.N, B = a.B, H = a.H, P = a.P;
  const Tensor grad_out = need(fn, "grad_out", grad_out_, {N, P}, dt);
  const Tensor grad_hn = need(fn, "grad_hn", grad_hn_, {B, P}, dt), grad_cn = need(fn, "grad_cn", grad_cn_, {B, H}, dt);
  const Tensor out = need(fn, "out", out_, {N, P}, dt), gates = need(fn, "gates", gates_, {N, 4 * H}, dt);
  const Tensor cs = need(fn, "cs", cs_, {N, H}, dt), hs = need(fn, "hs", hs_, {N, H}, dt);
  const Tensor batch_sizes = need_batch_sizes(fn, batch_sizes_, B, N);
  kern::check_cpu();
  const Steps st(batch_sizes, reverse);
  Tensor dr = grad_hn.clone(), dc = grad_cn.clone();  // running gradients of the state rows
  Tensor dgates = at::empty({N, 4 * H}, x.options()), dout = at::empty({N, P}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "seqfast::lstm_proj_layer_backward", [&] {
    using T = scalar_t;
    for (int64_t s = st.T - 1; s >= 0; --s) {  // the forward's steps, last first
      const int64_t t = st.at(s), off = st.off[t], bs = st.bs[t];
      if (bs == 0) continue;
      // the gradient of this step's projected output: from later steps (dr) and from the layer's output
      Tensor drt = dout.narrow(0, off, bs);
      at::add_out(drt, dr.narrow(0, 0, bs), grad_out.narrow(0, off, bs));
      // (products with the weights row-major: gemm::mm was the fastest entry at 8-64 rows, 1.0-2.0x matmul_out)
      const Tensor dht = gemm::mm(drt, w_hr).contiguous();  // through the projection (rows read by pointer)
      const T* gp = gates.const_data_ptr<T>() + off * 4 * H;
      const T* csp = cs.const_data_ptr<T>();
      const T* c0p = c0.const_data_ptr<T>();
      const T* cyp = csp + off * H;
      const T* dhp = dht.const_data_ptr<T>();
      T* dcp = dc.data_ptr<T>();
      T* dgp = dgates.data_ptr<T>() + off * 4 * H;
      kern::par_rows(bs, 8 * H, [&](int64_t r0, int64_t r1) {
        for (int64_t b = r0; b < r1; ++b)
          kern::lstm_bwd_row<T>(gp + b * 4 * H, prev_row(st, t, b, csp, c0p, H), cyp + b * H, dhp + b * H, nullptr,
                                dcp + b * H, dgp + b * 4 * H, dcp + b * H, H, 0, H);  // (the cell it started from)
      });
      dr.narrow(0, 0, bs).copy_(gemm::mm(dgates.narrow(0, off, bs), w_hh));  // to the state this step started from
    }
  });
  // rows a reversed packed sequence starts late keep their h0 / c0 gradient in dr / dc from their first step on
  Tensor dx = need_dx ? gemm::mm(dgates, w_ih) : Tensor();
  Tensor dw_ih = need_dw_ih ? gemm::mm(dgates.t(), x) : Tensor();
  Tensor dw_hh = need_dw_hh ? gemm::mm(dgates.t(), gather_prev(st, out, h0)) : Tensor();
  Tensor dw_hr = need_dw_hr ? gemm::mm(dout.t(), hs) : Tensor();
  return {dx, dr, dc, dw_ih, dw_hh, dgates.sum(0), dw_hr};
}

}  // namespace seqfast
