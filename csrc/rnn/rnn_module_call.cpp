// seqfast._C.ModuleCall and CellCall: the no-grad forward of one seqfast nn.LSTM / GRU / RNN module, or one step of
// an LSTMCell / GRUCell / RNNCell, with the checks that decide whether it may run, in one call from Python (see
// rnn_module_call.h).
//
// Why: at batch 1 the Python that decided whether a kernel may run cost as much as a short sequence's kernel. Each
// check is cheap warm, but it runs right after the kernel, on caches the kernel flushed: LSTM T1 B1 H64 on the Zen 3
// EPYC, rnn_module_inference alone 16-18 us, the module's _inference_call around it 28-33 us (ONNX Runtime's whole
// call: about 20 us). The same checks here cost well under a microsecond. A seq2seq decoder calls a cell per token.
#include "rnn/rnn_module_call.h"

#include <tuple>
#include <utility>
#include <vector>

#include "call_guard.h"
#include "rnn/rnn.h"
#include "rnn/rnn_cell_autograd.h"
#include "rnn/rnn_sequence_step_bf16.h"

namespace py = pybind11;

namespace seqfast {
namespace {

using call_guard::plain_cpu;
using call_guard::recorded;
using call_guard::released_unless_small;
using call_guard::rules_epoch;
using call_guard::wrap;
using call_guard::recordable_here;

// What every call checks before it looks at its arguments: no autocast (the op picks its dtype there), the rule table
// it was built from still in force, and the module's parameter dict still holding the same objects (a parameter may
// have been replaced or deleted). The calls then decline where autograd would record one of the tensors they read
// (call_guard::recorded: grad mode with a parameter, input or state requiring grad, or a forward-mode tangent).
class Guard {
 public:
  Guard(py::dict params, py::list expected) : params_(std::move(params)), epoch_(rules_epoch().load()) {
    for (const auto& p : expected) expected_.push_back(p.ptr());
    refs_ = std::move(expected);
  }
  bool passes() const {
    return !call_guard::any_autocast() && !stale();
  }
  // Built from another rule table or another parameter set: the module builds a new call.
  bool stale() const {
    if (epoch_ != rules_epoch().load(std::memory_order_relaxed)) return true;
    PyObject* d = params_.ptr();
    if (PyDict_GET_SIZE(d) != Py_ssize_t(expected_.size())) return true;
    Py_ssize_t pos = 0, i = 0;
    PyObject *key, *value;
    while (PyDict_Next(d, &pos, &key, &value))
      if (value != expected_[i++]) return true;
    return false;
  }

 private:
  py::dict params_;
  py::list refs_;  // keeps the expected objects alive, so their addresses cannot be reused
  std::vector<PyObject*> expected_;
  int64_t epoch_;
};

// The tensor a parameter object holds now. The calls keep the Python objects, never their tensors: a tensor kept in
// C++ would go stale when torch swaps a parameter's contents in place (torch.utils.swap_tensors, which module.to()
// uses under torch.__future__.set_swap_module_params_on_conversion), and the extra reference makes that swap fail.
const Tensor& current(const py::handle& param) { return THPVariable_Unpack(param.ptr()); }

// Whether batch lies in one of the rule table's inclusive ranges.
bool in_ranges(const std::vector<std::pair<int64_t, int64_t>>& ranges, int64_t batch) {
  for (const auto& r : ranges)
    if (r.first <= batch && batch <= r.second) return true;
  return false;
}

// Inclusive (batch low, high, steps low, high) regions of the rule table.
using Regions = std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>;
bool in_regions(const Regions& regions, int64_t batch, int64_t steps) {
  for (const auto& [b0, b1, s0, s1] : regions)
    if (b0 <= batch && batch <= b1 && s0 <= steps && steps <= s1) return true;
  return false;
}

class ModuleCall {
 public:
  // params: the module's parameter dict; expected: its values when the call was built, in order; weights: the flat
  // per-layer weight list of rnn_module_inference; torch_regions / training_torch: the inclusive (batch, steps)
  // regions where the rule table prefers torch's op for this module's dtype and hidden size, without gradients / for
  // the calls autograd records; float32: the (batch, steps) regions where a bfloat16 call computes in float32
  // (seqfast._rules.float32_bfloat16_regions), checked before the rule table as the Python path checks them: there,
  // calls of at least upcast_min_rows rows (steps x batch) take the upcast path (left to the Python path), and with
  // bf16_cell_steps the fewer rows run as float32 cell steps with the weights read in place
  // (seqfast.functional._rnn_sequence.bf16_in_steps); upcast_steps false: calls of 2+ steps only when autograd
  // records them, and as cell steps only (the fused bfloat16 steps run the rest).
  ModuleCall(std::string mode, py::dict params, py::list expected, py::list weights, bool has_biases,
             int64_t num_layers, bool bidirectional, bool batch_first, int64_t input_size, Regions torch_regions,
             int64_t upcast_min_rows, bool bf16_cell_steps, Regions training_torch, Regions float32, bool upcast_steps)
      : guard_(std::move(params), std::move(expected)), mode_(std::move(mode)), lstm_(mode_ == "LSTM"),
        weights_(std::move(weights)),
        has_biases_(has_biases), num_layers_(num_layers), bidirectional_(bidirectional), batch_first_(batch_first),
        input_size_(input_size), torch_regions_(std::move(torch_regions)), upcast_min_rows_(upcast_min_rows),
        bf16_cell_steps_(bf16_cell_steps), upcast_steps_(upcast_steps), training_torch_(std::move(training_torch)),
        float32_(std::move(float32)) {
    TORCH_CHECK(weights_.size() >= 2, "ModuleCall: no weights");
    for (const auto& w : weights_) TORCH_CHECK(THPVariable_Check(w.ptr()), "ModuleCall: weights must be tensors");
    dtype_ = current(weights_[0]).scalar_type();
    hidden_size_ = current(weights_[1]).size(1);
  }

