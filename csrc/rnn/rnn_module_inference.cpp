// The whole no-grad forward of an nn.LSTM / GRU / RNN module in one call (seqfast._C.rnn_module_inference): padded
// input, initial states given or zero, every layer and direction on the checked layer entries of rnn_sequence.cpp
// (or, for cell_steps and for float32 one-step calls where rnn.h's one_step_as_cell says so, on the cell entries of
// rnn_cell.cpp one step at a time).
//
// Why: for a short sequence at batch 1 the layer kernel is most of the work, yet the Python around it (zero states,
// time-major views, per-layer argument lists, the stacking of final states) cost about as much again (LSTM T32 B1
// H64 on the Zen 3 EPYC: kernel 80 us, module 150 us); Python that runs right after a kernel also runs on cold
// caches. The module (seqfast/nn/rnn.py) takes this path only when nothing else is needed (no grad, no state given,
// no dropout to draw, the C++ backend chosen, shapes and dtypes as torch's checks want them) and its regular path
// otherwise, so torch's errors stay torch's.
#include "rnn/rnn.h"

#include <cstring>
#include <optional>
#include <vector>

namespace seqfast {

namespace {

// A zero initial state [B, H] for a call without one, kept per thread and reused while its shape and options match.
// Why: the ATen ops around a one-step call cost as much as its kernel (RNN T1 B1 H128 without grad on the Zen 3 EPYC:
// 22 us through this file's cell route against 7 us for the cell entry alone, same process; 10 us with this state and
// the one-step output below), and at::zeros is two of them (an allocation and a fill); in short sequences they show
// too (same-process A/B, T32 B1 H64, 41 rounds, both orders, this state / at::zeros: RNN 1.05-1.10x, LSTM and GRU
// 1.03-1.06x).
// Safe to share: the cell and layer entries only read their initial states, and nothing they return aliases them
// (outputs are new tensors; gather_last copies). Small states only: a large one would stay allocated for the thread's
// life, and its zeros cost nothing next to its steps.
constexpr int64_t kZeroStateMaxNumel = int64_t(1) << 16;
const Tensor& cached_zero_state(int64_t B, int64_t H, const at::TensorOptions& options) {
  static thread_local Tensor zero;
  if (!zero.defined() || zero.size(0) != B || zero.size(1) != H || zero.options().dtype() != options.dtype() ||
      zero.device() != options.device())
    zero = at::zeros({B, H}, options);
  return zero;
}

// The zero initial state of a call without one: the cached one where it is small enough, a new one otherwise.
Tensor zero_state(int64_t B, int64_t H, const at::TensorOptions& options) {
  return B * H <= kZeroStateMaxNumel ? cached_zero_state(B, H, options) : at::zeros({B, H}, options);
}

// One layer and direction as cell steps on float32 rows x [T * B, I] (B rows per step), the weights as they are
// (bfloat16 ones read in place by the cell kernels: see cell_steps below). -> (output rows, h_n, c_n or undefined)
std::tuple<Tensor, Tensor, Tensor> layer_in_cell_steps(const std::string& mode, const Tensor& x, int64_t T,
                                                       const Tensor& h0, const Tensor& c0, const Tensor* w,
                                                       const OptTensor& b_ih, const OptTensor& b_hh, bool reverse) {
  const int64_t B = h0.size(0);
  // one step: the output is a copy of h_n made after the step (torch's output and h_n never share memory), in place
  // of a buffer, two views and a copy (ATen ops cost as much as a small step: see cached_zero_state)
  Tensor out = T == 1 ? Tensor() : at::empty({T * B, h0.size(1)}, x.options());
  Tensor h = h0, c = c0;
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = reverse ? T - 1 - i : i;
    const Tensor xt = T == 1 ? x : x.narrow(0, t * B, B);
    if (mode == "LSTM") {
      auto r = lstm_cell_forward_into(xt, h, c, w[0], w[1], b_ih, b_hh, Tensor(), Tensor(), false);
      h = std::get<0>(r);
      c = std::get<1>(r);
    } else if (mode == "GRU") {
      h = std::get<0>(gru_cell_forward_into(xt, h, w[0], w[1], b_ih, b_hh, Tensor(), false));
    } else {
      h = rnn_cell_forward(xt, h, w[0], w[1], b_ih, b_hh, mode == "RNN_RELU");
    }
    if (T > 1) out.narrow(0, t * B, B).copy_(h);
  }
  return {T == 1 ? h.clone() : out, h, c};
}

// A [rows, cols] alias of a contiguous tensor's data from element `offset` on, made without an ATen op (from_blob
// only wraps the pointer); the caller keeps `t` alive while the alias is in use.
Tensor rows_alias(const Tensor& t, int64_t rows, int64_t cols, int64_t offset = 0) {
  return at::from_blob(t.data_ptr<float>() + offset, {rows, cols}, t.options());
}

// One float32 step of a unidirectional stack of `layers` layers on the cell entries, or nullopt where the general
// route below takes the call (other shapes, a given state of another form: its checks raise the errors). Its returned
// tensors are allocated in their final shapes and each layer's cell writes its h_n and c_n into them through 2-D
// aliases (a layer's input is the h_n of the one below); the output is a copy of the top layer's h_n (torch's output
// and h_n never share memory). Why: this is a seq2seq decoder's call per token, and the general route's ATen ops
// around the kernels (the input reshaped to rows, the states selected and checked, the output cloned from h_n and
// viewed as [T, B, H], the states stacked or unsqueezed) cost about as much as a small step: seqfast._C.ModuleCall
// took RNN B1 H128 in 8.9 us against CellCall's 4.3 on the same step. Same-process A/B on the Zen 3 EPYC (module
// calls, no grad, 21 rounds, both orders; this route / the general one): one layer, B1 and B8 at H128 1.16-1.62x
// (RNN B1 H128 with a state 22.1 -> 14.2 us), B1 H512 1.05-1.40x, LSTM B64 H256 0.98-1.02x; 2-3 layers with a
// state, B1 H256 and B8 H128 1.17-1.35x, RNN B1 H128 1.79x, LSTM B1 H1024 1.01-1.06x.
std::optional<std::tuple<Tensor, Tensor, Tensor>> one_step_layers(const std::string& mode, const Tensor& input,
                                                                  const std::vector<Tensor>& weights,
                                                                  bool has_biases, int64_t layers, bool batch_first,
                                                                  const OptTensor& h0_all, const OptTensor& c0_all) {
  const bool lstm = mode == "LSTM", batched = input.dim() == 3;
  const int64_t T = batched ? input.size(batch_first ? 1 : 0) : input.size(0);
  const int64_t B = batched ? input.size(batch_first ? 0 : 1) : 1;
  if (T != 1 || !one_step_as_cell(B) || !input.is_contiguous()) return std::nullopt;
  const int64_t I = input.size(-1), H = weights[1].size(1), per = has_biases ? 4 : 2;
  const auto opt = input.options();
  // a given state as the general route takes it ([layers, B, H], unbatched [layers, H]), contiguous and of the
  // input's dtype; undefined: not given; nullopt: another form, left to the general route's checks
  const auto given = [&](const OptTensor& s) -> std::optional<Tensor> {
    if (!s.has_value() || !s->defined()) return Tensor();
    if (s->dim() != (batched ? 3 : 2) || s->size(0) != layers || (batched && s->size(1) != B) ||
        s->size(-1) != H || s->scalar_type() != at::kFloat || !s->device().is_cpu() || !s->is_contiguous())
      return std::nullopt;
    return *s;
  };
  const std::optional<Tensor> h0s = given(h0_all), c0s = given(c0_all);
  if (!h0s || !c0s || (!lstm && c0s->defined())) return std::nullopt;
  Tensor zero;
  if (!h0s->defined() || (lstm && !c0s->defined()))
    zero = zero_state(B, H, opt);
  // layer l's initial state: its slice of the given states, or the shared zero state
  const auto initial = [&](const Tensor& s, int64_t l) { return s.defined() ? rows_alias(s, B, H, l * B * H) : zero; };
  // with T = 1 each layout of the input ([1, B, I], batch_first [B, 1, I], unbatched [1, I]) holds the step's rows
  // as a contiguous [B, I], and so does each of the output's
  const std::vector<int64_t> state_shape =
      batched ? std::vector<int64_t>{layers, B, H} : std::vector<int64_t>{layers, H};
  Tensor out = at::empty(!batched ? std::vector<int64_t>{1, H}
                                  : batch_first ? std::vector<int64_t>{B, 1, H} : std::vector<int64_t>{1, B, H},
                         opt);
  Tensor hn = at::empty(state_shape, opt), cn = lstm ? at::empty(state_shape, opt) : Tensor();
  Tensor x = rows_alias(input, B, I);
  for (int64_t l = 0; l < layers; ++l) {
    const Tensor* w = weights.data() + l * per;
    const OptTensor b_ih = has_biases ? OptTensor(w[2]) : OptTensor();
    const OptTensor b_hh = has_biases ? OptTensor(w[3]) : OptTensor();
    Tensor h = rows_alias(hn, B, H, l * B * H);
    if (lstm)
      lstm_cell_forward_into(x, initial(*h0s, l), initial(*c0s, l), w[0], w[1], b_ih, b_hh, h,
                             rows_alias(cn, B, H, l * B * H), false);
    else if (mode == "GRU")
      gru_cell_forward_into(x, initial(*h0s, l), w[0], w[1], b_ih, b_hh, h, false);
    else
      rnn_cell_forward_into(x, initial(*h0s, l), w[0], w[1], b_ih, b_hh, mode == "RNN_RELU", h);
    x = h;
  }
  std::memcpy(out.data_ptr<float>(), x.const_data_ptr<float>(), sizeof(float) * size_t(B * H));
  return std::make_tuple(out, hn, cn);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> rnn_module_inference(const std::string& mode, const Tensor& input,
                                                         const std::vector<Tensor>& weights, bool has_biases,
                                                         int64_t num_layers, bool bidirectional, bool batch_first,
                                                         const OptTensor& h0_all, const OptTensor& c0_all,
                                                         bool cell_steps) {
  const bool lstm = mode == "LSTM", gru = mode == "GRU", relu = mode == "RNN_RELU";
  TORCH_CHECK(lstm || gru || relu || mode == "RNN_TANH", "rnn_module_inference: unknown mode ", mode);
  TORCH_CHECK(input.dim() == 2 || input.dim() == 3, "rnn_module_inference: input must be 2-D or 3-D, got ",
              input.dim(), "-D");
  const int64_t dirs = bidirectional ? 2 : 1, per = has_biases ? 4 : 2;
  TORCH_CHECK(num_layers >= 1 && int64_t(weights.size()) == num_layers * dirs * per,
              "rnn_module_inference: expected ", num_layers * dirs * per, " weights, got ", weights.size());
  if (!cell_steps && !bidirectional && input.scalar_type() == at::kFloat)
    if (auto r = one_step_layers(mode, input, weights, has_biases, num_layers, batch_first, h0_all, c0_all))
      return *r;
  const bool batched = input.dim() == 3;
  // time-major [T, B, I]
  const Tensor x3 = !batched ? input.unsqueeze(1) : batch_first ? input.transpose(0, 1) : input;
  const int64_t T = x3.size(0), B = x3.size(1);
  TORCH_CHECK(T > 0, "Expected sequence length to be larger than 0 in RNN");
  Tensor x = x3.reshape({T * B, x3.size(2)}).contiguous();
  // cell_steps: a bfloat16 call of at most 16 rows per step, computed on float32 copies of the activations and
  // states (the weights read in place), results rounded once (seqfast.functional._cell_steps does the same)
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK(!cell_steps || (dtype == at::kBFloat16 && B <= 16), "rnn_module_inference: cell_steps takes bfloat16 "
              "input of at most 16 rows per step, got ", dtype, " with ", B);
  if (cell_steps) x = x.to(at::kFloat);
  // given initial states as [layers * directions, B, H]; the layer entries check each slice's shape and dtype
  const auto states = [&](const OptTensor& s, const char* name) {
    if (!s.has_value() || !s->defined()) return Tensor();
    const Tensor s3 = batched ? *s : s->unsqueeze(1);
    TORCH_CHECK(s3.dim() == 3 && s3.size(0) == num_layers * dirs, "rnn_module_inference: ", name, " must have ",
                num_layers * dirs, " layer-direction slices, got shape ", s->sizes());
    if (cell_steps) {
      TORCH_CHECK(s3.scalar_type() == dtype, "rnn_module_inference: ", name, " must have dtype ", dtype, ", got ",
                  s3.scalar_type());
      return s3.to(at::kFloat);
    }
    return s3;
  };
  TORCH_CHECK(lstm || !(c0_all.has_value() && c0_all->defined()), "rnn_module_inference: c0 is for LSTM only");
  const Tensor h0s = states(h0_all, "h0"), c0s = states(c0_all, "c0");
  std::vector<Tensor> hn, cn;
  Tensor h0;  // the zero initial state
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    std::vector<Tensor> outs;
    for (int64_t d = 0; d < dirs; ++d) {
      const Tensor* w = weights.data() + (layer * dirs + d) * per;
      const OptTensor b_ih = has_biases ? OptTensor(w[2]) : OptTensor();
      const OptTensor b_hh = has_biases ? OptTensor(w[3]) : OptTensor();
      const int64_t H = w[1].size(1);
      const int64_t slice = layer * dirs + d;
      // the zero state, read only: shared by the layers
      if ((!h0s.defined() || (lstm && !c0s.defined())) && (!h0.defined() || h0.size(1) != H))
        h0 = zero_state(B, H, x.options());
      const Tensor hi = h0s.defined() ? h0s[slice] : h0;
      const bool reverse = d == 1;
      // a float32 one-step call runs as a cell step where that is faster (rnn.h: one_step_as_cell)
      const bool one_cell = !cell_steps && T == 1 && dtype == at::kFloat && one_step_as_cell(B);
      if (cell_steps || one_cell) {
        auto r = layer_in_cell_steps(mode, x, T, hi, lstm ? (c0s.defined() ? c0s[slice] : h0) : Tensor(), w, b_ih,
                                     b_hh, reverse);
        outs.push_back(std::get<0>(r));
        hn.push_back(std::get<1>(r));
        if (lstm) cn.push_back(std::get<2>(r));
      } else if (lstm) {
        auto r = lstm_layer_padded_inference(x, T, hi, c0s.defined() ? c0s[slice] : h0, w[0], w[1], b_ih, b_hh,
                                             reverse);
        outs.push_back(std::get<0>(r));
        hn.push_back(std::get<1>(r));
        cn.push_back(std::get<2>(r));
      } else {
        auto r = gru ? gru_layer_padded_forward(x, T, hi, w[0], w[1], b_ih, b_hh, reverse)
                     : rnn_layer_padded_forward(x, T, hi, w[0], w[1], b_ih, b_hh, relu, reverse);
        outs.push_back(std::get<0>(r));
        hn.push_back(std::get<1>(r));
      }
    }
    x = dirs == 1 ? outs[0] : at::cat(outs, 1);
  }
  Tensor out = x.view({T, B, x.size(1)});
  // one layer and direction: a view of the layer's state, not a stacked copy (an op less per state on a call whose
  // ATen overhead is most of its time at batch 1)
  const auto stacked = [](const std::vector<Tensor>& ts) { return ts.size() == 1 ? ts[0].unsqueeze(0) : at::stack(ts); };
  Tensor h = stacked(hn), c = lstm ? stacked(cn) : Tensor();
  if (cell_steps) {
    out = out.to(dtype);
    h = h.to(dtype);
    if (lstm) c = c.to(dtype);
  }
  if (!batched) {
    out = out.squeeze(1);
    h = h.squeeze(1);
    if (lstm) c = c.squeeze(1);
  } else if (batch_first) {
    out = out.transpose(0, 1);
  }
  return {out, h, c};
}

}  // namespace seqfast
