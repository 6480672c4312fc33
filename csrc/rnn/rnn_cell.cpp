// RNN cell steps (LSTM / GRU / Elman) for CPU. Forward: for small batches the gate pre-activations come from our
// own GEMV (both x W_ih^T and h W_hh^T accumulated in one pass over the weight rows), fused with bias, activations
// and state update inside one (optionally parallel) region over hidden units; for larger batches GEMMs into the
// gate buffer (gemm::linear_out: the own AVX2 kernel or BLAS) followed by one fused pointwise pass. Backward: one
// fused pointwise pass for the gate derivatives, then the GEMMs through gemm::mm (the own AVX2 kernels or ATen).
#include "rnn/rnn.h"
#include "rnn/rnn_args.h"
#include "rnn/rnn_pointwise.h"
#include "cpu/gemm.h"

#include <ATen/Dispatch.h>
#include <array>

namespace seqfast {

namespace {

using kern::kMaxSmallB;

template <typename T>
void lstm_cell_fwd_impl(const Tensor& x, const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
                        const T* b1, const T* b2, Tensor& hy, Tensor& cy, Tensor& gates) {
  const int64_t B = x.size(0), I = x.size(1), H = hx.size(1);
  if (B == 0 || H == 0) return;
  T* g = gates.data_ptr<T>();
  const T* c = cx.const_data_ptr<T>();
  T* hyp = hy.data_ptr<T>();
  T* cyp = cy.data_ptr<T>();
  if (kern::use_small(B)) {
    std::array<const T*, kMaxSmallB> xr, hr;
    std::array<T*, kMaxSmallB> gr;
    for (int64_t b = 0; b < B; ++b) {
      xr[b] = x.const_data_ptr<T>() + b * I;
      hr[b] = hx.const_data_ptr<T>() + b * H;
      gr[b] = g + b * 4 * H;
    }
    const T* wi = w_ih.const_data_ptr<T>();
    const T* wh = w_hh.const_data_ptr<T>();
    kern::par_units(H, B * 4 * H * (I + H), [&](int64_t k0, int64_t k1) {
      for (int64_t q = 0; q < 4; ++q)
        kern::gemv<T>(B, xr.data(), wi, I, hr.data(), wh, H, gr.data(), q * H + k0, q * H + k1, false);
      for (int64_t b = 0; b < B; ++b)
        kern::lstm_fwd_row<T>(g + b * 4 * H, b1, b2, c + b * H, cyp + b * H, hyp + b * H, H, k0, k1);
    });
  } else {
    gemm::linear_out(gates, x, w_ih, false);
    gemm::linear_out(gates, hx, w_hh, true);
    kern::par_rows(B, 64 * H, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b)
        kern::lstm_fwd_row<T>(g + b * 4 * H, b1, b2, c + b * H, cyp + b * H, hyp + b * H, H, 0, H);
    });
  }
}

template <typename T>
void gru_cell_fwd_impl(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const T* bih,
                       const T* bhh, Tensor& hy, Tensor& ws) {
  const int64_t B = x.size(0), I = x.size(1), H = hx.size(1);
  if (B == 0 || H == 0) return;
  // gi/gh pre-activations: [B, 6H] scratch, gi = cols [0,3H), gh = [3H,6H).
  Tensor pre = at::empty({B, 6 * H}, x.options());
  T* pp = pre.data_ptr<T>();
  const T* h = hx.const_data_ptr<T>();
  T* hyp = hy.data_ptr<T>();
  T* wsp = ws.data_ptr<T>();
  if (kern::use_small(B)) {
    std::array<const T*, kMaxSmallB> xr, hr;
    std::array<T*, kMaxSmallB> gir, ghr;
    for (int64_t b = 0; b < B; ++b) {
      xr[b] = x.const_data_ptr<T>() + b * I;
      hr[b] = h + b * H;
      gir[b] = pp + b * 6 * H;
      ghr[b] = pp + b * 6 * H + 3 * H;
    }
    const T* wi = w_ih.const_data_ptr<T>();
    const T* wh = w_hh.const_data_ptr<T>();
    kern::par_units(H, B * 3 * H * (I + H), [&](int64_t k0, int64_t k1) {
      for (int64_t q = 0; q < 3; ++q) {
        kern::gemv<T>(B, xr.data(), wi, I, nullptr, nullptr, 0, gir.data(), q * H + k0, q * H + k1, false);
        kern::gemv<T>(B, hr.data(), wh, H, nullptr, nullptr, 0, ghr.data(), q * H + k0, q * H + k1, false);
      }
      for (int64_t b = 0; b < B; ++b)
        kern::gru_fwd_row<T>(pp + b * 6 * H, bih, pp + b * 6 * H + 3 * H, bhh, h + b * H, hyp + b * H,
                             wsp + b * 4 * H, H, k0, k1);
    });
  } else {
    { Tensor gi = pre.narrow(1, 0, 3 * H); gemm::linear_out(gi, x, w_ih, false); }
    { Tensor gh = pre.narrow(1, 3 * H, 3 * H); gemm::linear_out(gh, hx, w_hh, false); }
    kern::par_rows(B, 64 * H, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b)
        kern::gru_fwd_row<T>(pp + b * 6 * H, bih, pp + b * 6 * H + 3 * H, bhh, h + b * H, hyp + b * H,
                             wsp + b * 4 * H, H, 0, H);
    });
  }
}