  // (output, states) as the module's forward returns them, or None where the module's regular path must decide. hx:
  // None, or the initial states as the module takes them (LSTM: a tuple (h0, c0)). training: the module's flag (the
  // caller has sent a training call with dropout to the regular path). A call that autograd records runs torch's op,
  // recorded as torch records it, inside the training_torch regions, and goes to the regular path elsewhere; a call
  // without gradients runs torch's op inside the torch_regions. Both outside the float32 regions.
  py::object call(const py::handle& input, const py::handle& hx, bool training) const {
    if (!guard_.passes()) return py::none();
    const Tensor* xp = plain_cpu(input.ptr(), dtype_);
    if (!xp) return py::none();
    const Tensor& x = *xp;
    const int64_t dim = x.dim();
    if ((dim != 2 && dim != 3) || x.size(-1) != input_size_) return py::none();
    std::vector<Tensor> weights;
    weights.reserve(weights_.size());
    bool rec = recorded(x);
    for (const auto& p : weights_) {  // .to() / .double() change a parameter in place
      const Tensor& w = current(p);
      if (w.scalar_type() != dtype_ || !w.device().is_cpu()) return py::none();
      rec = rec || recorded(w);
      weights.push_back(w);
    }
    const bool batched = dim == 3;
    const int64_t steps = x.size(batched && batch_first_ ? 1 : 0);
    const int64_t batch = batched ? x.size(batch_first_ ? 0 : 1) : 1;
    if (steps == 0 || batch == 0) return py::none();
    // Inside the float32 regions a call computes in float32 (the Python path's upcast, or cell steps here); where
    // calls of 2+ steps do not upcast (upcast_steps false: the fused bfloat16 steps run them), only those autograd
    // records, as cell steps (the Python path's). The Python path computes a recorded call there in float32 too.
    const bool upcast_rows = upcast_min_rows_ > 0 && steps * batch >= upcast_min_rows_;
    bool float32 = in_regions(float32_, batch, steps);
    if (float32 && steps > 1 && !upcast_steps_) float32 = rec && !upcast_rows;
    // likewise a no-grad single step past the in-place rows: the fused bfloat16 step, not upcast copies (CellCall)
    if (float32 && steps == 1 && !upcast_steps_ && !rec && upcast_rows && dtype_ == at::kBFloat16 &&
        step_bf16::available())
      float32 = false;
    // A recorded call outside the training rules: one step of a float32 / float64 module runs as cell steps recorded
    // from C++ (recorded_step); anything else is the Python path's.
    const bool recorded_cells = rec && !float32 && !in_regions(training_torch_, batch, steps);
    if (recorded_cells && (steps != 1 || (dtype_ != at::kFloat && dtype_ != at::kDouble))) return py::none();
    if (rec && float32) return py::none();
    bool cell_steps = false, torch_here = rec && !recorded_cells;
    if (!rec) {
      if (float32) {
        if (upcast_rows) return py::none();
        cell_steps = bf16_cell_steps_ && dtype_ == at::kBFloat16;
      }
      torch_here = !cell_steps && in_regions(torch_regions_, batch, steps);
    }
    OptTensor h0, c0;
    if (!hx.is_none()) {
      // [layers * directions, batch, hidden] ([layers * directions, hidden] unbatched), of the input's dtype; any
      // other form goes to the regular path, which raises torch's error or adapts it
      PyObject* h = hx.ptr();
      PyObject* c = nullptr;
      if (lstm_) {
        if (!PyTuple_CheckExact(h) || PyTuple_GET_SIZE(h) != 2) return py::none();
        c = PyTuple_GET_ITEM(h, 1);
        h = PyTuple_GET_ITEM(h, 0);
      }
      for (PyObject* o : {h, c}) {
        if (!o) continue;
        const Tensor* t = plain_cpu(o, dtype_);
        if (!t || t->dim() != (batched ? 3 : 2) || t->size(0) != num_layers_ * (bidirectional_ ? 2 : 1) ||
            t->size(-1) != hidden_size_ || (batched && t->size(1) != batch) || (!rec && recorded(*t)))
          return py::none();
        (o == h ? h0 : c0) = *t;
      }
    }
    if (recorded_cells) return recorded_step(x, batched, batch, h0, c0, weights);
    if (torch_here) return torch_op(x, batched, batch, h0, c0, weights, training);
    std::tuple<Tensor, Tensor, Tensor> r = released_unless_small(work(x, weights), [&] {
      return rnn_module_inference(mode_, x, weights, has_biases_, num_layers_, bidirectional_, batch_first_, h0, c0,
                                  cell_steps);
    });
    py::object out = wrap(std::move(std::get<0>(r))), h = wrap(std::move(std::get<1>(r)));
    if (!std::get<2>(r).defined()) return py::make_tuple(out, h);
    return py::make_tuple(out, py::make_tuple(h, wrap(std::move(std::get<2>(r)))));
  }
  bool stale() const { return guard_.stale(); }

