// seqfast._C.SdpaCall: see sdpa_call.h.
//
// Why: a decoder step's attention over a few keys takes a few microseconds in the kernel, and the Python around it
// took twice that. Batch 1, 8 heads, 16 keys, head dim 64, no grad, on the Zen 3 EPYC: sdpa_forward 3.5 us, the
// custom op's dispatch 5.2 us, seqfast.functional.scaled_dot_product_attention 10.1 us, torch's op 9.5 us; at 256
// keys 15 / 22 us against a plain read of K and V in 11.5 us.
#include "attention/sdpa_call.h"

#include <cmath>
#include <tuple>
#include <vector>

#include "attention/attention.h"
#include "call_guard.h"

namespace py = pybind11;

namespace seqfast {
namespace {

using call_guard::plain_cpu;

// A region of the rule table where torch's op runs an inference call: dtype, inclusive query-length, key-length and
// head-dim ranges, causal (-1: either).
struct Region {
  at::ScalarType dtype;
  int64_t l0, l1, s0, s1, d0, d1;
  int causal;
  bool holds(at::ScalarType dt, int64_t L, int64_t S, int64_t D, bool is_causal) const {
    return dt == dtype && l0 <= L && L <= l1 && s0 <= S && S <= s1 && d0 <= D && D <= d1 &&
           (causal < 0 || bool(causal) == is_causal);
  }
};

using Regions = std::vector<std::tuple<at::ScalarType, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int>>;

class SdpaCall {
 public:
  // dtypes: those the C++ kernels run on this CPU; regions / training_regions: where the rule table gives a call
  // without / with gradients to torch's op, as (dtype, L range, S range, head-dim range, causal); declined_regions:
  // where a call without gradients goes to the regular path (seqfast._rules.sdpa_declined_regions), checked first.
  SdpaCall(std::vector<at::ScalarType> dtypes, const Regions& regions, const Regions& training_regions,
           const Regions& declined_regions)
      : dtypes_(std::move(dtypes)), epoch_(call_guard::rules_epoch().load()) {
    add(regions, regions_);
    add(training_regions, training_regions_);
    add(declined_regions, declined_regions_);
  }

  // The attention output, or None (the regular path decides). A call that needs no graph (grad mode off, or none of q,
  // k, v requires grad: torch's output would not require grad either) returns None inside the declined regions, runs
  // torch's op inside the table's regions (without the regular path's Python: bfloat16 L128 on an AMX CPU, torch's op
  // 104 us, through that path 118 us) and the kernel elsewhere. A call that autograd records (call_guard::recorded:
  // gradients, or a forward-mode tangent) runs torch's op (which records it as torch does) inside the table's training
  // regions, and returns None outside them, where the regular path decides.
  py::object call(const py::handle& query, const py::handle& key, const py::handle& value, bool is_causal,
                  const py::handle& scale, bool enable_gqa) const {
    if (call_guard::any_autocast() || stale()) return py::none();
    const at::Tensor* q = plain_cpu(query.ptr());
    if (!q) return py::none();
    const at::ScalarType dt = q->scalar_type();
    const at::Tensor* k = plain_cpu(key.ptr(), dt);
    const at::Tensor* v = plain_cpu(value.ptr(), dt);
    if (!k || !v || !runs(dt) || q->dim() != 4 || k->dim() != 4 || v->dim() != 4) return py::none();
    const int64_t N = q->size(0), H = q->size(1), L = q->size(2), D = q->size(3), S = k->size(2);
    // one batch and head count for all three (GQA and broadcasting take the regular path), matching head dims and
    // key / value lengths, nothing empty (torch's shapes for those come from the regular path)
    if (k->size(0) != N || v->size(0) != N || k->size(1) != H || v->size(1) != H || k->size(3) != D ||
        v->size(2) != S || D == 0 || N * H * L * S * v->size(3) == 0)
      return py::none();
    if (call_guard::recorded(*q) || call_guard::recorded(*k) || call_guard::recorded(*v)) {
      for (const Region& r : training_regions_)
        if (r.holds(dt, L, S, D, is_causal)) return torch_op(*q, *k, *v, is_causal, scale, enable_gqa);
      return py::none();
    }
    for (const Region& r : declined_regions_)
      if (r.holds(dt, L, S, D, is_causal)) return py::none();
    for (const Region& r : regions_)
      if (r.holds(dt, L, S, D, is_causal)) return torch_op(*q, *k, *v, is_causal, scale, enable_gqa);
    std::optional<double> given;
    if (!read_scale(scale, given)) return py::none();
    const double s = given ? *given : std::pow(double(D), -0.5);  // as Python's D ** -0.5
    return call_guard::wrap(call_guard::released_unless_small(work(*q, *k, *v), [&] {
      return std::get<0>(sdpa_forward(q->contiguous(), k->contiguous(), v->contiguous(), std::nullopt, is_causal, s));
    }));
  }
  // Built from another rule table: Python builds a new call.
  bool stale() const { return epoch_ != call_guard::rules_epoch().load(std::memory_order_relaxed); }

 private:
  bool runs(at::ScalarType dt) const {
    for (const auto d : dtypes_)
      if (d == dt) return true;
    return false;
  }
  // The scale argument: None (nullopt) or a Python float / int. False for anything else (a string, a tensor, a
  // list, an int too large for a double): the regular path raises torch's error for it.
  static bool read_scale(const py::handle& scale, std::optional<double>& out) {
    if (scale.is_none()) return true;
    if (!PyFloat_Check(scale.ptr()) && !PyLong_Check(scale.ptr())) return false;
    const double s = PyFloat_AsDouble(scale.ptr());
    if (s == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    out = s;
    return true;
  }
  // The op's multiply-adds (QK^T and PV), for call_guard::released_unless_small.
  static int64_t work(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    return q.numel() / q.size(-1) * k.size(-2) * (q.size(-1) + v.size(-1));
  }
  static void add(const Regions& from, std::vector<Region>& to) {
    for (const auto& r : from)
      to.push_back({std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r), std::get<5>(r),
                    std::get<6>(r), std::get<7>(r)});
  }
  // torch's op as torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=..., scale=..., enable_gqa=...)
  // runs it through the dispatcher, autograd included: at batch 1 its Python binding plus the regular path's checks
  // cost as much as the op (8 heads, 16 keys, with gradients on a Zen 3: 25.8 us against torch's 12.0). None where
  // the scale is not a number (the regular path raises torch's error).
  static py::object torch_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool is_causal,
                             const py::handle& scale, bool enable_gqa) {
    std::optional<double> s;
    if (!read_scale(scale, s)) return py::none();
    return call_guard::wrap(call_guard::released_unless_small(work(q, k, v), [&] {
      return at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, is_causal, s, enable_gqa);
    }));
  }
  std::vector<at::ScalarType> dtypes_;
  std::vector<Region> regions_, training_regions_, declined_regions_;
  int64_t epoch_;
};

}  // namespace

void bind_sdpa_call(py::module_& m) {
  py::class_<SdpaCall>(m, "SdpaCall", "an unmasked scaled_dot_product_attention on 4-D CPU tensors")
      .def(py::init<std::vector<at::ScalarType>, const Regions&, const Regions&, const Regions&>(),
           py::arg("dtypes"), py::arg("regions"), py::arg("training_regions"), py::arg("declined_regions"))
      .def("__call__", &SdpaCall::call, py::arg("query"), py::arg("key"), py::arg("value"), py::arg("is_causal"),
           py::arg("scale"), py::arg("enable_gqa"))
      .def("stale", &SdpaCall::stale);
}

}  // namespace seqfast
