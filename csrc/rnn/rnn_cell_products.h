// The products of a cell step's backward at a few batch rows, in one pass over the weights (seqfast._C internal;
// rnn_cell_products.cpp, compiled for AVX2 + FMA: callers run behind kern::check_cpu, as every cell kernel does).
//
// From the gate gradients dgi [B, G] (those of the input product) and dgh [B, G] (of the hidden product; the same
// array for the LSTM and the Elman RNN), with x [B, I], h [B, H], W_ih [G, I], W_hh [G, H], all contiguous:
//   dx = dgi W_ih, dh (+)= dgh W_hh, dW_ih = dgi^T x, dW_hh = dgh^T h, db_i = sum over rows of dgi, db_h of dgh.
// Each weight row is read once and its gradient row written once, while it is in L1.
//
// Why: at batch 1-8 these are five or six small ATen products and reductions of a few microseconds each, most of it
// dispatch and allocation: the C++ backward of an RNNCell step at batch 1 took 5.9 / 9.5 us at H64 / H128, 3.5 / 5.4
// us in one pass. Same process, module training steps, one pass against the products: RNNCell B1 H64 / H128 / H256
// 1.11x / 1.12x / 1.02x, B4 H128 1.14x, LSTMCell B1 H64 1.23x, B2 H64 1.04x, B1 H128 1.00x, GRUCell B4 H64 1.17x, B1
// H128 1.01x. Past kMaxWork the single-threaded pass lost (LSTMCell B1 H256 0.97x, B8 H128 0.70x).
#pragma once

#include <cstdint>

namespace seqfast {
namespace cell_products {

// Rows up to which the cells' backward takes this pass, and the multiply-adds of each product pair (B x G x (I + H))
// up to which it does: past them the products' own kernels (ATen / the own GEMMs, split over the team) win.
constexpr int64_t kMaxRows = 8;
constexpr int64_t kMaxWork = int64_t(1) << 17;

// Any output may be null (not needed). dh_accumulate: add into dh (the GRU's pointwise part) instead of writing it.
template <typename T>
void backward(int64_t B, int64_t G, int64_t I, int64_t H, const T* dgi, const T* dgh, const T* x, const T* h,
              const T* w_ih, const T* w_hh, T* dx, T* dh, bool dh_accumulate, T* dw_ih, T* dw_hh, T* db_i, T* db_h);

}  // namespace cell_products
}  // namespace seqfast