 private:
  // torch's own op (torch._VF.lstm / gru / rnn_tanh / rnn_relu, as torch.nn's forward calls it) on the checked
  // arguments: zero states where none are given, an unbatched call as a batch of one. Dropout is 0: a training call
  // with dropout never gets here.
  py::object torch_op(const Tensor& x, bool batched, int64_t batch, const OptTensor& h0, const OptTensor& c0,
                      const std::vector<Tensor>& weights, bool training) const {
    const int64_t slices = num_layers_ * (bidirectional_ ? 2 : 1);
    auto r = released_unless_small(work(x, weights), [&] {
      std::tuple<Tensor, Tensor, Tensor> r;
      const Tensor xb = batched ? x : x.unsqueeze(batch_first_ ? 0 : 1);
      const auto state = [&](const OptTensor& s) {
        if (!s.has_value()) return at::zeros({slices, batch, hidden_size_}, x.options());
        return batched ? *s : s->unsqueeze(1);
      };
      const Tensor h = state(h0);
      if (lstm_) {
        auto [out, hn, cn] = at::lstm(xb, {h, state(c0)}, weights, has_biases_, num_layers_, 0.0, training,
                                      bidirectional_, batch_first_);
        r = {out, hn, cn};
      } else {
        std::tuple<Tensor, Tensor> oh;
        if (mode_ == "GRU")
          oh = at::gru(xb, h, weights, has_biases_, num_layers_, 0.0, training, bidirectional_, batch_first_);
        else if (mode_ == "RNN_RELU")
          oh = at::rnn_relu(xb, h, weights, has_biases_, num_layers_, 0.0, training, bidirectional_, batch_first_);
        else
          oh = at::rnn_tanh(xb, h, weights, has_biases_, num_layers_, 0.0, training, bidirectional_, batch_first_);
        r = {std::get<0>(oh), std::get<1>(oh), Tensor()};
      }
      if (!batched) {
        std::get<0>(r) = std::get<0>(r).squeeze(batch_first_ ? 0 : 1);
        std::get<1>(r) = std::get<1>(r).squeeze(1);
        if (lstm_) std::get<2>(r) = std::get<2>(r).squeeze(1);
      }
      return r;
    });
    py::object out = wrap(std::move(std::get<0>(r))), h = wrap(std::move(std::get<1>(r)));
    if (!lstm_) return py::make_tuple(out, h);
    return py::make_tuple(out, py::make_tuple(h, wrap(std::move(std::get<2>(r)))));
  }

