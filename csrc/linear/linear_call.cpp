// seqfast._C.linear: see linear_call.h.
//
// y = x W^T + b over x's last dimension, for float32 / float64 CPU tensors (an exact torch.Tensor or Parameter each)
// of 2+ dimensions with matching sizes. No graph to record: the product itself (gemm::mm decides which kernel runs
// it: the own GEMM, or ATen where the shape or CPU has none). A graph to record: this file's autograd node, whose
// backward runs dX = dY W and dW = dY^T X on the same entry (autograd's own formulas, at::mm, where the backward is
// itself recorded: create_graph=True). None for anything else (1-D input, shape mismatches, other dtypes or devices,
// autocast, a forward-mode tangent, a functorch transform, a dispatch mode, empty operands): torch's F.linear then
// runs it, with its errors.
#include "linear/linear_call.h"

#include <torch/extension.h>

#include <optional>
#include <vector>

#include "call_guard.h"
#include "cpu/gemm.h"

namespace py = pybind11;

namespace seqfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<Tensor>;

// x2 [M, K], w [N, K], b [N] or none. Saved as torch's linear saves them: x2 only where w needs a gradient (dW reads
// it), w only where x2 does (dX reads it); the bias's gradient needs neither. So an in-place change of an operand
// that is not read, or an inference-mode x under a frozen weight, raises nothing, as in torch.
struct LinearNode : torch::autograd::Function<LinearNode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x2, const Tensor& w, const OptTensor& b) {
    ctx->save_for_backward({w.requires_grad() ? x2 : Tensor(), x2.requires_grad() ? w : Tensor()});
    ctx->saved_data["bias"] = b.has_value();
    return {gemm::mm(x2, w.t(), b)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor &x2 = s[0], &w = s[1];
    const Tensor g = grads[0].contiguous();
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {
      // differentiated again (create_graph=True): autograd's formulas on ATen ops it can record
      if (ctx->needs_input_grad(0)) dx = at::mm(g, w);
      if (ctx->needs_input_grad(1)) dw = at::mm(g.t(), x2);
    } else {
      if (ctx->needs_input_grad(0)) dx = gemm::mm(g, w);
      if (ctx->needs_input_grad(1)) dw = gemm::mm(g.t(), x2);
    }
    // (needs_input_grad(2) only with a bias: without one the node has no edge there)
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) db = g.sum(0);
    return {dx, dw, db};
  }
};

// The multiply-adds of x [..., K] @ w [N, K]^T, for call_guard::released_unless_small.
int64_t work(const Tensor& x, const Tensor& w) { return x.numel() * w.size(0); }

py::object linear(const py::handle& input, const py::handle& weight, const py::handle& bias) {
  if (call_guard::any_autocast()) return py::none();  // torch's op casts under autocast
  const Tensor* x = call_guard::plain_cpu(input.ptr());
  if (!x || (x->scalar_type() != at::kFloat && x->scalar_type() != at::kDouble)) return py::none();
  const Tensor* w = call_guard::plain_cpu(weight.ptr(), x->scalar_type());
  const Tensor* b = bias.is_none() ? nullptr : call_guard::plain_cpu(bias.ptr(), x->scalar_type());
  if (!w || (!bias.is_none() && !b)) return py::none();
  if (x->dim() < 2 || w->dim() != 2 || x->size(-1) != w->size(1) || (b && (b->dim() != 1 || b->size(0) != w->size(0))))
    return py::none();
  const int64_t N = w->size(0), K = w->size(1);
  if (x->numel() == 0 || N == 0 || K == 0) return py::none();
  std::vector<int64_t> out_sizes = x->sizes().vec();
  out_sizes.back() = N;
  // x's leading dimensions back (a 2-D input's product is the output itself: no view node in its graph)
  const auto shaped = [&](Tensor y) { return x->dim() == 2 ? y : y.view(out_sizes); };
  const OptTensor bt = b ? OptTensor(*b) : std::nullopt;
  if (call_guard::recorded(*x) || call_guard::recorded(*w) || (b && call_guard::recorded(*b))) {
    if (!call_guard::recordable_here({x, w, b})) return py::none();
    return call_guard::wrap(call_guard::released_unless_small(work(*x, *w), [&] {
      return shaped(LinearNode::apply(x->reshape({-1, K}), *w, bt)[0]);
    }));
  }
  return call_guard::wrap(call_guard::released_unless_small(work(*x, *w), [&] {
    return shaped(gemm::mm(x->reshape({-1, K}), w->t(), bt));
  }));
}

}  // namespace

void bind_linear(py::module_& m) {
  m.def("linear", &linear, py::arg("input"), py::arg("weight"), py::arg("bias"),
        "torch.nn.functional.linear on the own GEMM, or None where torch's op must run");
}

}  // namespace seqfast
