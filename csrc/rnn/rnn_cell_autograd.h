// A cell step recorded by autograd from C++ (rnn_cell_autograd.cpp): the node a seqfast cell module's training step
// leaves when seqfast._C.CellCall runs it (rnn_module_call.cpp). The same C++ kernels as the Python path (seqfast.ops'
// FusedOp, a torch.autograd.Function), without its Python: at batch 1, hidden 128 that Python was about a third of a
// training step. Only for float32 / float64 CPU tensors that carry no forward-mode tangent and no functorch wrapper
// (call_guard::recordable_here); the caller has run check_cell_args. Included only by translation units that include
// <torch/extension.h>.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace seqfast {

// -> (hy, cy), recorded
std::tuple<at::Tensor, at::Tensor> lstm_cell_recorded(const at::Tensor& x, const at::Tensor& hx, const at::Tensor& cx,
                                                      const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                      const std::optional<at::Tensor>& b_ih,
                                                      const std::optional<at::Tensor>& b_hh);
at::Tensor gru_cell_recorded(const at::Tensor& x, const at::Tensor& hx, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                             const std::optional<at::Tensor>& b_hh);
at::Tensor rnn_cell_recorded(const at::Tensor& x, const at::Tensor& hx, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                             const std::optional<at::Tensor>& b_hh, bool relu);

}  // namespace seqfast