  // One step (x: [1, B, I], [B, 1, I] batch first, or [1, I] unbatched) as each layer's and direction's cell step,
  // recorded by autograd from C++ (rnn_cell_autograd.h): a seq2seq decoder trained one token per call (torch's own
  // seq2seq tutorial steps nn.GRU so) runs no Python autograd Function. Dropout is 0 here (a training call with
  // dropout never gets here); results as seqfast.functional._cell_steps.one_step's: the output a view of the last
  // layer's states, h_n (c_n) stacked copies. None (the Python path) where a tensor asks for more than the kernels
  // (a tangent, a functorch transform) or a weight is not in the layout they read.
  py::object recorded_step(const Tensor& x, bool batched, int64_t batch, const OptTensor& h0, const OptTensor& c0,
                           const std::vector<Tensor>& weights) const {
    const int64_t dirs = bidirectional_ ? 2 : 1, per = has_biases_ ? 4 : 2;
    if (!rnn_kernels_supported() || int64_t(weights.size()) != num_layers_ * dirs * per) return py::none();
    const Tensor rows = batched ? x.select(batch_first_ ? 1 : 0, 0) : x;  // [B, I] ([1, I] unbatched)
    const auto state = [&](const OptTensor& s, int64_t i) {
      if (!s.has_value()) return at::zeros({batch, hidden_size_}, x.options());
      return batched ? s->select(0, i) : s->select(0, i).unsqueeze(0);
    };
    const int64_t gates = lstm_ ? 4 : mode_ == "GRU" ? 3 : 1;
    if (!recordable_here({&x, h0 ? &*h0 : nullptr, c0 ? &*c0 : nullptr})) return py::none();
    for (const Tensor& w : weights)
      if (!recordable_here({&w})) return py::none();
    const bool relu = mode_ == "RNN_RELU";
    auto [out, hn, cn] = released_unless_small(work(x, weights), [&] {
      Tensor input = rows;
      std::vector<Tensor> hs, cs;
      for (int64_t layer = 0; layer < num_layers_; ++layer) {
        std::vector<Tensor> outs;
        for (int64_t d = 0; d < dirs; ++d) {  // one step: either direction runs the same cell step
          const int64_t i = layer * dirs + d;
          const Tensor* w = &weights[i * per];
          const OptTensor b_ih = has_biases_ ? OptTensor(w[2]) : OptTensor();
          const OptTensor b_hh = has_biases_ ? OptTensor(w[3]) : OptTensor();
          const Tensor h = state(h0, i), c = lstm_ ? state(c0, i) : Tensor();
          // a weight the kernels cannot read: the Python path redoes the call (these steps' nodes are dropped)
          if (check_cell_args(gates, input, h, lstm_ ? OptTensor(c) : OptTensor(), w[0], w[1], b_ih, b_hh, false) !=
              kCellOk)
            return std::make_tuple(Tensor(), Tensor(), Tensor());
          if (lstm_) {
            auto [hy, cy] = lstm_cell_recorded(input, h, c, w[0], w[1], b_ih, b_hh);
            hs.push_back(hy);
            cs.push_back(cy);
          } else {
            hs.push_back(gates == 3 ? gru_cell_recorded(input, h, w[0], w[1], b_ih, b_hh)
                                    : rnn_cell_recorded(input, h, w[0], w[1], b_ih, b_hh, relu));
          }
          outs.push_back(hs.back());
        }
        input = dirs == 2 ? at::cat(outs, 1) : outs[0];
      }
      // h_n is stacked (a copy even of one state): the output must not alias it, as torch's does not
      Tensor hn = at::stack(hs), cn = lstm_ ? at::stack(cs) : Tensor();
      if (!batched) {
        hn = hn.squeeze(1);
        if (lstm_) cn = cn.squeeze(1);
      }
      return std::make_tuple(batched ? input.unsqueeze(batch_first_ ? 1 : 0) : input, hn, cn);
    });
    if (!out.defined()) return py::none();
    py::object o = wrap(std::move(out)), h = wrap(std::move(hn));
    if (!lstm_) return py::make_tuple(o, h);
    return py::make_tuple(o, py::make_tuple(h, wrap(std::move(cn))));
  }

  // The call's multiply-adds, near enough (each row of x times every weight; layers past the first read their own
  // inputs), for released_unless_small.
  static int64_t work(const Tensor& x, const std::vector<Tensor>& weights) {
    int64_t elements = 0;
    for (const Tensor& w : weights) elements += w.numel();
    return x.numel() / x.size(-1) * elements;
  }