template <typename T>
void rnn_cell_fwd_impl(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const T* b1,
                       const T* b2, bool relu, Tensor& hy) {
  const int64_t B = x.size(0), I = x.size(1), H = hx.size(1);
  if (B == 0 || H == 0) return;
  T* y = hy.data_ptr<T>();
  if (kern::use_small(B)) {
    std::array<const T*, kMaxSmallB> xr, hr;
    std::array<T*, kMaxSmallB> yr;
    for (int64_t b = 0; b < B; ++b) {
      xr[b] = x.const_data_ptr<T>() + b * I;
      hr[b] = hx.const_data_ptr<T>() + b * H;
      yr[b] = y + b * H;
    }
    const T* wi = w_ih.const_data_ptr<T>();
    const T* wh = w_hh.const_data_ptr<T>();
    kern::par_units(H, B * H * (I + H), [&](int64_t k0, int64_t k1) {
      kern::gemv<T>(B, xr.data(), wi, I, hr.data(), wh, H, yr.data(), k0, k1, false);
      for (int64_t b = 0; b < B; ++b) kern::rnn_fwd_row<T>(y + b * H, b1, b2, y + b * H, relu, k0, k1);
    });
  } else {
    gemm::linear_out(hy, x, w_ih, false);
    gemm::linear_out(hy, hx, w_hh, true);
    kern::par_rows(B, 16 * H, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b) kern::rnn_fwd_row<T>(y + b * H, b1, b2, y + b * H, relu, 0, H);
    });
  }
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward_impl(const Tensor& x, const Tensor& hx, const Tensor& cx,
                                                     const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                     const OptTensor& b_hh) {
  kern::check_cpu();
  const int64_t B = x.size(0), H = hx.size(1);
  Tensor hy = at::empty({B, H}, x.options());
  Tensor cy = at::empty({B, H}, x.options());
  Tensor gates = at::empty({B, 4 * H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::lstm_cell_forward", [&] {
    lstm_cell_fwd_impl<scalar_t>(x, hx, cx, w_ih, w_hh, kern::opt_ptr<scalar_t>(b_ih),
                                 kern::opt_ptr<scalar_t>(b_hh), hy, cy, gates);
  });
  return {hy, cy, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward_impl(
    const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& x, const Tensor& hx, const Tensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates, const Tensor& cy) {
  kern::check_cpu();
  const int64_t B = x.size(0), H = hx.size(1);
  Tensor dg = at::empty({B, 4 * H}, x.options());
  Tensor dcx = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::lstm_cell_backward", [&] {
    using T = scalar_t;
    const T* g = gates.const_data_ptr<T>();
    const T* c = cx.const_data_ptr<T>();
    const T* cyp = cy.const_data_ptr<T>();
    const T* dh = grad_hy.const_data_ptr<T>();
    const T* dc = grad_cy.const_data_ptr<T>();
    T* dgp = dg.data_ptr<T>();
    T* dcxp = dcx.data_ptr<T>();
    kern::par_rows(B, 64 * H, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b)
        kern::lstm_bwd_row<T>(g + b * 4 * H, c + b * H, cyp + b * H, dh + b * H, nullptr, dc + b * H,
                              dgp + b * 4 * H, dcxp + b * H, H, 0, H);
    });
  });
  return {gemm::mm(dg, w_ih), gemm::mm(dg, w_hh), dcx, gemm::mm(dg.t(), x), gemm::mm(dg.t(), hx), dg.sum(0)};
}

