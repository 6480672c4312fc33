#pragma once
// C++ CPU kernels for RNN cells and single-layer, single-direction sequences (seqfast._C).
// All tensors contiguous, same dtype (float32/float64; bfloat16 where noted), validated by the Python caller.
// Gate order as torch.nn: LSTM [i f g o], GRU [r z n]. Optional biases may be absent or undefined (bias=False).
#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace seqfast {
using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// ---- cells (x[B,I], h[B,H]) -------------------------------------------------------------------------------------
// seqfast.functional's cell checks (torch._VF's shape errors, any device; rnn_cell_checks.cpp): gates 4 LSTM (c
// given), 3 GRU, 1 RNN. Returns kCellOk, kCellTorchOp where a weight or bias is not in the layout the kernels read
// (torch's op runs then), or kCellMismatch where a tensor's dtype or device differs from the input's outside autocast
// (the caller raises the named error).
constexpr int64_t kCellTorchOp = 0, kCellOk = 1, kCellMismatch = 2;
int64_t check_cell_args(int64_t gates, const Tensor& input, const Tensor& h, const OptTensor& c, const Tensor& w_ih,
                     const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, bool autocast);
// The cell entries below also take bfloat16 weights (w_ih and w_hh both) under float32 inputs of at most 16 rows,
// where bf16_cell_weights_supported(): the weights are read in place (cpu/bf16_weight_gemv.h), everything else is
// float32, and the backward returns the weight gradients in bfloat16, rounded once.
bool bf16_cell_weights_supported();
// Whether a float32 cell step of B rows (input size I, hidden H; G gates: 4 LSTM, 3 GRU, 1 RNN) runs its two gate
// products and the cell update in one region (rnn_cell.cpp: fused_nt). Bound for the tests.
bool cell_step_fused(int64_t G, int64_t B, int64_t I, int64_t H);
// Whether a float32 one-step LSTM / GRU / RNN layer call of B rows (no grad) runs faster on the cell entries (one
// region reads W_ih and W_hh: the fused dot-product step, the GEMV at one row, or the cell's GEMMs) than as a layer
// (input projection, then the time loop's step): all but 2-3 rows (rnn_cell.cpp).
bool one_step_as_cell(int64_t B);
// Whether the fused AVX-512 float32 LSTM step of a multi-step layer call with `rows` batch rows (input size I, hidden
// H, threads owning `units` units each) starts from one input GEMM over all steps instead of doing x_t W_ih^T inside
// each step (rnn_sequence.cpp, with the measurements). Bound for the tests.
bool lstm_input_first(int64_t rows, int64_t I, int64_t H, int64_t units);
// Whether such a layer call leaves the fused step for the GEMM loop instead (gemm::blas_native CPUs, rnn_sequence.cpp).
// Bound for the tests.
bool lstm_step_yields(int64_t rows, int64_t I, int64_t H, int64_t units);
// -> (hy, cy, gates[B,4H] = activated [i f g o], saved for backward)
std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward(const Tensor& x, const Tensor& hx, const Tensor& cx,
                                                     const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                     const OptTensor& b_hh);
// The cells' backward entries compute dx, dhx, dw_ih and dw_hh only where their need_* flag is set (autograd's
// needs_input_grad: a first step's zero state, an input without gradients, frozen weights), and return undefined
// tensors (None in Python) for the others: at batch 1 each is a pass over a weight matrix or a write of one.
// -> (dx, dhx, dcx, dw_ih, dw_hh, db[4H]); db is the grad of b_ih and of b_hh alike.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward(
    const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& x, const Tensor& hx, const Tensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates, const Tensor& cy, bool need_dx = true,
    bool need_dh = true, bool need_dw_ih = true, bool need_dw_hh = true);
// The forward entries writing their states to given [B, H] tensors (contiguous, the input's dtype; undefined: new
// ones), for callers that allocate the returned tensors in their own shapes (rnn_module_inference's one-step route).
// keep_gates / keep_ws false: no backward will run (the no-grad calls), and the gate workspace is not returned
// (undefined, or a flat scratch tensor): small steps keep it in a per-thread scratch instead of allocating it.
std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward_into(const Tensor& x, const Tensor& hx, const Tensor& cx,
                                                          const Tensor& w_ih, const Tensor& w_hh,
                                                          const OptTensor& b_ih, const OptTensor& b_hh,
                                                          const Tensor& hy, const Tensor& cy, bool keep_gates = true);