  Guard guard_;
  std::string mode_;
  bool lstm_;
  py::list weights_;  // the parameter objects (see current())
  bool has_biases_;
  int64_t num_layers_;
  bool bidirectional_, batch_first_;
  int64_t input_size_;
  Regions torch_regions_;
  int64_t upcast_min_rows_;
  bool bf16_cell_steps_, upcast_steps_;
  Regions training_torch_, float32_;
  at::ScalarType dtype_;
  int64_t hidden_size_;
};

// One step of a cell module: gates 4 (LSTM: hx a pair (h, c), returns (h', c')), 3 (GRU) or 1 (RNN; relu or tanh), hx
// a tensor, returns h'. Batched steps with their state given; the rest is the Python path's. A step that autograd
// records (call_guard::recorded) runs torch's cell op, recorded as torch records it, where the rule table prefers
// torch's op for training at its batch (training_torch_batches; at batch 64 the Python path's dispatch before that op
// cost 4% of an RNNCell H64 step), and for a dtype the C++ cell kernels do not run (torch_op below) outside the
// float32 bound, and is left to the Python path (seqfast's autograd op, or the float32 path) elsewhere. torch_op:
// a dtype the C++ cell kernels do not run (bfloat16, float16), where seqfast.functional calls torch's own cell op:
// this call runs that op itself (torch's results and errors, without the dispatch Python), except from
// upcast_min_rows rows (when > 0), which the functional computes in float32 on the C++ kernels, or where the fused
// bfloat16 step runs (fused_bf16_step), this call on it. bf16_weights: below those rows, a bfloat16 step runs the C++
// kernels on float32 copies of its activations with the weights read in place, as the functional does
// (seqfast._rules.bf16_weights_in_place). Both only up to float32_max_batch rows
// (seqfast._rules.float32_bfloat16_max_batch); larger steps run the fused bfloat16 step or torch's op.
class CellCall {
 public:
  CellCall(int64_t gates, bool relu, py::dict params, py::list expected, py::object w_ih, py::object w_hh,
           py::object b_ih, py::object b_hh, std::vector<std::pair<int64_t, int64_t>> torch_batches,
           std::vector<std::pair<int64_t, int64_t>> training_torch_batches, bool torch_op, int64_t upcast_min_rows,
           bool bf16_weights, int64_t float32_max_batch, bool fused_past_float32)
      : guard_(std::move(params), std::move(expected)), gates_(gates), relu_(relu), w_ih_(std::move(w_ih)),
        w_hh_(std::move(w_hh)), b_ih_(std::move(b_ih)), b_hh_(std::move(b_hh)),
        torch_batches_(std::move(torch_batches)), training_torch_batches_(std::move(training_torch_batches)),
        torch_op_(torch_op), upcast_min_rows_(upcast_min_rows), bf16_weights_(bf16_weights),
        float32_max_batch_(float32_max_batch), fused_past_float32_(fused_past_float32) {
    TORCH_CHECK(gates == 4 || gates == 3 || gates == 1, "CellCall: gates must be 4, 3 or 1, got ", gates);
    TORCH_CHECK(THPVariable_Check(w_ih_.ptr()) && THPVariable_Check(w_hh_.ptr()), "CellCall: weights must be tensors");
    for (const py::object* b : {&b_ih_, &b_hh_})
      TORCH_CHECK(b->is_none() || THPVariable_Check(b->ptr()), "CellCall: biases must be tensors or None");
    dtype_ = current(w_ih_).scalar_type();
  }

