// seqfast._C.ModuleCall: the no-grad forward of one seqfast nn.LSTM / GRU / RNN module, with the checks that decide
// whether it may run, in one call from Python (see rnn_module_call.h).
//
// Why: at batch 1 the Python that decided whether rnn_module_inference may run cost as much as a short sequence's
// kernel. Each check is cheap warm, but it runs right after the kernel, on caches the kernel flushed: LSTM T1 B1 H64
// on the Zen 3 EPYC, rnn_module_inference alone 16-18 us, the module's _inference_call around it 28-33 us (ONNX
// Runtime's whole call: about 20 us). The same checks here cost well under a microsecond.
#include "rnn/rnn_module_call.h"

#include <torch/extension.h>
#include <ATen/autocast_mode.h>

#include <atomic>
#include <utility>
#include <vector>

#include "rnn/rnn.h"

namespace py = pybind11;

namespace seqfast {
namespace {

// Bumped when seqfast's rule table changes (seqfast._rules.set_rules): calls built before then decline, and the
// module builds a new one from the new table.
std::atomic<int64_t> g_rules_epoch{0};

bool any_autocast() {  // torch._C._is_any_autocast_enabled()
  for (const auto device : at::autocast::_AUTOCAST_SUPPORTED_DEVICES)
    if (at::autocast::is_autocast_enabled(device)) return true;
  return false;
}

class ModuleCall {
 public:
  // params: the module's parameter dict; expected: its values when the call was built, in order; weights: the flat
  // per-layer weight list of rnn_module_inference; torch_batches: inclusive batch ranges where the rule table
  // prefers torch's op for this module's dtype and hidden size; upcast_min_rows: bfloat16 calls with at least this
  // many rows (steps x batch) take the float32 upcast path (0: never).
  ModuleCall(std::string mode, py::dict params, py::list expected, std::vector<Tensor> weights, bool has_biases,
             int64_t num_layers, bool bidirectional, bool batch_first, int64_t input_size,
             std::vector<std::pair<int64_t, int64_t>> torch_batches, int64_t upcast_min_rows)
      : mode_(std::move(mode)), params_(std::move(params)), weights_(std::move(weights)), has_biases_(has_biases),
        num_layers_(num_layers), bidirectional_(bidirectional), batch_first_(batch_first), input_size_(input_size),
        torch_batches_(std::move(torch_batches)), upcast_min_rows_(upcast_min_rows), epoch_(g_rules_epoch.load()) {
    TORCH_CHECK(!weights_.empty(), "ModuleCall: no weights");
    dtype_ = weights_[0].scalar_type();
    for (const auto& p : expected) expected_.push_back(p.ptr());
    expected_refs_ = std::move(expected);
  }

  // (output, states) as the module's forward returns them, or None where the module's regular path must decide.
  py::object call(const py::handle& input) const {
    if (at::GradMode::is_enabled() || any_autocast() || epoch_ != g_rules_epoch.load(std::memory_order_relaxed))
      return py::none();
    PyObject* in = input.ptr();
    if (!THPVariable_CheckExact(in)) return py::none();  // a subclass may override torch functions
    const Tensor& x = THPVariable_Unpack(in);
    if (x.layout() != at::kStrided || !x.device().is_cpu() || x.scalar_type() != dtype_) return py::none();
    const int64_t dim = x.dim();
    if ((dim != 2 && dim != 3) || x.size(-1) != input_size_) return py::none();
    if (!same_parameters()) return py::none();
    for (const Tensor& w : weights_)  // .to() / .double() change a parameter in place
      if (w.scalar_type() != dtype_ || !w.device().is_cpu()) return py::none();
    const bool batched = dim == 3;
    const int64_t steps = x.size(batched && batch_first_ ? 1 : 0);
    const int64_t batch = batched ? x.size(batch_first_ ? 0 : 1) : 1;
    if (steps == 0 || batch == 0) return py::none();
    for (const auto& r : torch_batches_)
      if (r.first <= batch && batch <= r.second) return py::none();
    if (upcast_min_rows_ > 0 && steps * batch >= upcast_min_rows_) return py::none();
    std::tuple<Tensor, Tensor, Tensor> r;
    {
      py::gil_scoped_release release;
      r = rnn_module_inference(mode_, x, weights_, has_biases_, num_layers_, bidirectional_, batch_first_);
    }
    py::object out = py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(std::get<0>(r))));
    py::object h = py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(std::get<1>(r))));
    if (!std::get<2>(r).defined()) return py::make_tuple(out, h);
    py::object c = py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(std::get<2>(r))));
    return py::make_tuple(out, py::make_tuple(h, c));
  }

 private:
  // The module still holds the parameters the call was built from (one may have been replaced or deleted).
  bool same_parameters() const {
    PyObject* d = params_.ptr();
    if (PyDict_GET_SIZE(d) != Py_ssize_t(expected_.size())) return false;
    Py_ssize_t pos = 0, i = 0;
    PyObject *key, *value;
    while (PyDict_Next(d, &pos, &key, &value))
      if (value != expected_[i++]) return false;
    return true;
  }

  std::string mode_;
  py::dict params_;
  py::list expected_refs_;  // keeps the expected objects alive, so their addresses cannot be reused
  std::vector<PyObject*> expected_;
  std::vector<Tensor> weights_;
  bool has_biases_;
  int64_t num_layers_;
  bool bidirectional_, batch_first_;
  int64_t input_size_;
  std::vector<std::pair<int64_t, int64_t>> torch_batches_;
  int64_t upcast_min_rows_;
  int64_t epoch_;
  at::ScalarType dtype_;
};

}  // namespace

void bind_module_call(py::module_& m) {
  py::class_<ModuleCall>(m, "ModuleCall", "the no-grad forward of one seqfast RNN module, checks included")
      .def(py::init<std::string, py::dict, py::list, std::vector<Tensor>, bool, int64_t, bool, bool, int64_t,
                    std::vector<std::pair<int64_t, int64_t>>, int64_t>(),
           py::arg("mode"), py::arg("params"), py::arg("expected"), py::arg("weights"), py::arg("has_biases"),
           py::arg("num_layers"), py::arg("bidirectional"), py::arg("batch_first"), py::arg("input_size"),
           py::arg("torch_batches"), py::arg("upcast_min_rows"))
      .def("__call__", &ModuleCall::call, py::arg("input"));
  m.def("rules_changed", [] { g_rules_epoch.fetch_add(1); },
        "seqfast._rules.set_rules calls this: every ModuleCall built before declines from then on");
}

}  // namespace seqfast