std::tuple<Tensor, Tensor> gru_cell_forward_into(const Tensor& x, const Tensor& hx, const Tensor& w_ih,
                                                 const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                                 const Tensor& hy, bool keep_ws = true);
Tensor rnn_cell_forward_into(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                             const OptTensor& b_ih, const OptTensor& b_hh, bool relu, const Tensor& hy);
// -> (hy, ws[B,4H] = [r, z, n, hn], hn = W_hn h + b_hn)
std::tuple<Tensor, Tensor> gru_cell_forward(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                                            const OptTensor& b_ih, const OptTensor& b_hh);
// -> (dx, dhx, dw_ih, dw_hh, db_ih[3H], db_hh[3H])
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_cell_backward(const Tensor& grad_hy, const Tensor& x,
                                                                             const Tensor& hx, const Tensor& w_ih,
                                                                             const Tensor& w_hh, const Tensor& ws,
                                                                             bool need_dx = true, bool need_dh = true,
                                                                             bool need_dw_ih = true,
                                                                             bool need_dw_hh = true);
// -> hy ; relu selects nonlinearity='relu' (else tanh)
Tensor rnn_cell_forward(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                        const OptTensor& b_ih, const OptTensor& b_hh, bool relu);
// -> (dx, dhx, dw_ih, dw_hh, db[H])
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_cell_backward(const Tensor& grad_hy, const Tensor& x,
                                                                     const Tensor& hx, const Tensor& w_ih,
                                                                     const Tensor& w_hh, const Tensor& hy, bool relu,
                                                                     bool need_dx = true, bool need_dh = true,
                                                                     bool need_dw_ih = true, bool need_dw_hh = true);

// ---- sequences: one layer, one direction, time-major packed input -----------------------------------------------
// x[N,I]: step t occupies rows [off_t, off_t + bs_t); batch_sizes[T] int64 CPU, non-increasing; B = h0.size(0).
// reverse walks t from T-1 to 0. Rows inactive at a step keep their state; hn holds each row's final state.
// -> (out[N,H], hn[B,H], cn[B,H], gates[N,4H] activated gates, cs[N,H] cell state after each step)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward(const Tensor& x, const Tensor& batch_sizes,
                                                                      const Tensor& h0, const Tensor& c0,
                                                                      const Tensor& w_ih, const Tensor& w_hh,
                                                                      const OptTensor& b_ih, const OptTensor& b_hh,
                                                                      bool reverse);
// Same outputs without keeping the backward's workspaces where the kernel can avoid them (gates may come back with
// 0 rows). Called by the eager no-grad path only.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_inference(const Tensor& x, const Tensor& batch_sizes,
                                                                        const Tensor& h0, const Tensor& c0,
                                                                        const Tensor& w_ih, const Tensor& w_hh,
                                                                        const OptTensor& b_ih, const OptTensor& b_hh,
                                                                        bool reverse);
// The no-grad forward of a padded input: x [T * B, I], every step B rows (B = h0.size(0)), no batch-sizes tensor.
// Called by rnn_module_inference. -> (out, hn, cn)
std::tuple<Tensor, Tensor, Tensor> lstm_layer_padded_inference(const Tensor& x, int64_t steps, const Tensor& h0,
                                                               const Tensor& c0, const Tensor& w_ih,
                                                               const Tensor& w_hh, const OptTensor& b_ih,
                                                               const OptTensor& b_hh, bool reverse);
// The layers' backward entries compute dx, dw_ih and dw_hh only where their need_* flag is set (autograd's
// needs_input_grad: a first layer's input without gradients, frozen weights) and return undefined tensors (None in
// Python) for the others; dh0 (and dc0) always.
// -> (dx[N,I], dh0, dc0, dw_ih, dw_hh, db[4H])
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn, const Tensor& x, const Tensor& batch_sizes,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& out,
    const Tensor& gates, const Tensor& cs, bool reverse, bool need_dx = true, bool need_dw_ih = true,
    bool need_dw_hh = true);