  py::object call(const py::handle& input, const py::handle& hx) const {
    if (!guard_.passes()) return py::none();
    const Tensor* x = plain_cpu(input.ptr(), dtype_);
    if (!x || x->dim() != 2) return py::none();
    const Tensor *h = nullptr, *c = nullptr;
    if (gates_ == 4) {
      PyObject* pair = hx.ptr();
      if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) return py::none();
      h = plain_cpu(PyTuple_GET_ITEM(pair, 0), dtype_);
      c = plain_cpu(PyTuple_GET_ITEM(pair, 1), dtype_);
      if (!c || c->dim() != 2) return py::none();
    } else {
      h = plain_cpu(hx.ptr(), dtype_);
    }
    if (!h || h->dim() != 2) return py::none();
    const Tensor &w_ih = current(w_ih_), &w_hh = current(w_hh_);
    const OptTensor b_ih = b_ih_.is_none() ? OptTensor() : OptTensor(current(b_ih_));
    const OptTensor b_hh = b_hh_.is_none() ? OptTensor() : OptTensor(current(b_hh_));
    if (recorded(*x) || recorded(*h) || (c && recorded(*c)) || recorded(w_ih) || recorded(w_hh) ||
        (b_ih && recorded(*b_ih)) || (b_hh && recorded(*b_hh))) {
      // Inside the training rules (and, for a dtype without the C++ kernels, past the float32 bound, where the
      // functional would run it too): torch's op, which carries a forward-mode tangent as torch does. Elsewhere, for
      // the C++ kernels' dtypes, the step recorded from C++ (rnn_cell_autograd.h) where nothing asks for more
      // (a tangent, a functorch transform, a dispatch mode); the rest goes to the Python path (for a dtype without
      // the C++ kernels, seqfast.functional then decides). torch's shape errors come from that path.
      const int64_t rows = x->size(0);
      const bool torch_here = in_ranges(training_torch_batches_, rows) || (torch_op_ && rows > float32_max_batch_);
      if (!torch_here && (torch_op_ || rows == 0 ||
                          !recordable_here({x, h, c, &w_ih, &w_hh, b_ih ? &*b_ih : nullptr,
                                            b_hh ? &*b_hh : nullptr})))
        return py::none();
      if (check_cell_args(gates_, *x, *h, c ? OptTensor(*c) : OptTensor(), w_ih, w_hh, b_ih, b_hh, false) != kCellOk)
        return py::none();
      if (torch_here) return torch_cell(*x, *h, c, w_ih, w_hh, b_ih, b_hh);
      return released(
          *x, w_ih, w_hh, [&] { return lstm_cell_recorded(*x, *h, *c, w_ih, w_hh, b_ih, b_hh); },
          [&] {
            return gates_ == 3 ? gru_cell_recorded(*x, *h, w_ih, w_hh, b_ih, b_hh)
                               : rnn_cell_recorded(*x, *h, w_ih, w_hh, b_ih, b_hh, relu_);
          });
    }
    if (in_ranges(torch_batches_, x->size(0))) return py::none();
    if (torch_op_) {
      const int64_t rows = x->size(0);
      const bool fused = dtype_ == at::kBFloat16 && rows >= kFusedBf16CellMinRows && step_bf16::available() &&
                         w_ih.numel() + w_hh.numel() <= kFusedBf16CellMaxWeights;
      if (rows <= float32_max_batch_) {
        // past the in-place rows, the fused bfloat16 step where it runs, else float32 upcast copies (the Python path)
        if (upcast_min_rows_ > 0 && rows >= upcast_min_rows_)
          return fused ? fused_bf16_step(*x, *h, c, w_ih, w_hh, b_ih, b_hh) : py::none();
        if (bf16_weights_ && rows > 0) return bf16_step(*x, *h, c, w_ih, w_hh, b_ih, b_hh);
      } else if (fused && fused_past_float32_) {
        return fused_bf16_step(*x, *h, c, w_ih, w_hh, b_ih, b_hh);
      }
      return torch_cell(*x, *h, c, w_ih, w_hh, b_ih, b_hh);
    }
    // torch's shape errors, raised here as the Python path raises them; a weight or bias the kernels cannot read,
    // or a dtype / device mismatch, goes back to that path
    if (check_cell_args(gates_, *x, *h, c ? OptTensor(*c) : OptTensor(), w_ih, w_hh, b_ih, b_hh, false) != kCellOk)
      return py::none();
    return released(*x, w_ih, w_hh,
        [&] {
          auto r = lstm_cell_forward_into(*x, *h, *c, w_ih, w_hh, b_ih, b_hh, Tensor(), Tensor(), false);
          return std::make_tuple(std::move(std::get<0>(r)), std::move(std::get<1>(r)));
        },
        [&] {
          return gates_ == 3 ? std::get<0>(gru_cell_forward_into(*x, *h, w_ih, w_hh, b_ih, b_hh, Tensor(), false))
                             : rnn_cell_forward(*x, *h, w_ih, w_hh, b_ih, b_hh, relu_);
        });
  }
  // (also after .to() / .double() changed the weights in place)
  bool stale() const {
    if (guard_.stale()) return true;
    const Tensor& w = current(w_ih_);
    return w.scalar_type() != dtype_ || !w.device().is_cpu();
  }

 private:
  Guard guard_;
  int64_t gates_;
  bool relu_;
  py::object w_ih_, w_hh_, b_ih_, b_hh_;  // the parameter objects (see current()); a bias may be None
  std::vector<std::pair<int64_t, int64_t>> torch_batches_, training_torch_batches_;
  bool torch_op_;
  int64_t upcast_min_rows_;
  bool bf16_weights_;
  int64_t float32_max_batch_;
  bool fused_past_float32_;  // the fused bfloat16 step past the float32 bound (seqfast._rules.fused_bf16_cells_past_float32)
  at::ScalarType dtype_;