std::tuple<Tensor, Tensor> gru_cell_forward_impl(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                                            const OptTensor& b_ih, const OptTensor& b_hh) {
  kern::check_cpu();
  const int64_t B = x.size(0), H = hx.size(1);
  Tensor hy = at::empty({B, H}, x.options());
  Tensor ws = at::empty({B, 4 * H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::gru_cell_forward", [&] {
    gru_cell_fwd_impl<scalar_t>(x, hx, w_ih, w_hh, kern::opt_ptr<scalar_t>(b_ih), kern::opt_ptr<scalar_t>(b_hh), hy,
                                ws);
  });
  return {hy, ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_cell_backward_impl(const Tensor& grad_hy, const Tensor& x,
                                                                             const Tensor& hx, const Tensor& w_ih,
                                                                             const Tensor& w_hh, const Tensor& ws) {
  kern::check_cpu();
  const int64_t B = x.size(0), H = hx.size(1);
  Tensor dgi = at::empty({B, 3 * H}, x.options());
  Tensor dgh = at::empty({B, 3 * H}, x.options());
  Tensor dhx = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::gru_cell_backward", [&] {
    using T = scalar_t;
    const T* dh = grad_hy.const_data_ptr<T>();
    const T* h = hx.const_data_ptr<T>();
    const T* w = ws.const_data_ptr<T>();
    T* dgip = dgi.data_ptr<T>();
    T* dghp = dgh.data_ptr<T>();
    T* dhxp = dhx.data_ptr<T>();
    kern::par_rows(B, 32 * H, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b)
        kern::gru_bwd_row<T>(dh + b * H, nullptr, h + b * H, w + b * 4 * H, dgip + b * 3 * H, dghp + b * 3 * H,
                             dhxp + b * H, H, 0, H);
    });
  });
  dhx.addmm_(dgh, w_hh);
  return {gemm::mm(dgi, w_ih), dhx, gemm::mm(dgi.t(), x), gemm::mm(dgh.t(), hx), dgi.sum(0), dgh.sum(0)};
}

Tensor rnn_cell_forward_impl(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                        const OptTensor& b_ih, const OptTensor& b_hh, bool relu) {
  kern::check_cpu();
  Tensor hy = at::empty({x.size(0), hx.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::rnn_cell_forward", [&] {
    rnn_cell_fwd_impl<scalar_t>(x, hx, w_ih, w_hh, kern::opt_ptr<scalar_t>(b_ih), kern::opt_ptr<scalar_t>(b_hh),
                                relu, hy);
  });
  return hy;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_cell_backward_impl(const Tensor& grad_hy, const Tensor& x,
                                                                     const Tensor& hx, const Tensor& w_ih,
                                                                     const Tensor& w_hh, const Tensor& hy, bool relu) {
  kern::check_cpu();
  const int64_t B = x.size(0), H = hx.size(1);
  Tensor dp = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::rnn_cell_backward", [&] {
    using T = scalar_t;
    const T* dh = grad_hy.const_data_ptr<T>();
    const T* y = hy.const_data_ptr<T>();
    T* d = dp.data_ptr<T>();
    kern::par_rows(B, 8 * H, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b) kern::rnn_bwd_row<T>(dh + b * H, nullptr, y + b * H, d + b * H, relu, 0, H);
    });
  });
  return {gemm::mm(dp, w_ih), gemm::mm(dp, w_hh), gemm::mm(dp.t(), x), gemm::mm(dp.t(), hx), dp.sum(0)};
}

}  // namespace

// ---- checked entries (rnn_args.h): shapes, dtypes, contiguity, then the kernel ----
using rnn_args::kAny;
using rnn_args::need;
using rnn_args::need_opt;

