// Cell steps recorded by autograd from C++: see rnn_cell_autograd.h. Same process on a Zen 5 (AMD EPYC family 26), a
// module's training step (forward, then backward of the output's sum) at batch 1, hidden 128, before this node (the
// Python autograd Function): the forward's Python took 11.5 of seqfast's 50.5 us (RNNCell), and the backward ran two
// Python frames and the kernel-selection bookkeeping around a 5 us kernel.
#include "rnn/rnn_cell_autograd.h"

#include <string>
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

// What a node keeps of its arguments: torch's own cell saves an operand for its backward only where that backward
// reads its values (x for W_ih's gradient, W_ih for x's, ...), so an in-place change of an operand it does not save,
// or an operand made under inference_mode, raises nothing there. Likewise here: each argument the first-order backward
// reads goes through save_for_backward (autograd's version check); the others are only kept aside (saved_data
// "aside", with their versions in "versions") for the kernels' shapes and pointers, whose values they do not read. A
// backward with create_graph, which recomputes the step from every argument's values, checks those versions itself.
// values: whether the first-order backward reads that argument's values.
struct Kept {
  static void keep(AutogradContext* ctx, const std::vector<Tensor>& args, const std::vector<bool>& values,
                   const std::vector<Tensor>& internal) {
    std::vector<Tensor> saved, aside(args.size());
    std::vector<int64_t> versions(args.size(), -1);  // -1: none kept aside, or an inference tensor (no version)
    bool any_aside = false;
    for (size_t i = 0; i < args.size(); ++i) {
      const bool save = values[i] && args[i].defined();
      saved.push_back(save ? args[i] : Tensor());
      if (!save && args[i].defined()) {
        aside[i] = args[i];
        if (!args[i].is_inference()) versions[i] = static_cast<int64_t>(args[i]._version());
        any_aside = true;
      }
    }
    saved.insert(saved.end(), internal.begin(), internal.end());
    ctx->save_for_backward(saved);
    if (any_aside) {  // (a step training every operand keeps none aside: no entries)
      ctx->saved_data["aside"] = aside;
      ctx->saved_data["versions"] = versions;
    }
  }
  // -> the arguments (saved or kept aside; undefined where absent), then the internal tensors. checked: the kept
  // aside ones must be unchanged (their values are read).
  static variable_list get(AutogradContext* ctx, bool checked) {
    variable_list s = ctx->get_saved_variables();
    if (ctx->saved_data.find("aside") == ctx->saved_data.end()) return s;
    const std::vector<Tensor> aside = ctx->saved_data["aside"].toTensorVector();
    const std::vector<int64_t> versions = ctx->saved_data["versions"].toIntVector();
    for (size_t i = 0; i < aside.size(); ++i) {
      if (s[i].defined() || !aside[i].defined()) continue;
      s[i] = aside[i];
      TORCH_CHECK(!checked || versions[i] < 0 || s[i]._version() == versions[i],
                  "one of the variables needed for gradient computation has been modified by an inplace operation: "
                  "argument ", i, " of a seqfast cell step, at version ", s[i]._version(), "; expected version ",
                  versions[i], " instead.");
    }
    return s;
  }
};

bool any_requires_grad(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t && t->defined() && t->requires_grad()) return true;
  return false;
}

// Arguments x, hx, cx, w_ih, w_hh, b_ih, b_hh (undefined where absent); internal: gates, a copy of cy (torch's cell
// saves tanh(cy), not the cy it returns: an in-place change of the returned cy raises nothing there).
struct LstmCellStep : torch::autograd::Function<LstmCellStep> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& hx, const Tensor& cx,
                               const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
    auto [hy, cy, gates] = lstm_cell_forward(x, hx, cx, w_ih, w_hh, b_ih, b_hh);
    const Tensor bi = or_undefined(b_ih), bh = or_undefined(b_hh);
    // the gates' gradient, which reads cx, is needed unless only cx asks for a gradient
    const bool gates_grad = any_requires_grad({&x, &hx, &w_ih, &w_hh, &bi, &bh});
    Kept::keep(ctx, {x, hx, cx, w_ih, w_hh, bi, bh},
               {w_ih.requires_grad(), w_hh.requires_grad(), gates_grad, x.requires_grad(), hx.requires_grad(), false,
                false},
               {gates, cy.clone()});
    return {hy, cy};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool again = at::GradMode::is_enabled();
    const variable_list s = Kept::get(ctx, again);
    if (again)
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

// Arguments x, hx, w_ih, w_hh, b_ih, b_hh (undefined where absent); internal: ws, and a copy of hx where W_hh
// needs no gradient: the update gate's gradient reads hx, where torch's cell saves hx - n (its own tensor), and hx
// itself only for W_hh's gradient.
struct GruCellStep : torch::autograd::Function<GruCellStep> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& hx, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
    auto [hy, ws] = gru_cell_forward(x, hx, w_ih, w_hh, b_ih, b_hh);
    Kept::keep(ctx, {x, hx, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh)},
               {w_ih.requires_grad(), w_hh.requires_grad(), x.requires_grad(), hx.requires_grad(), false, false},
               {ws, w_hh.requires_grad() ? Tensor() : hx.clone()});
    return {hy};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool again = at::GradMode::is_enabled();
    const variable_list s = Kept::get(ctx, again);
    if (again)
      return differentiable(grads, {s[0], s[1], s[2], s[3], s[4], s[5]}, [](const std::vector<Tensor>& a) {
        return variable_list{at::gru_cell(a[0], a[1], a[2], a[3], or_none(a[4]), or_none(a[5]))};
      });
    auto [dx, dhx, dw_ih, dw_hh, db_ih, db_hh] =
        gru_cell_backward(grads[0].contiguous(), s[0], s[7].defined() ? s[7] : s[1], s[2], s[3], s[6],
                          ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                          ctx->needs_input_grad(3));
    return {dx, dhx, dw_ih, dw_hh, s[4].defined() ? db_ih : Tensor(), s[5].defined() ? db_hh : Tensor()};
  }
};

// Arguments x, hx, w_ih, w_hh, b_ih, b_hh (undefined where absent); internal: hy (torch's tanh / relu saves its
// output too); saved_data "relu".
struct RnnCellStep : torch::autograd::Function<RnnCellStep> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& hx, const Tensor& w_ih,
                               const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, bool relu) {
    Tensor hy = rnn_cell_forward(x, hx, w_ih, w_hh, b_ih, b_hh, relu);
    Kept::keep(ctx, {x, hx, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh)},
               {w_ih.requires_grad(), w_hh.requires_grad(), x.requires_grad(), hx.requires_grad(), false, false},
               {hy});
    ctx->saved_data["relu"] = relu;
    return {hy};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool again = at::GradMode::is_enabled();
    const variable_list s = Kept::get(ctx, again);
    const bool relu = ctx->saved_data["relu"].toBool();
    if (again)
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
