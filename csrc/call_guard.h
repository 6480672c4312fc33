// What the no-grad calls that Python asks first share (rnn/rnn_module_call.cpp, attention/sdpa_call.cpp; seqfast._C
// internal): the checks every such call runs before it looks at its arguments, in C++ because at batch 1 the same
// checks in Python cost as much as the kernel. Included only by translation units that include <torch/extension.h>.
#pragma once

#include <torch/extension.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

namespace seqfast {
namespace call_guard {

// Bumped when seqfast's rule table changes (seqfast._rules.set_rules -> seqfast._C.rules_changed): calls built from
// the old table decline and report stale(), and Python builds new ones.
inline std::atomic<int64_t>& rules_epoch() {
  static std::atomic<int64_t> epoch{0};
  return epoch;
}

inline bool any_autocast() {  // torch._C._is_any_autocast_enabled()
  for (const auto device : at::autocast::_AUTOCAST_SUPPORTED_DEVICES)
    if (at::autocast::is_autocast_enabled(device)) return true;
  return false;
}

// Whether autograd would record an op reading t: t requires grad in grad mode, or t carries a forward-mode AD
// tangent (torch.autograd.forward_ad, first dual level; recorded whatever the grad mode). The calls run their kernels
// only where no operand is recorded: then torch's output would not require grad either, whether or not grad mode is
// on (a model frozen with requires_grad_(False) and called without torch.no_grad).
inline bool recorded(const at::Tensor& t) {
  return (t.requires_grad() && at::GradMode::is_enabled()) || t._fw_grad(/*level=*/0).defined();
}

// A tensor whose own dispatch must see torch's ops, not these kernels: a functorch wrapper (torch.func.vmap's batched
// tensors, grad's wrappers: no storage of their own), a functionalized or a Python-keyed tensor; or any tensor while a
// Python dispatch mode is in force.
inline bool wrapped_or_in_mode(const at::Tensor& t) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::Functionalize, c10::DispatchKey::Python});
  return t.key_set().has_any(wrapped) || c10::impl::TorchDispatchModeTLS::stack_len() > 0;
}

// Whether these operands (and this thread's dispatch state) let a call record its own C++ autograd node
// (rnn/rnn_cell_autograd.h, linear/linear_call.cpp): float32 / float64, no forward-mode tangent, no functorch
// transform, none of them wrapped_or_in_mode.
inline bool recordable_here(std::initializer_list<const at::Tensor*> operands) {
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) return false;
  for (const at::Tensor* t : operands) {
    if (!t || !t->defined()) continue;
    const auto st = t->scalar_type();
    if ((st != at::kFloat && st != at::kDouble) || wrapped_or_in_mode(*t) || t->_fw_grad(0).defined()) return false;
  }
  return true;
}

// An exact torch.Tensor or Parameter (a subclass may override torch functions: the Python path serves it), strided,
// on the CPU, not wrapped_or_in_mode; else nullptr.
inline const at::Tensor* plain_cpu(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.layout() != at::kStrided || !t.device().is_cpu() || wrapped_or_in_mode(t)) return nullptr;
  return &t;
}

// The same, of dtype dt.
inline const at::Tensor* plain_cpu(PyObject* obj, at::ScalarType dt) {
  const at::Tensor* t = plain_cpu(obj);
  return t && t->scalar_type() == dt ? t : nullptr;
}

// Runs f() (a kernel or torch op that touches no Python object) with the GIL released, as torch's bindings run their
// ops, unless its work is at most kHoldGilMaxWork multiply-adds: releasing and retaking Python 3.11's GIL (a mutex
// and a condition variable) costs about 0.3 us, 15% of a batch-1 hidden-128 RNNCell step (Zen 5, same process: 2.41
// -> 2.04 us held; LSTMCell 4.89 -> 4.52, GRUCell 3.78 -> 3.51). A step that small holds the GIL for some
// microseconds, far inside the 5 ms that Python lets a thread run bytecode before it must yield; only two Python
// threads running such steps side by side lose their overlap.
constexpr int64_t kHoldGilMaxWork = int64_t(1) << 20;
template <class F>
auto released_unless_small(int64_t work, const F& f) -> decltype(f()) {
  if (work <= kHoldGilMaxWork) return f();
  pybind11::gil_scoped_release release;
  return f();
}

inline pybind11::object wrap(at::Tensor t) {
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(t)));
}

}  // namespace call_guard
}  // namespace seqfast