std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward(const Tensor& x, const Tensor& hx, const Tensor& cx,
                                                     const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                     const OptTensor& b_hh) {
  const char* fn = "lstm_cell_forward";
  const Tensor xc = need(fn, "input", x, {kAny, kAny}, at::ScalarType::Undefined);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1);
  const Tensor hc = need(fn, "hx", hx, {B, kAny}, dt);
  const int64_t H = hx.size(1);
  return lstm_cell_forward_impl(xc, hc, need(fn, "cx", cx, {B, H}, dt), need(fn, "weight_ih", w_ih, {4 * H, I}, dt),
                                need(fn, "weight_hh", w_hh, {4 * H, H}, dt), need_opt(fn, "bias_ih", b_ih, 4 * H, dt),
                                need_opt(fn, "bias_hh", b_hh, 4 * H, dt));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward(
    const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& x, const Tensor& hx, const Tensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates, const Tensor& cy) {
  const char* fn = "lstm_cell_backward";
  const Tensor xc = need(fn, "input", x, {kAny, kAny}, at::ScalarType::Undefined);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1);
  const Tensor hc = need(fn, "hx", hx, {B, kAny}, dt);
  const int64_t H = hx.size(1);
  return lstm_cell_backward_impl(need(fn, "grad_hy", grad_hy, {B, H}, dt), need(fn, "grad_cy", grad_cy, {B, H}, dt),
                                 xc, hc, need(fn, "cx", cx, {B, H}, dt), need(fn, "weight_ih", w_ih, {4 * H, I}, dt),
                                 need(fn, "weight_hh", w_hh, {4 * H, H}, dt), need(fn, "gates", gates, {B, 4 * H}, dt),
                                 need(fn, "cy", cy, {B, H}, dt));
}

std::tuple<Tensor, Tensor> gru_cell_forward(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                                            const OptTensor& b_ih, const OptTensor& b_hh) {
  const char* fn = "gru_cell_forward";
  const Tensor xc = need(fn, "input", x, {kAny, kAny}, at::ScalarType::Undefined);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1);
  const Tensor hc = need(fn, "hx", hx, {B, kAny}, dt);
  const int64_t H = hx.size(1);
  return gru_cell_forward_impl(xc, hc, need(fn, "weight_ih", w_ih, {3 * H, I}, dt),
                               need(fn, "weight_hh", w_hh, {3 * H, H}, dt), need_opt(fn, "bias_ih", b_ih, 3 * H, dt),
                               need_opt(fn, "bias_hh", b_hh, 3 * H, dt));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_cell_backward(const Tensor& grad_hy, const Tensor& x,
                                                                             const Tensor& hx, const Tensor& w_ih,
                                                                             const Tensor& w_hh, const Tensor& ws) {
  const char* fn = "gru_cell_backward";
  const Tensor xc = need(fn, "input", x, {kAny, kAny}, at::ScalarType::Undefined);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1);
  const Tensor hc = need(fn, "hx", hx, {B, kAny}, dt);
  const int64_t H = hx.size(1);
  return gru_cell_backward_impl(need(fn, "grad_hy", grad_hy, {B, H}, dt), xc, hc,
                                need(fn, "weight_ih", w_ih, {3 * H, I}, dt), need(fn, "weight_hh", w_hh, {3 * H, H}, dt),
                                need(fn, "ws", ws, {B, 4 * H}, dt));
}

Tensor rnn_cell_forward(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                        const OptTensor& b_ih, const OptTensor& b_hh, bool relu) {
  const char* fn = "rnn_cell_forward";
  const Tensor xc = need(fn, "input", x, {kAny, kAny}, at::ScalarType::Undefined);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1);
  const Tensor hc = need(fn, "hx", hx, {B, kAny}, dt);
  const int64_t H = hx.size(1);
  return rnn_cell_forward_impl(xc, hc, need(fn, "weight_ih", w_ih, {H, I}, dt), need(fn, "weight_hh", w_hh, {H, H}, dt),
                               need_opt(fn, "bias_ih", b_ih, H, dt), need_opt(fn, "bias_hh", b_hh, H, dt), relu);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_cell_backward(const Tensor& grad_hy, const Tensor& x,
                                                                     const Tensor& hx, const Tensor& w_ih,
                                                                     const Tensor& w_hh, const Tensor& hy, bool relu) {
  const char* fn = "rnn_cell_backward";
  const Tensor xc = need(fn, "input", x, {kAny, kAny}, at::ScalarType::Undefined);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1);
  const Tensor hc = need(fn, "hx", hx, {B, kAny}, dt);
  const int64_t H = hx.size(1);
  return rnn_cell_backward_impl(need(fn, "grad_hy", grad_hy, {B, H}, dt), xc, hc, need(fn, "weight_ih", w_ih, {H, I}, dt),
                                need(fn, "weight_hh", w_hh, {H, H}, dt), need(fn, "hy", hy, {B, H}, dt), relu);
}

bool rnn_kernels_supported() { return kern::cpu_supported(); }

}  // namespace seqfast