// An LSTM layer with a projection (proj_size P > 0; rnn_sequence_proj.cpp), float32 / float64: h0 [B, P], c0 [B, H],
// w_hh [4H, P], w_hr [P, H]. -> (out[N,P], hn[B,P], cn[B,H], gates[N,4H] activated gates, cs[N,H] cell state after each
// step, hs[N,H] the unprojected h = o tanh(c) of each step)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_proj_layer_forward(
    const Tensor& x, const Tensor& batch_sizes, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
    const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const Tensor& w_hr, bool reverse);
// -> (dx, dh0, dc0, dw_ih, dw_hh, db[4H], dw_hr); dx and the weight gradients only where their need_* flag is set
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_proj_layer_backward(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn, const Tensor& x, const Tensor& batch_sizes,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& w_hr, const Tensor& out,
    const Tensor& gates, const Tensor& cs, const Tensor& hs, bool reverse, bool need_dx = true,
    bool need_dw_ih = true, bool need_dw_hh = true, bool need_dw_hr = true);
// -> (out, hn, ws[N,4H] = [r, z, n, hn] per row)
std::tuple<Tensor, Tensor, Tensor> gru_layer_forward(const Tensor& x, const Tensor& batch_sizes, const Tensor& h0,
                                                     const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                     const OptTensor& b_hh, bool reverse);
// The padded twin of gru_layer_forward (see lstm_layer_padded_inference) -> (out, hn)
std::tuple<Tensor, Tensor> gru_layer_padded_forward(const Tensor& x, int64_t steps, const Tensor& h0,
                                                    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                    const OptTensor& b_hh, bool reverse);
// -> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_backward(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& x, const Tensor& batch_sizes, const Tensor& h0,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& out, const Tensor& ws, bool reverse, bool need_dx = true,
    bool need_dw_ih = true, bool need_dw_hh = true);
// -> (out, hn)
std::tuple<Tensor, Tensor> rnn_layer_forward(const Tensor& x, const Tensor& batch_sizes, const Tensor& h0,
                                             const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                             const OptTensor& b_hh, bool relu, bool reverse);
// The padded twin of rnn_layer_forward (see lstm_layer_padded_inference) -> (out, hn)
std::tuple<Tensor, Tensor> rnn_layer_padded_forward(const Tensor& x, int64_t steps, const Tensor& h0,
                                                    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                    const OptTensor& b_hh, bool relu, bool reverse);
// -> (dx, dh0, dw_ih, dw_hh, db)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_layer_backward(const Tensor& grad_out, const Tensor& grad_hn,
                                                                      const Tensor& x, const Tensor& batch_sizes,
                                                                      const Tensor& h0, const Tensor& w_ih,
                                                                      const Tensor& w_hh, const Tensor& out,
                                                                      bool relu, bool reverse, bool need_dx = true,
                                                                      bool need_dw_ih = true, bool need_dw_hh = true);

// ---- a whole module's no-grad forward (rnn_module_inference.cpp) ----
// mode "LSTM" | "GRU" | "RNN_TANH" | "RNN_RELU"; input [T, B, I] ([B, T, I] batch_first) or unbatched [T, I];
// initial states h0 (and c0, LSTM) [layers * directions, B, H] ([layers * directions, H] unbatched), zero where not
// given; weights flat per layer and direction: w_ih, w_hh (, b_ih, b_hh). -> (output, h_n, c_n (LSTM, else
// undefined)), shaped as torch.nn's. cell_steps: bfloat16 input of at most 16 rows per step, run as float32 cell steps
// with the bfloat16 weights read in place (seqfast.functional._cell_steps' no-grad twin).
std::tuple<Tensor, Tensor, Tensor> rnn_module_inference(const std::string& mode, const Tensor& input,
                                                         const std::vector<Tensor>& weights, bool has_biases,
                                                         int64_t num_layers, bool bidirectional, bool batch_first,
                                                         const OptTensor& h0 = std::nullopt,
                                                         const OptTensor& c0 = std::nullopt, bool cell_steps = false);

// False on an x86-64 CPU without AVX2+FMA, where the RNN kernels refuse to run (Python then uses the reference).
bool rnn_kernels_supported();

}  // namespace seqfast