  // One step of x's rows through these weights, the GIL released unless the step is small
  // (call_guard::released_unless_small): lstm() -> (hy, cy) for an LSTM cell, else other() -> hy; returned as the
  // module returns them ((hy, cy) or hy).
  template <class Lstm, class Other>
  py::object released(const Tensor& x, const Tensor& w_ih, const Tensor& w_hh, const Lstm& lstm,
                      const Other& other) const {
    const int64_t work = x.size(0) * (w_ih.numel() + w_hh.numel());
    if (gates_ == 4) {
      std::tuple<Tensor, Tensor> r = released_unless_small(work, lstm);
      return py::make_tuple(wrap(std::move(std::get<0>(r))), wrap(std::move(std::get<1>(r))));
    }
    return wrap(released_unless_small(work, other));
  }

  // A bfloat16 step on float32 copies of its activations (the entries copy the biases), the weights read in place;
  // the results rounded to bfloat16 once (see bf16_weights above).
  py::object bf16_step(const Tensor& x, const Tensor& h, const Tensor* c, const Tensor& w_ih, const Tensor& w_hh,
                       const OptTensor& b_ih, const OptTensor& b_hh) const {
    const int64_t verdict =
        check_cell_args(gates_, x, h, c ? OptTensor(*c) : OptTensor(), w_ih, w_hh, b_ih, b_hh, false);
    if (verdict == kCellTorchOp) return torch_cell(x, h, c, w_ih, w_hh, b_ih, b_hh);
    if (verdict != kCellOk) return py::none();
    return released(x, w_ih, w_hh,
        [&] {
          auto r = lstm_cell_forward_into(x.to(at::kFloat), h.to(at::kFloat), c->to(at::kFloat), w_ih, w_hh, b_ih,
                                          b_hh, Tensor(), Tensor(), false);
          return std::make_tuple(std::get<0>(r).to(at::kBFloat16), std::get<1>(r).to(at::kBFloat16));
        },
        [&] {
          const Tensor xf = x.to(at::kFloat), hf = h.to(at::kFloat);
          return (gates_ == 3 ? std::get<0>(gru_cell_forward_into(xf, hf, w_ih, w_hh, b_ih, b_hh, Tensor(), false))
                              : rnn_cell_forward(xf, hf, w_ih, w_hh, b_ih, b_hh, relu_))
              .to(at::kBFloat16);
        });
  }

  // A bfloat16 step on the fused bfloat16 steps (rnn_sequence_step_bf16.h: vdpbf16ps), run as a one-step layer (each
  // call packs its weights), from kFusedBf16CellMinRows rows for weights of up to kFusedBf16CellMaxWeights elements:
  // past the float32 bound, and inside it past the rows that read the weights in place, in place of float32 upcast
  // copies. Those copies are fresh memory each call, written by one core and read by the other (the weights by both
  // threads of the team), which this VM's cross-core traffic made slow and bimodal: same process, no grad, torch's
  // time over this step's / over the upcast copies': LSTMCell B32 H128 2.59x / 1.14x (0.79x in sweep 110902), RNNCell
  // B64 H128 3.00x / 1.25x, LSTMCell B256 H64 2.55x / 1.13x, GRUCell B64 H64 2.53x / 1.22x, B17 H181 2.77x / 1.27x;
  // one-step layers (ModuleCall) LSTM T1 B32 H128 2.95x / 0.90x, GRU T1 B64 H64 3.53x / 1.08x, RNN T1 B256 H64 2.70x /
  // 0.93x. Past the float32 bound: Zen 5 (AMD EPYC family 26), no grad, torch's time over this one's (torch's
  // cell op through this call: 0.94-1.01x): LSTMCell B32 H256 1.67x, B32 H512 1.19-1.23x, B64 H512 1.24-1.25x, B256
  // H512 1.13-1.16x; GRUCell B16 H512 1.25-1.28x, B32 H256 1.65-1.67x, B64 H512 1.27x, B256 H128 2.03x; RNNCell B32
  // H512 1.53-1.55x, B256 H256 1.62x, B256 H1024 1.13-1.14x -- against weights of 6-8 M elements, where the per-call
  // packing outweighs the step (LSTMCell H1024 0.36x at B8 to 0.86x at B256, GRUCell H1024 0.53-0.88x), and batches
  // of 8, which read 1.16-1.30x in some runs and 0.90-0.91x in others (LSTMCell / GRUCell B8 H512: the machine's
  // slower phases, torch's own time 1.5x its usual, hit the packing harder than torch's op).
  static constexpr int64_t kFusedBf16CellMaxWeights = int64_t(1) << 21;
  static constexpr int64_t kFusedBf16CellMinRows = 16;
  py::object fused_bf16_step(const Tensor& x, const Tensor& h, const Tensor* c, const Tensor& w_ih,
                             const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) const {
    const int64_t verdict =
        check_cell_args(gates_, x, h, c ? OptTensor(*c) : OptTensor(), w_ih, w_hh, b_ih, b_hh, false);
    if (verdict == kCellTorchOp) return torch_cell(x, h, c, w_ih, w_hh, b_ih, b_hh);
    if (verdict != kCellOk) return py::none();  // the Python path raises the named error
    return released(x, w_ih, w_hh,
        [&] {
          auto r = lstm_layer_padded_inference(x, 1, h, *c, w_ih, w_hh, b_ih, b_hh, false);
          return std::make_tuple(std::move(std::get<1>(r)), std::move(std::get<2>(r)));
        },
        [&] {
          return gates_ == 3 ? std::get<1>(gru_layer_padded_forward(x, 1, h, w_ih, w_hh, b_ih, b_hh, false))
                             : std::get<1>(rnn_layer_padded_forward(x, 1, h, w_ih, w_hh, b_ih, b_hh, relu_, false));
        });
  }

