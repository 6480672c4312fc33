// Cell steps recorded by autograd from C++: see rnn_cell_autograd.h. Same process on a Zen 5 (AMD EPYC family 26), a
// module's training step (forward, then backward of the output's sum) at batch 1, hidden 128, before this node (the
// Python autograd Function): the forward's Python took 11.5 of seqfast's 50.5 us (RNNCell), and the backward ran two
// Python frames and the kernel-selection bookkeeping around a 5 us kernel.
#include "rnn/rnn_cell_autograd.h"

#include <vector>

#include "call_guard.h"
#include "rnn/rnn.h"

namespace seqfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<Tensor>;

Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
OptTensor or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Gradients that autograd can differentiate again (a backward with create_graph=True: a gradient penalty, a
// Hessian-vector product). The kernels' fused backward is not itself differentiable, so torch's own cell op,
// recomputed by recompute(a) from the saved inputs, is differentiated with create_graph, as the Python path
// differentiates seqfast's reference. slots: the forward's arguments in order (undefined for a missing bias or a
// flag). The recompute reads each slot that requires grad through an alias of its own (a view), and the gradients are
// taken with respect to those aliases: partial derivatives, as a backward must return. With respect to the saved
// tensors themselves they would be total ones, wrong wherever one argument depends on another (an unrolled cell's
// h_t on x and the weights): autograd would also follow the paths between them.
template <class Recompute>
variable_list differentiable(const variable_list& grads, const std::vector<Tensor>& slots, const Recompute& recompute) {
  variable_list result(slots.size());
  std::vector<Tensor> aliased = slots, wanted;
  std::vector<size_t> where;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (!slots[i].defined() || !slots[i].requires_grad()) continue;
    aliased[i] = slots[i].view_as(slots[i]);
    wanted.push_back(aliased[i]);
    where.push_back(i);
  }
  if (wanted.empty()) return result;
  const variable_list outputs = recompute(aliased);
  variable_list outs, gs;
  for (size_t i = 0; i < outputs.size(); ++i)
    if (grads[i].defined() && outputs[i].requires_grad()) {
      outs.push_back(outputs[i]);
      gs.push_back(grads[i]);
    }
  if (outs.empty()) return result;
  const variable_list got = torch::autograd::grad(outs, wanted, gs, /*retain_graph=*/true, /*create_graph=*/true,
                                                  /*allow_unused=*/true);
  for (size_t j = 0; j < where.size(); ++j) result[where[j]] = got[j];
  return result;
}

// Saved: x, hx, cx, w_ih, w_hh, b_ih, b_hh (undefined where absent), gates, cy.
struct LstmCellStep : torch::autograd::Function<LstmCellStep> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& hx, const Tensor& cx,
                               const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
    auto [hy, cy, gates] = lstm_cell_forward(x, hx, cx, w_ih, w_hh, b_ih, b_hh);
    ctx->save_for_backward({x, hx, cx, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh), gates, cy});
    return {hy, cy};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    if (at::GradMode::is_enabled())
      return differentiable(grads, {s[0], s[1], s[2], s[3], s[4], s[5], s[6]}, [](const std::vector<Tensor>& a) {
        auto [hy, cy] = at::lstm_cell(a[0], {a[1], a[2]}, a[3], a[4], or_none(a[5]), or_none(a[6]));
        return variable_list{hy, cy};
      });
    auto [dx, dhx, dcx, dw_ih, dw_hh, db] =
        lstm_cell_backward(grads[0].contiguous(), grads[1].contiguous(), s[0], s[1], s[2], s[3], s[4], s[7], s[8],
                           ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(3),
                           ctx->needs_input_grad(4));
    return {dx, dhx, dcx, dw_ih, dw_hh, s[5].defined() ? db : Tensor(), s[6].defined() ? db : Tensor()};
  }
};

// Saved: x, hx, w_ih, w_hh, b_ih, b_hh (undefined where absent), ws.
struct GruCellStep : torch::autograd::Function<GruCellStep> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& hx, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
    auto [hy, ws] = gru_cell_forward(x, hx, w_ih, w_hh, b_ih, b_hh);
    ctx->save_for_backward({x, hx, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh), ws});
    return {hy};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    if (at::GradMode::is_enabled())
      return differentiable(grads, {s[0], s[1], s[2], s[3], s[4], s[5]}, [](const std::vector<Tensor>& a) {
        return variable_list{at::gru_cell(a[0], a[1], a[2], a[3], or_none(a[4]), or_none(a[5]))};
      });
    auto [dx, dhx, dw_ih, dw_hh, db_ih, db_hh] =
        gru_cell_backward(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[6], ctx->needs_input_grad(0),
                          ctx->needs_input_grad(1), ctx->needs_input_grad(2), ctx->needs_input_grad(3));
    return {dx, dhx, dw_ih, dw_hh, s[4].defined() ? db_ih : Tensor(), s[5].defined() ? db_hh : Tensor()};
  }
};

// Saved: x, hx, w_ih, w_hh, b_ih, b_hh (undefined where absent), hy; saved_data "relu".
struct RnnCellStep : torch::autograd::Function<RnnCellStep> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& hx, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, bool relu) {
    Tensor hy = rnn_cell_forward(x, hx, w_ih, w_hh, b_ih, b_hh, relu);
    ctx->save_for_backward({x, hx, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh), hy});
    ctx->saved_data["relu"] = relu;
    return {hy};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const bool relu = ctx->saved_data["relu"].toBool();
    if (at::GradMode::is_enabled())
      return differentiable(grads, {s[0], s[1], s[2], s[3], s[4], s[5], Tensor()}, [&](const std::vector<Tensor>& a) {
        const OptTensor b_ih = or_none(a[4]), b_hh = or_none(a[5]);
        return variable_list{relu ? at::rnn_relu_cell(a[0], a[1], a[2], a[3], b_ih, b_hh)
                                  : at::rnn_tanh_cell(a[0], a[1], a[2], a[3], b_ih, b_hh)};
      });
    auto [dx, dhx, dw_ih, dw_hh, db] =
        rnn_cell_backward(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[6], relu, ctx->needs_input_grad(0),
                          ctx->needs_input_grad(1), ctx->needs_input_grad(2), ctx->needs_input_grad(3));
    return {dx, dhx, dw_ih, dw_hh, s[4].defined() ? db : Tensor(), s[5].defined() ? db : Tensor(), Tensor()};
  }
};

}  // namespace

std::tuple<Tensor, Tensor> lstm_cell_recorded(const Tensor& x, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
                                              const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  const variable_list out = LstmCellStep::apply(x, hx, cx, w_ih, w_hh, b_ih, b_hh);
  return {out[0], out[1]};
}

Tensor gru_cell_recorded(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                         const OptTensor& b_ih, const OptTensor& b_hh) {
  return GruCellStep::apply(x, hx, w_ih, w_hh, b_ih, b_hh)[0];
}

Tensor rnn_cell_recorded(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                         const OptTensor& b_ih, const OptTensor& b_hh, bool relu) {
  return RnnCellStep::apply(x, hx, w_ih, w_hh, b_ih, b_hh, relu)[0];
}

}  // namespace seqfast