  // torch's own cell op (what seqfast.functional calls for these dtypes), the GIL released unless the step is small.
  py::object torch_cell(const Tensor& x, const Tensor& h, const Tensor* c, const Tensor& w_ih, const Tensor& w_hh,
                        const OptTensor& b_ih, const OptTensor& b_hh) const {
    return released(x, w_ih, w_hh, [&] { return at::lstm_cell(x, {h, *c}, w_ih, w_hh, b_ih, b_hh); },
                    [&] {
                      return gates_ == 3 ? at::gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
                             : relu_     ? at::rnn_relu_cell(x, h, w_ih, w_hh, b_ih, b_hh)
                                         : at::rnn_tanh_cell(x, h, w_ih, w_hh, b_ih, b_hh);
                    });
  }
};

}  // namespace

void bind_module_call(py::module_& m) {
  py::class_<ModuleCall>(m, "ModuleCall", "the no-grad forward of one seqfast RNN module, checks included")
      .def(py::init<std::string, py::dict, py::list, py::list, bool, int64_t, bool, bool, int64_t, Regions, int64_t,
                    bool, Regions, Regions, bool>(),
           py::arg("mode"), py::arg("params"), py::arg("expected"), py::arg("weights"), py::arg("has_biases"),
           py::arg("num_layers"), py::arg("bidirectional"), py::arg("batch_first"), py::arg("input_size"),
           py::arg("torch_regions"), py::arg("upcast_min_rows"), py::arg("bf16_cell_steps"),
           py::arg("training_torch") = Regions(), py::arg("float32") = Regions(), py::arg("upcast_steps") = true)
      .def("__call__", &ModuleCall::call, py::arg("input"), py::arg("hx") = py::none(), py::arg("training") = false)
      .def("stale", &ModuleCall::stale);
  py::class_<CellCall>(m, "CellCall", "one step of a seqfast RNN cell module, checks included")
      .def(py::init<int64_t, bool, py::dict, py::list, py::object, py::object, py::object, py::object,
                    std::vector<std::pair<int64_t, int64_t>>, std::vector<std::pair<int64_t, int64_t>>, bool, int64_t,
                    bool, int64_t, bool>(),
           py::arg("gates"), py::arg("relu"), py::arg("params"), py::arg("expected"), py::arg("w_ih"),
           py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("torch_batches"),
           py::arg("training_torch_batches"), py::arg("torch_op"),
           py::arg("upcast_min_rows"), py::arg("bf16_weights"), py::arg("float32_max_batch") = 0,
           py::arg("fused_past_float32") = true)
      .def("__call__", &CellCall::call, py::arg("input"), py::arg("hx"))
      .def("stale", &CellCall::stale);
  m.def("rules_changed", [] { rules_epoch().fetch_add(1); },
        "seqfast._rules.set_rules calls this: every ModuleCall / CellCall / SdpaCall built before declines from "
        "then on");
}

}  // namespace seqfast
