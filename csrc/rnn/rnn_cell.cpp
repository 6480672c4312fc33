// RNN cell steps (LSTM / GRU / Elman) for CPU. Forward: for small batches the gate pre-activations come from our
// own GEMV (both x W_ih^T and h W_hh^T accumulated in one pass over the weight rows), fused with bias, activations
// and state update inside one (optionally parallel) region over hidden units; for larger batches GEMMs into the
// gate buffer (gemm::linear_out: the own AVX2 kernel or BLAS) followed by one fused pointwise pass. Backward: one
// fused pointwise pass for the gate derivatives, then the GEMMs through gemm::mm (the own AVX2 kernels or ATen).
#include "rnn/rnn.h"
#include "rnn/rnn_args.h"
#include "rnn/rnn_cell_products.h"
#include "rnn/rnn_pointwise.h"
#include "cpu/bf16_weight_gemv.h"
#include "cpu/gemm.h"
#include "cpu/gemv_avx512.h"
#include "cpu/sgemm_wt.h"
#include "cpu/team.h"

#include <ATen/Dispatch.h>
#include <array>
#include <type_traits>

namespace seqfast {

namespace {

using kern::kMaxSmallB;

// The input gradients a backward call computes (rnn.h: the entries' need_* flags).
struct Needs {
  bool dx = true, dh = true, dw_ih = true, dw_hh = true;
};

// TW: the weights' element type, T's own, or bfloat16 under float32 activations: a bfloat16 step at batch 1-16 on a
// CPU without native bfloat16, which reads its weights in place (cpu/bf16_weight_gemv.h; seqfast._rules). Those
// steps always take the small-batch GEMV; every other tensor of theirs is float32.
template <typename T, typename TW>
constexpr bool kBf16Weights = !std::is_same_v<T, TW>;

inline const uint16_t* bits(const at::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }

// A forward step's workspace of n T: `keep` itself where a backward will read it (defined), else, up to
// kScratchBytes, slot `slot` (0 or 1) of a per-thread scratch; larger ones allocate `keep`. A no-grad cell step (a
// seq2seq decoder's token at batch 1) otherwise allocated and freed tensors for gate values nothing reads after it.
constexpr size_t kScratchBytes = size_t(32) << 10;
template <typename T>
T* step_workspace(Tensor& keep, int64_t n, const at::TensorOptions& opt, int slot) {
  if (!keep.defined()) {
    if (size_t(n) * sizeof(T) <= kScratchBytes) {
      alignas(64) static thread_local unsigned char scratch[2][kScratchBytes];
      return reinterpret_cast<T*>(scratch[slot]);
    }
    keep = at::empty({n}, opt);
  }
  return keep.data_ptr<T>();
}

template <typename T, typename TW>
inline void gemv_w(int64_t nb, const T* const* x1, const TW* w1, int64_t K1, const T* const* x2, const TW* w2,
                   int64_t K2, T* const* y, int64_t j0, int64_t j1, bool accumulate) {
  if constexpr (kBf16Weights<T, TW>) {
    static_assert(std::is_same_v<T, float> && std::is_same_v<TW, at::BFloat16>, "bfloat16 weights, float32 rows");
    bf16w::gemv(nb, x1, bits(w1), K1, x2, bits(w2), K2, y, j0, j1, accumulate);
  } else {
    kern::gemv<T>(nb, x1, w1, K1, x2, w2, K2, y, j0, j1, accumulate);
  }
}

// Whether a cell step of B rows takes the small-batch GEMV (kern::gemv: one pass over the weights per group of up
// to 4 rows) rather than the products of fused_nt / linear_out: 1-2 rows as the time loops (kern::use_small), and on
// CPUs with the AVX-512 GEMV (cpu/gemv_avx512.h) 3-4 rows too, where its 4-row tile read the weights once against the
// dot-product form's 3-row tiles. Zen 5, same process, no grad, GEMV / dot-product form: LSTMCell B4 H256 21.1 / 26.7
// us, B3 H256 20.5 / 22.8, B4 H64 8.5 / 8.7, GRUCell B3 H512 53.9 / 58.8, B4 H1024 341 / 350, RNNCell B4 H1024 77.1 /
// 89.4, GRU T1 B4 H512 54.3 / 66.4; training steps the same (0.98-1.00x). 5-6 rows (two groups, or an 8-row tile) read
// 0.88-1.14x and stay on the dot-product form. An explicit SEQFAST_CPU_SMALL_BATCH keeps its meaning. Steps with
// bfloat16 weights (see kBf16Weights) always take it.
template <typename T, typename TW>
inline bool cell_gemv(int64_t B) {
  if constexpr (kBf16Weights<T, TW>) return true;
  if (!cpu::config().small_batch_set && gemv512::available()) return B <= 4;
  return kern::use_small(B);
}

// The work a cell_gemv step hands kern::par_units (which splits it over the team from config().par_min_work on): B
// rows x `weights` (G H (I + H)) multiply-adds, except on the AVX-512 GEMV, where the weights alone decide. Why: that
// kernel's time grows with the weights it streams, hardly with the rows (one load feeds all 1-4), so a team repays
// its fork and join from the same weight count at any row count. Zen 5 (AMD EPYC family 26), module steps, no grad,
// same process, one thread's time over two threads': at 1-4 rows, weights 55K-153K 0.58-0.89x, 204K 0.97-1.10x, 221K
// 0.92-0.98x, 294K 1.14-1.26x, 393K+ 1.21-1.43x; the rows x weights rule had put 2-4 rows of 33K-131K weights on two
// threads (RNNCell B4 H128 8.9 against 5.9 us on one, LSTMCell B1 H128 10.5 against 8.1). So two threads from 1.5 x
// par_min_work weights (196K at the default).
template <typename T, typename TW>
inline int64_t gemv_work(int64_t B, int64_t weights) {
  if constexpr (std::is_same_v<T, float> && !kBf16Weights<T, TW>) {
    if (gemv512::available()) return weights * 2 >= kern::par_min_work() * 3 ? B * weights : 0;
  }
  return B * weights;
}

// f(TW()) for the weights' element type (see kBf16Weights): the entries accept bfloat16 weights under float32 input
// only.
template <typename T, typename F>
inline void with_weight_type(const Tensor& w, const F& f) {
  if constexpr (std::is_same_v<T, float>) {
    if (w.scalar_type() == at::kBFloat16) return f(at::BFloat16());
  }
  f(T());
}

// Whether a cell step of B rows takes its gate products (G gates) on the own kernels that read the weights in place, in
// its own parallel region, with the cell update: float32 weights where gemm::wt_takes the summed products (the
// broadcast form, A packed once before the region), or where gemm::nt_takes both (as linear_out would) and the
// dot-product kernel's gemm2 sums them in one pass. Why: the two products then share their accumulators (one reduction and store per output,
// not two), and the step makes one fork / join instead of three (two products, one pointwise pass). Same-process A/B
// on the Zen 3 EPYC (module step, no grad, fused / before): LSTMCell B8 H128 31 / 40 us, B16 H64 24.5 / 30.8, GRUCell
// B4 H128 20.2 / 26.9, B8 H256 69 / 77; 0.99-1.01x at B32 H128-256. Past one pass (LSTMCell B64 H512: 0.93-0.96x)
// the products stay apart.
template <typename T, typename TW>
inline bool fused_nt(int64_t B, int64_t G, int64_t I, int64_t H) {
  if constexpr (std::is_same_v<T, float> && !kBf16Weights<T, TW>)
    return cpu::config().nt_cells &&
           (gemm::wt_takes(B, G * H, I + H) ||
            (gemm::nt_takes(B, G * H, I) && gemm::nt_takes(B, G * H, H) && sgemm_nt::one_pass(B, I, H)));
  else
    return false;
}

// The work that decides a fused step's threads: the larger product's multiply-adds, as linear_out counts each product
// (a step split at the sum of both ran 0.94x at LSTMCell B4 H64, where each product alone stays on one thread).
inline int64_t nt_work(int64_t B, int64_t G, int64_t I, int64_t H) { return B * G * H * std::max(I, H); }

// A fused step's gate products for the gate rows [j0, j1) of the weights, into out[:, j0:j1] (row stride ldo): on the
// broadcast form where gemm::wt_takes them (x and h packed here, on the calling thread, before the region), else on
// the dot-product kernel. The tensors are float32 with contiguous rows (the entries' checks made them so).
struct NtProducts {
  int64_t B, I, H, G;
  const float *x, *h, *wi, *wh;
  block_pool::Floats packed;  // x, then h, packed for the broadcast form (none: the dot-product kernel)
  sgemm_wt::Operand xo, ho;
  NtProducts(const Tensor& x_, const Tensor& h_, const Tensor& w_ih, const Tensor& w_hh)
      : NtProducts(x_.size(0), x_.size(1), h_.size(1), w_ih.size(0), x_.const_data_ptr<float>(),
                   h_.const_data_ptr<float>(), w_ih.const_data_ptr<float>(), w_hh.const_data_ptr<float>()) {}
  // rows B of x [., I] and h [., H] (contiguous rows), weights w_ih [G, I], w_hh [G, H]
  NtProducts(int64_t B_, int64_t I_, int64_t H_, int64_t G_, const float* x_, const float* h_, const float* wi_,
             const float* wh_)
      : B(B_), I(I_), H(H_), G(G_), x(x_), h(h_), wi(wi_), wh(wh_) {
    if (!gemm::wt_takes(B, G, I + H)) return;
    const int64_t sx = sgemm_wt::pack_size(B, I);
    packed.reset(sx + sgemm_wt::pack_size(B, H));
    if (!packed.ok()) return;  // no memory for the packing: the dot-product kernel, which needs none
    sgemm_wt::pack(B, I, x, I, packed.get());
    sgemm_wt::pack(B, H, h, H, packed.get() + sx);
    const bool stream = sgemm_wt::streams_weights(G * (I + H));
    xo = sgemm_wt::Operand{I, packed.get(), wi, I, 1, stream};
    ho = sgemm_wt::Operand{H, packed.get() + sx, wh, H, 1, stream};
  }
  // x W_ih^T + h W_hh^T, summed in one pass
  void sum(float* out, int64_t ldo, int64_t j0, int64_t j1) const {
    if (packed.ok()) return sgemm_wt::gemm(B, j0, j1, xo, ho, 0.f, out, ldo, nullptr);
    sgemm_nt::gemm2(B, j1 - j0, I, x, I, wi + j0 * I, I, H, h, H, wh + j0 * H, H, 0.f, out + j0, ldo);
  }
  // x W_ih^T alone, and h W_hh^T alone
  void input(float* out, int64_t ldo, int64_t j0, int64_t j1) const {
    if (packed.ok()) return sgemm_wt::gemm(B, j0, j1, xo, sgemm_wt::Operand{}, 0.f, out, ldo, nullptr);
    sgemm_nt::gemm(B, j1 - j0, I, x, I, wi + j0 * I, I, 0.f, out + j0, ldo);
  }
  void hidden(float* out, int64_t ldo, int64_t j0, int64_t j1) const {
    if (packed.ok()) return sgemm_wt::gemm(B, j0, j1, ho, sgemm_wt::Operand{}, 0.f, out, ldo, nullptr);
    sgemm_nt::gemm(B, j1 - j0, H, h, H, wh + j0 * H, H, 0.f, out + j0, ldo);
  }
};

// How a fused step (fused_nt) shares its work. Where the weights fit half a core's L2, each thread can keep its own
// copy of them, while rows packed on one core cost every teammate a transfer from that core's cache. So with such
// weights each thread packs the rows itself: from 32 rows the batch rows are split (each thread packing and
// multiplying its own rows by all of the weights; 16-row blocks, the narrow form's width), below that the units (each
// thread packing all the rows; one chunk of units per thread, no pieces to steal). Larger weights split the units in
// shared pieces over rows packed once: each thread streams its own part of W, which dominates. Same process, Zen 5
// (AMD EPYC family 26, 2 vCPUs), module steps, no grad, the units split over rows packed once against this split, in
// a phase when the VM's cross-core traffic ran slow (a 1-2 row LSTM step's barrier then cost about 0.8 us more):
// RNNCell B128 H128 60 / 34 us, LSTMCell B64 H64 42 / 28, GRUCell B128 H128 102 / 87, LSTMCell B8 H128 18.6 / 13.0
// (one thread 18.7), B16 H128 25.9 / 17.2, B24 H128 43.2 / 25.5; in a quicker phase 0.93-1.25x (RNNCell B128 H128
// 1.25x, GRUCell B64-128 1.09x, RNNCell B8 H128 and B64 H64, on one thread here, 0.93x).
constexpr int64_t kRowBlock = 16;
enum class FusedSplit { kRows, kUnitsOwnRows, kUnits };
inline FusedSplit fused_split(int64_t B, int64_t G, int64_t I, int64_t H) {
  if (int64_t(sizeof(float)) * G * H * (I + H) > cpu::l2_cache_bytes() / 2) return FusedSplit::kUnits;
  return B >= 2 * kRowBlock ? FusedSplit::kRows : FusedSplit::kUnitsOwnRows;
}

// A fused step's products over the team as fused_split says: units(p, k0, k1) for a chunk of units [k0, k1) of all
// the rows, or rows(p, r0, r1) for a chunk of batch rows [r0, r1) of all the units, p the NtProducts of the rows it
// covers (x, hx [B, .] float32 with contiguous rows; w_ih [G H, I], w_hh [G H, H]). Teams:
//   * kUnits: kern::par_units on nt_work, rows packed once (shared pieces);
//   * kUnitsOwnRows: one chunk of 16-unit blocks per thread, from 2 x config().par_min_work multiply-adds each, since
//     every chunk packs all the rows again (GRUCell B8 H64, 0.2M multiply-adds, ran 14.1 us on two threads against
//     8.4 on one);
//   * kRows: 16-row blocks, from 4 x par_min_work multiply-adds a chunk. Same process, Zen 5, module steps, no grad,
//     time with the units split / the rows split / one thread over the rows split: LSTMCell B64 H64 1.49 / 1.18x,
//     B128 H64 1.22 / 1.35x, B100 H96 1.11 / 1.46x, GRUCell B64 H64 1.50 / 1.13x, B128 H128 1.18 / 1.56x, RNNCell
//     B128 H128 1.77 / 1.37x, B64 H256 1.33 / 1.53x; RNNCell B64 H64 (0.5M multiply-adds) 1.36 / 0.83x, hence the 4 x.
template <class Units, class Rows>
inline void fused_step(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const Units& units,
                       const Rows& rows) {
  const int64_t B = x.size(0), I = x.size(1), H = hx.size(1), GH = w_ih.size(0);
  const FusedSplit split = fused_split(B, GH / H, I, H);
  const int64_t work = B * GH * (I + H);
  const auto chunks = [&](int64_t blocks, int64_t min_chunk, const auto& f) {
    const int64_t per_block = std::max<int64_t>(1, work / blocks);
    cpu::parallel_for(blocks, (min_chunk + per_block - 1) / per_block, [&](int64_t a0, int64_t a1, int) { f(a0, a1); });
  };
  if (split == FusedSplit::kUnits) {
    const NtProducts p(x, hx, w_ih, w_hh);
    kern::par_units(H, nt_work(B, GH / H, I, H), [&](int64_t k0, int64_t k1) { units(p, k0, k1); });
  } else if (split == FusedSplit::kUnitsOwnRows) {
    chunks((H + 15) / 16, 2 * kern::par_min_work(), [&](int64_t a0, int64_t a1) {
      const NtProducts p(x, hx, w_ih, w_hh);
      units(p, a0 * 16, std::min(H, a1 * 16));
    });
  } else {
    chunks((B + kRowBlock - 1) / kRowBlock, 4 * kern::par_min_work(), [&](int64_t a0, int64_t a1) {
      const int64_t r0 = a0 * kRowBlock, r1 = std::min(B, a1 * kRowBlock);
      const NtProducts p(r1 - r0, I, H, GH, x.const_data_ptr<float>() + r0 * I, hx.const_data_ptr<float>() + r0 * H,
                         w_ih.const_data_ptr<float>(), w_hh.const_data_ptr<float>());
      rows(p, r0, r1);
    });
  }
}

// Rows of a product with bfloat16 weights per chunk of the team: enough multiply-adds to be worth a thread.
inline int64_t bf16_grain(int64_t work_per_row) {
  return std::max<int64_t>(1, kern::par_min_work() / std::max<int64_t>(1, work_per_row));
}

// The products of a backward (dx, dh, dW_ih, dW_hh and the bias gradients) from the gate gradients dgi (input product)
// and dgh (hidden product; the same tensor for the LSTM and the Elman RNN) in one pass (rnn/rnn_cell_products.h),
// where the step has at most cell_products::kMaxRows rows, weights of its own dtype and at most kMaxWork
// multiply-adds per product pair;
// false: the caller runs grad_in / grad_w. dh: defined (the GRU's pointwise part) to add the product into; else made
// here where needed. The six results as the cells' backward returns them (db_h undefined when dgh is dgi).
bool small_products(const Tensor& dgi, const Tensor& dgh, const Tensor& x, const Tensor& hx, const Tensor& w_ih,
                    const Tensor& w_hh, const Needs& n, Tensor dh, std::array<Tensor, 6>& out) {
  const int64_t B = x.size(0), G = w_ih.size(0), I = x.size(1), H = hx.size(1);
  if (B > cell_products::kMaxRows || w_ih.scalar_type() != x.scalar_type() ||
      B * G * (I + H) > cell_products::kMaxWork)
    return false;
  const bool acc = dh.defined(), two = !dgh.is_same(dgi);
  const auto opt = x.options();
  Tensor dx = n.dx ? at::empty({B, I}, opt) : Tensor();
  if (!n.dh) dh = Tensor();
  else if (!acc) dh = at::empty({B, H}, opt);
  Tensor dwi = n.dw_ih ? at::empty({G, I}, opt) : Tensor(), dwh = n.dw_hh ? at::empty({G, H}, opt) : Tensor();
  Tensor dbi = at::empty({G}, opt), dbh = two ? at::empty({G}, opt) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::cell_products", [&] {
    using T = scalar_t;
    const auto ptr = [](Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    cell_products::backward<T>(B, G, I, H, dgi.const_data_ptr<T>(), dgh.const_data_ptr<T>(), x.const_data_ptr<T>(),
                               hx.const_data_ptr<T>(), w_ih.const_data_ptr<T>(), w_hh.const_data_ptr<T>(), ptr(dx),
                               ptr(dh), acc, ptr(dwi), ptr(dwh), ptr(dbi), ptr(dbh));
  });
  out = {dx, dh, dwi, dwh, dbi, dbh};
  return true;
}

// dg [B, G] @ w [G, K]: the backward's input or state gradient. bfloat16 w under float32 dg: the in-place kernel, the
// weight rows split over the team, each chunk summing into rows of its own that are added up after.
Tensor grad_in(const Tensor& dg, const Tensor& w) {
  if (w.scalar_type() == dg.scalar_type()) return gemm::mm(dg, w);
  const int64_t B = dg.size(0), G = w.size(0), K = w.size(1);
  const Tensor d = dg.contiguous();
  const uint16_t* wp = bits(w.const_data_ptr<at::BFloat16>());
  const int64_t grain = bf16_grain(B * K);
  const int nc = cpu::parallel_chunks(G, grain);
  if (nc <= 1) {
    Tensor y = at::empty({B, K}, dg.options());
    bf16w::gemv_t(B, d.const_data_ptr<float>(), G, wp, K, 0, G, y.data_ptr<float>(), false);
    return y;
  }
  Tensor part = at::zeros({nc, B, K}, dg.options());
  float* pp = part.data_ptr<float>();
  cpu::parallel_for(G, grain, [&](int64_t j0, int64_t j1, int c) {
    bf16w::gemv_t(B, d.const_data_ptr<float>(), G, wp, K, j0, j1, pp + c * B * K, true);
  });
  return part.sum(0);
}

// dg [B, G]^T @ x [B, K]: a weight's gradient, of w's dtype. bfloat16 w under float32 dg: summed in float32 and
// rounded once, the rows split over the team.
Tensor grad_w(const Tensor& dg, const Tensor& x, const Tensor& w) {
  if (w.scalar_type() == dg.scalar_type()) return gemm::mm(dg.t(), x);
  const int64_t B = dg.size(0), G = dg.size(1), K = x.size(1);
  TORCH_CHECK(B <= kMaxSmallB, "seqfast: bfloat16 weight gradients take at most ", kMaxSmallB, " rows, got ", B);
  Tensor dw = at::empty({G, K}, w.options());
  const Tensor d = dg.contiguous(), xc = x.contiguous();
  uint16_t* out = reinterpret_cast<uint16_t*>(dw.data_ptr<at::BFloat16>());
  cpu::parallel_for(G, bf16_grain(B * K), [&](int64_t j0, int64_t j1, int) {
    bf16w::outer(B, d.const_data_ptr<float>(), G, xc.const_data_ptr<float>(), K, j0, j1, out);
  });
  return dw;
}

template <typename T, typename TW>
void lstm_cell_fwd_impl(const Tensor& x, const Tensor& hx, const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
                        const T* b1, const T* b2, Tensor& hy, Tensor& cy, Tensor& gates) {
  const int64_t B = x.size(0), I = x.size(1), H = hx.size(1);
  if (B == 0 || H == 0) return;
  // the route decided once (the workspace depends on it)
  const bool gemv = cell_gemv<T, TW>(B), fused = !gemv && fused_nt<T, TW>(B, 4, I, H);
  if (!gemv && !fused && !gates.defined()) gates = at::empty({B, 4 * H}, x.options());  // linear2_out writes a tensor
  T* g = step_workspace<T>(gates, B * 4 * H, x.options(), 0);
  const T* c = cx.const_data_ptr<T>();
  T* hyp = hy.data_ptr<T>();
  T* cyp = cy.data_ptr<T>();
  if (gemv) {
    std::array<const T*, kMaxSmallB> xr, hr;
    std::array<T*, kMaxSmallB> gr;
    for (int64_t b = 0; b < B; ++b) {
      xr[b] = x.const_data_ptr<T>() + b * I;
      hr[b] = hx.const_data_ptr<T>() + b * H;
      gr[b] = g + b * 4 * H;
    }
    const TW* wi = w_ih.const_data_ptr<TW>();
    const TW* wh = w_hh.const_data_ptr<TW>();
    kern::par_units(H, gemv_work<T, TW>(B, 4 * H * (I + H)), [&](int64_t k0, int64_t k1) {
      for (int64_t q = 0; q < 4; ++q)
        gemv_w<T, TW>(B, xr.data(), wi, I, hr.data(), wh, H, gr.data(), q * H + k0, q * H + k1, false);
      for (int64_t b = 0; b < B; ++b)
        kern::lstm_fwd_row<T>(g + b * 4 * H, b1, b2, c + b * H, cyp + b * H, hyp + b * H, H, k0, k1);
    });
  } else if (fused) {
    if constexpr (std::is_same_v<T, float>) {
      const auto update = [&](int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
        for (int64_t b = r0; b < r1; ++b)
          kern::lstm_fwd_row<T>(g + b * 4 * H, b1, b2, c + b * H, cyp + b * H, hyp + b * H, H, k0, k1);
      };
      fused_step(
          x, hx, w_ih, w_hh,
          [&](const NtProducts& p, int64_t k0, int64_t k1) {
            for (int64_t q = 0; q < 4; ++q) p.sum(g, 4 * H, q * H + k0, q * H + k1);
            update(0, B, k0, k1);
          },
          [&](const NtProducts& p, int64_t r0, int64_t r1) {
            p.sum(g + r0 * 4 * H, 4 * H, 0, 4 * H);
            update(r0, r1, 0, H);
          });
    }
  } else {
    gemm::linear2_out(gates, x, w_ih, gates, hx, w_hh, true);  // both products in one region where it can
    kern::par_rows(B, 64 * H, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b)
        kern::lstm_fwd_row<T>(g + b * 4 * H, b1, b2, c + b * H, cyp + b * H, hyp + b * H, H, 0, H);
    });
  }
}

template <typename T, typename TW>
void gru_cell_fwd_impl(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const T* bih,
                       const T* bhh, Tensor& hy, Tensor& ws) {
  const int64_t B = x.size(0), I = x.size(1), H = hx.size(1);
  if (B == 0 || H == 0) return;
  // gi/gh pre-activations: [B, 6H] scratch, gi = cols [0,3H), gh = [3H,6H).
  // the route decided once (the workspace depends on it)
  const bool gemv = cell_gemv<T, TW>(B), fused = !gemv && fused_nt<T, TW>(B, 3, I, H);
  Tensor pre = !gemv && !fused ? at::empty({B, 6 * H}, x.options()) : Tensor();  // linear2_out writes a tensor
  T* pp = step_workspace<T>(pre, B * 6 * H, x.options(), 0);
  const T* h = hx.const_data_ptr<T>();
  T* hyp = hy.data_ptr<T>();
  // the gate values a backward reads, or none (not stored) where no backward will
  T* wsp = ws.defined() ? ws.data_ptr<T>() : nullptr;
  const auto ws_row = [&](int64_t b) { return wsp ? wsp + b * 4 * H : nullptr; };
  if (gemv) {
    std::array<const T*, kMaxSmallB> xr, hr;
    std::array<T*, kMaxSmallB> gir, ghr;
    for (int64_t b = 0; b < B; ++b) {
      xr[b] = x.const_data_ptr<T>() + b * I;
      hr[b] = h + b * H;
      gir[b] = pp + b * 6 * H;
      ghr[b] = pp + b * 6 * H + 3 * H;
    }
    const TW* wi = w_ih.const_data_ptr<TW>();
    const TW* wh = w_hh.const_data_ptr<TW>();
    kern::par_units(H, gemv_work<T, TW>(B, 3 * H * (I + H)), [&](int64_t k0, int64_t k1) {
      for (int64_t q = 0; q < 3; ++q) {
        gemv_w<T, TW>(B, xr.data(), wi, I, nullptr, nullptr, 0, gir.data(), q * H + k0, q * H + k1, false);
        gemv_w<T, TW>(B, hr.data(), wh, H, nullptr, nullptr, 0, ghr.data(), q * H + k0, q * H + k1, false);
      }
      for (int64_t b = 0; b < B; ++b)
        kern::gru_fwd_row<T>(pp + b * 6 * H, bih, pp + b * 6 * H + 3 * H, bhh, h + b * H, hyp + b * H,
                             ws_row(b), H, k0, k1);
    });
  } else if (fused) {
    if constexpr (std::is_same_v<T, float>) {
      const auto update = [&](int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
        for (int64_t b = r0; b < r1; ++b)
          kern::gru_fwd_row<T, true>(pp + b * 6 * H, bih, pp + b * 6 * H + 3 * H, bhh, h + b * H, hyp + b * H,
                                     ws_row(b), H, k0, k1);
      };
      // r and z: both products summed into gi's slots; n: apart (r scales the h part), gh's n slot at 3H on
      const auto products = [&](const NtProducts& p, float* out, int64_t k0, int64_t k1) {
        for (int64_t q = 0; q < 2; ++q) p.sum(out, 6 * H, q * H + k0, q * H + k1);
        p.input(out, 6 * H, 2 * H + k0, 2 * H + k1);
        p.hidden(out + 3 * H, 6 * H, 2 * H + k0, 2 * H + k1);
      };
      fused_step(
          x, hx, w_ih, w_hh,
          [&](const NtProducts& p, int64_t k0, int64_t k1) {
            products(p, pp, k0, k1);
            update(0, B, k0, k1);
          },
          [&](const NtProducts& p, int64_t r0, int64_t r1) {
            products(p, pp + r0 * 6 * H, 0, H);
            update(r0, r1, 0, H);
          });
    }
  } else {
    Tensor gi = pre.narrow(1, 0, 3 * H), gh = pre.narrow(1, 3 * H, 3 * H);
    gemm::linear2_out(gi, x, w_ih, gh, hx, w_hh, false);
    kern::par_rows(B, 64 * H, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b)
        kern::gru_fwd_row<T>(pp + b * 6 * H, bih, pp + b * 6 * H + 3 * H, bhh, h + b * H, hyp + b * H,
                             ws_row(b), H, 0, H);
    });
  }
}

template <typename T, typename TW>
void rnn_cell_fwd_impl(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const T* b1,
                       const T* b2, bool relu, Tensor& hy) {
  const int64_t B = x.size(0), I = x.size(1), H = hx.size(1);
  if (B == 0 || H == 0) return;
  T* y = hy.data_ptr<T>();
  if (cell_gemv<T, TW>(B)) {
    std::array<const T*, kMaxSmallB> xr, hr;
    std::array<T*, kMaxSmallB> yr;
    for (int64_t b = 0; b < B; ++b) {
      xr[b] = x.const_data_ptr<T>() + b * I;
      hr[b] = hx.const_data_ptr<T>() + b * H;
      yr[b] = y + b * H;
    }
    const TW* wi = w_ih.const_data_ptr<TW>();
    const TW* wh = w_hh.const_data_ptr<TW>();
    kern::par_units(H, gemv_work<T, TW>(B, H * (I + H)), [&](int64_t k0, int64_t k1) {
      gemv_w<T, TW>(B, xr.data(), wi, I, hr.data(), wh, H, yr.data(), k0, k1, false);
      for (int64_t b = 0; b < B; ++b) kern::rnn_fwd_row<T>(y + b * H, b1, b2, y + b * H, relu, k0, k1);
    });
  } else if (fused_nt<T, TW>(B, 1, I, H)) {
    if constexpr (std::is_same_v<T, float>) {
      const auto update = [&](int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
        for (int64_t b = r0; b < r1; ++b) kern::rnn_fwd_row<T>(y + b * H, b1, b2, y + b * H, relu, k0, k1);
      };
      fused_step(
          x, hx, w_ih, w_hh,
          [&](const NtProducts& p, int64_t k0, int64_t k1) {
            p.sum(y, H, k0, k1);
            update(0, B, k0, k1);
          },
          [&](const NtProducts& p, int64_t r0, int64_t r1) {
            p.sum(y + r0 * H, H, 0, H);
            update(r0, r1, 0, H);
          });
    }
  } else {
    gemm::linear2_out(hy, x, w_ih, hy, hx, w_hh, true);
    kern::par_rows(B, 16 * H, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b) kern::rnn_fwd_row<T>(y + b * H, b1, b2, y + b * H, relu, 0, H);
    });
  }
}

// hy, cy: [B, H] tensors to write the results to (see lstm_cell_forward_into), or undefined: new ones.
std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward_impl(const Tensor& x, const Tensor& hx, const Tensor& cx,
                                                     const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                     const OptTensor& b_hh, Tensor hy = {}, Tensor cy = {},
                                                     bool keep_gates = true) {
  kern::check_cpu();
  const int64_t B = x.size(0), H = hx.size(1);
  if (!hy.defined()) hy = at::empty({B, H}, x.options());
  if (!cy.defined()) cy = at::empty({B, H}, x.options());
  Tensor gates = keep_gates ? at::empty({B, 4 * H}, x.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::lstm_cell_forward", [&] {
    with_weight_type<scalar_t>(w_ih, [&](auto tw) {
      lstm_cell_fwd_impl<scalar_t, decltype(tw)>(x, hx, cx, w_ih, w_hh, kern::opt_ptr<scalar_t>(b_ih),
                                                 kern::opt_ptr<scalar_t>(b_hh), hy, cy, gates);
    });
  });
  return {hy, cy, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward_impl(
    const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& x, const Tensor& hx, const Tensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates, const Tensor& cy, const Needs& n) {
  kern::check_cpu();
  const int64_t B = x.size(0), H = hx.size(1);
  Tensor dg = at::empty({B, 4 * H}, x.options());
  Tensor dcx = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::lstm_cell_backward", [&] {
    using T = scalar_t;
    const T* g = gates.const_data_ptr<T>();
    const T* c = cx.const_data_ptr<T>();
    const T* cyp = cy.const_data_ptr<T>();
    const T* dh = grad_hy.const_data_ptr<T>();
    const T* dc = grad_cy.const_data_ptr<T>();
    T* dgp = dg.data_ptr<T>();
    T* dcxp = dcx.data_ptr<T>();
    kern::par_rows(B, 64 * H, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b)
        kern::lstm_bwd_row<T>(g + b * 4 * H, c + b * H, cyp + b * H, dh + b * H, nullptr, dc + b * H,
                              dgp + b * 4 * H, dcxp + b * H, H, 0, H);
    });
  });
  std::array<Tensor, 6> p;
  if (small_products(dg, dg, x, hx, w_ih, w_hh, n, Tensor(), p)) return {p[0], p[1], dcx, p[2], p[3], p[4]};
  return {n.dx ? grad_in(dg, w_ih) : Tensor(), n.dh ? grad_in(dg, w_hh) : Tensor(), dcx,
          n.dw_ih ? grad_w(dg, x, w_ih) : Tensor(), n.dw_hh ? grad_w(dg, hx, w_hh) : Tensor(), dg.sum(0)};
}

// hy: as lstm_cell_forward_impl's.
std::tuple<Tensor, Tensor> gru_cell_forward_impl(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                                            const OptTensor& b_ih, const OptTensor& b_hh, Tensor hy = {},
                                            bool keep_ws = true) {
  kern::check_cpu();
  const int64_t B = x.size(0), H = hx.size(1);
  if (!hy.defined()) hy = at::empty({B, H}, x.options());
  Tensor ws = keep_ws ? at::empty({B, 4 * H}, x.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::gru_cell_forward", [&] {
    with_weight_type<scalar_t>(w_ih, [&](auto tw) {
      gru_cell_fwd_impl<scalar_t, decltype(tw)>(x, hx, w_ih, w_hh, kern::opt_ptr<scalar_t>(b_ih),
                                                kern::opt_ptr<scalar_t>(b_hh), hy, ws);
    });
  });
  return {hy, ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_cell_backward_impl(const Tensor& grad_hy, const Tensor& x,
                                                                             const Tensor& hx, const Tensor& w_ih,
                                                                             const Tensor& w_hh, const Tensor& ws,
                                                                             const Needs& n) {
  kern::check_cpu();
  const int64_t B = x.size(0), H = hx.size(1);
  Tensor dgi = at::empty({B, 3 * H}, x.options());
  Tensor dgh = at::empty({B, 3 * H}, x.options());
  Tensor dhx = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::gru_cell_backward", [&] {
    using T = scalar_t;
    const T* dh = grad_hy.const_data_ptr<T>();
    const T* h = hx.const_data_ptr<T>();
    const T* w = ws.const_data_ptr<T>();
    T* dgip = dgi.data_ptr<T>();
    T* dghp = dgh.data_ptr<T>();
    T* dhxp = dhx.data_ptr<T>();
    kern::par_rows(B, 32 * H, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b)
        kern::gru_bwd_row<T>(dh + b * H, nullptr, h + b * H, w + b * 4 * H, dgip + b * 3 * H, dghp + b * 3 * H,
                             dhxp + b * H, H, 0, H);
    });
  });
  std::array<Tensor, 6> p;
  if (small_products(dgi, dgh, x, hx, w_ih, w_hh, n, dhx, p)) return {p[0], p[1], p[2], p[3], p[4], p[5]};
  if (!n.dh)
    dhx = Tensor();
  else if (w_hh.scalar_type() == dgh.scalar_type())
    dhx.addmm_(dgh, w_hh);
  else
    dhx.add_(grad_in(dgh, w_hh));
  return {n.dx ? grad_in(dgi, w_ih) : Tensor(), dhx, n.dw_ih ? grad_w(dgi, x, w_ih) : Tensor(),
          n.dw_hh ? grad_w(dgh, hx, w_hh) : Tensor(), dgi.sum(0), dgh.sum(0)};
}

// hy: as lstm_cell_forward_impl's.
Tensor rnn_cell_forward_impl(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                        const OptTensor& b_ih, const OptTensor& b_hh, bool relu, Tensor hy = {}) {
  kern::check_cpu();
  if (!hy.defined()) hy = at::empty({x.size(0), hx.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::rnn_cell_forward", [&] {
    with_weight_type<scalar_t>(w_ih, [&](auto tw) {
      rnn_cell_fwd_impl<scalar_t, decltype(tw)>(x, hx, w_ih, w_hh, kern::opt_ptr<scalar_t>(b_ih),
                                                kern::opt_ptr<scalar_t>(b_hh), relu, hy);
    });
  });
  return hy;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_cell_backward_impl(const Tensor& grad_hy, const Tensor& x,
                                                                     const Tensor& hx, const Tensor& w_ih,
                                                                     const Tensor& w_hh, const Tensor& hy, bool relu,
                                                                     const Needs& n) {
  kern::check_cpu();
  const int64_t B = x.size(0), H = hx.size(1);
  Tensor dp = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::rnn_cell_backward", [&] {
    using T = scalar_t;
    const T* dh = grad_hy.const_data_ptr<T>();
    const T* y = hy.const_data_ptr<T>();
    T* d = dp.data_ptr<T>();
    kern::par_rows(B, 8 * H, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b) kern::rnn_bwd_row<T>(dh + b * H, nullptr, y + b * H, d + b * H, relu, 0, H);
    });
  });
  std::array<Tensor, 6> p;
  if (small_products(dp, dp, x, hx, w_ih, w_hh, n, Tensor(), p)) return {p[0], p[1], p[2], p[3], p[4]};
  return {n.dx ? grad_in(dp, w_ih) : Tensor(), n.dh ? grad_in(dp, w_hh) : Tensor(),
          n.dw_ih ? grad_w(dp, x, w_ih) : Tensor(), n.dw_hh ? grad_w(dp, hx, w_hh) : Tensor(), dp.sum(0)};
}

}  // namespace

// ---- checked entries (rnn_args.h): shapes, dtypes, contiguity, then the kernel ----
using rnn_args::kAny;
using rnn_args::need;
using rnn_args::need_opt;

// The weights' dtype an entry takes: the input's, or bfloat16 under a float32 input of at most kMaxSmallB rows (see
// kBf16Weights).
at::ScalarType weight_dtype(const char* fn, const Tensor& x, const Tensor& w_ih) {
  const auto dt = x.scalar_type();
  if (dt != at::kFloat || !w_ih.defined() || w_ih.scalar_type() != at::kBFloat16) return dt;
  TORCH_CHECK(x.size(0) <= kMaxSmallB, fn, ": bfloat16 weights under a float32 input take at most ", kMaxSmallB,
              " rows, got ", x.size(0));
  TORCH_CHECK(bf16w::available(), fn, ": bfloat16 weights under a float32 input need a CPU with AVX2 and FMA");
  return at::kBFloat16;
}

// An optional bias as need_opt takes it. With bfloat16 weights (wt) under a float32 input (dt) it may be bfloat16
// too, and is returned as a float32 copy (a few hundred bytes): the caller then passes the bias as the module holds
// it, with no conversion of its own for autograd to record (the gradient, float32, is cast back by autograd).
OptTensor need_bias(const char* fn, const char* name, const OptTensor& b, int64_t n, at::ScalarType dt,
                    at::ScalarType wt) {
  if (wt != dt && b.has_value() && b->defined() && b->scalar_type() == wt)
    return need(fn, name, *b, {n}, wt).to(dt);
  return need_opt(fn, name, b, n, dt);
}

namespace {
// An output the caller gives (the *_forward_into entries): [B, H] contiguous of the input's dtype on the CPU (need's
// checks, and already contiguous: need would write into a copy), or undefined (the entry makes one). Its contents
// are never read before the kernel writes them.
Tensor into(const char* fn, const char* name, const Tensor& t, int64_t B, int64_t H, at::ScalarType dt) {
  if (!t.defined()) return t;
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous (the results are written into it)");
  return need(fn, name, t, {B, H}, dt);
}
}  // namespace

std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward(const Tensor& x, const Tensor& hx, const Tensor& cx,
                                                     const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                     const OptTensor& b_hh) {
  return lstm_cell_forward_into(x, hx, cx, w_ih, w_hh, b_ih, b_hh, Tensor(), Tensor());
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward_into(const Tensor& x, const Tensor& hx, const Tensor& cx,
                                                          const Tensor& w_ih, const Tensor& w_hh,
                                                          const OptTensor& b_ih, const OptTensor& b_hh,
                                                          const Tensor& hy, const Tensor& cy, bool keep_gates) {
  const char* fn = "lstm_cell_forward";
  const Tensor xc = need(fn, "input", x, {kAny, kAny}, at::ScalarType::Undefined);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1);
  const Tensor hc = need(fn, "hx", hx, {B, kAny}, dt);
  const int64_t H = hx.size(1);
  const auto wt = weight_dtype(fn, xc, w_ih);
  return lstm_cell_forward_impl(xc, hc, need(fn, "cx", cx, {B, H}, dt), need(fn, "weight_ih", w_ih, {4 * H, I}, wt),
                                need(fn, "weight_hh", w_hh, {4 * H, H}, wt), need_bias(fn, "bias_ih", b_ih, 4 * H, dt, wt),
                                need_bias(fn, "bias_hh", b_hh, 4 * H, dt, wt), into(fn, "hy", hy, B, H, dt),
                                into(fn, "cy", cy, B, H, dt), keep_gates);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward(
    const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& x, const Tensor& hx, const Tensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates, const Tensor& cy, bool need_dx, bool need_dh,
    bool need_dw_ih, bool need_dw_hh) {
  const char* fn = "lstm_cell_backward";
  const Tensor xc = need(fn, "input", x, {kAny, kAny}, at::ScalarType::Undefined);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1);
  const Tensor hc = need(fn, "hx", hx, {B, kAny}, dt);
  const int64_t H = hx.size(1);
  const auto wt = weight_dtype(fn, xc, w_ih);
  return lstm_cell_backward_impl(need(fn, "grad_hy", grad_hy, {B, H}, dt), need(fn, "grad_cy", grad_cy, {B, H}, dt),
                                 xc, hc, need(fn, "cx", cx, {B, H}, dt), need(fn, "weight_ih", w_ih, {4 * H, I}, wt),
                                 need(fn, "weight_hh", w_hh, {4 * H, H}, wt), need(fn, "gates", gates, {B, 4 * H}, dt),
                                 need(fn, "cy", cy, {B, H}, dt), Needs{need_dx, need_dh, need_dw_ih, need_dw_hh});
}

std::tuple<Tensor, Tensor> gru_cell_forward(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                                            const OptTensor& b_ih, const OptTensor& b_hh) {
  return gru_cell_forward_into(x, hx, w_ih, w_hh, b_ih, b_hh, Tensor());
}

std::tuple<Tensor, Tensor> gru_cell_forward_into(const Tensor& x, const Tensor& hx, const Tensor& w_ih,
                                                 const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                                 const Tensor& hy, bool keep_ws) {
  const char* fn = "gru_cell_forward";
  const Tensor xc = need(fn, "input", x, {kAny, kAny}, at::ScalarType::Undefined);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1);
  const Tensor hc = need(fn, "hx", hx, {B, kAny}, dt);
  const int64_t H = hx.size(1);
  const auto wt = weight_dtype(fn, xc, w_ih);
  return gru_cell_forward_impl(xc, hc, need(fn, "weight_ih", w_ih, {3 * H, I}, wt),
                               need(fn, "weight_hh", w_hh, {3 * H, H}, wt), need_bias(fn, "bias_ih", b_ih, 3 * H, dt, wt),
                               need_bias(fn, "bias_hh", b_hh, 3 * H, dt, wt), into(fn, "hy", hy, B, H, dt), keep_ws);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_cell_backward(const Tensor& grad_hy, const Tensor& x,
                                                                             const Tensor& hx, const Tensor& w_ih,
                                                                             const Tensor& w_hh, const Tensor& ws,
                                                                             bool need_dx, bool need_dh,
                                                                             bool need_dw_ih, bool need_dw_hh) {
  const char* fn = "gru_cell_backward";
  const Tensor xc = need(fn, "input", x, {kAny, kAny}, at::ScalarType::Undefined);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1);
  const Tensor hc = need(fn, "hx", hx, {B, kAny}, dt);
  const int64_t H = hx.size(1);
  const auto wt = weight_dtype(fn, xc, w_ih);
  return gru_cell_backward_impl(need(fn, "grad_hy", grad_hy, {B, H}, dt), xc, hc,
                                need(fn, "weight_ih", w_ih, {3 * H, I}, wt), need(fn, "weight_hh", w_hh, {3 * H, H}, wt),
                                need(fn, "ws", ws, {B, 4 * H}, dt), Needs{need_dx, need_dh, need_dw_ih, need_dw_hh});
}

Tensor rnn_cell_forward(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                        const OptTensor& b_ih, const OptTensor& b_hh, bool relu) {
  return rnn_cell_forward_into(x, hx, w_ih, w_hh, b_ih, b_hh, relu, Tensor());
}

Tensor rnn_cell_forward_into(const Tensor& x, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                             const OptTensor& b_ih, const OptTensor& b_hh, bool relu, const Tensor& hy) {
  const char* fn = "rnn_cell_forward";
  const Tensor xc = need(fn, "input", x, {kAny, kAny}, at::ScalarType::Undefined);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1);
  const Tensor hc = need(fn, "hx", hx, {B, kAny}, dt);
  const int64_t H = hx.size(1);
  const auto wt = weight_dtype(fn, xc, w_ih);
  return rnn_cell_forward_impl(xc, hc, need(fn, "weight_ih", w_ih, {H, I}, wt), need(fn, "weight_hh", w_hh, {H, H}, wt),
                               need_bias(fn, "bias_ih", b_ih, H, dt, wt), need_bias(fn, "bias_hh", b_hh, H, dt, wt),
                               relu, into(fn, "hy", hy, B, H, dt));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_cell_backward(const Tensor& grad_hy, const Tensor& x,
                                                                     const Tensor& hx, const Tensor& w_ih,
                                                                     const Tensor& w_hh, const Tensor& hy, bool relu,
                                                                     bool need_dx, bool need_dh, bool need_dw_ih,
                                                                     bool need_dw_hh) {
  const char* fn = "rnn_cell_backward";
  const Tensor xc = need(fn, "input", x, {kAny, kAny}, at::ScalarType::Undefined);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1);
  const Tensor hc = need(fn, "hx", hx, {B, kAny}, dt);
  const int64_t H = hx.size(1);
  const auto wt = weight_dtype(fn, xc, w_ih);
  return rnn_cell_backward_impl(need(fn, "grad_hy", grad_hy, {B, H}, dt), xc, hc, need(fn, "weight_ih", w_ih, {H, I}, wt),
                                need(fn, "weight_hh", w_hh, {H, H}, wt), need(fn, "hy", hy, {B, H}, dt), relu,
                                Needs{need_dx, need_dh, need_dw_ih, need_dw_hh});
}

bool rnn_kernels_supported() { return kern::cpu_supported(); }

bool bf16_cell_weights_supported() { return bf16w::available(); }

bool cell_step_fused(int64_t G, int64_t B, int64_t I, int64_t H) {
  return B > 0 && !cell_gemv<float, float>(B) && fused_nt<float, float>(B, G, I, H);
}

// Same-process A/B on the Zen 3 EPYC (no grad, module calls of one step without a state, cell route / layer, 31-41
// rounds): LSTM B1 H64 1.04x, B4 H64 1.14x, B64 H64 1.12x, B256 H64 1.19x, B8 H1024 1.01x, B64 H512 1.03x, B256 H512
// 1.04x; GRU B1 H64-1024 1.03-1.14x, B4 H256 1.10x, B8 H128 1.11x, B32 H256 1.08x, B64 H128 1.07x, B256 H256 1.13x,
// B8 H512 0.97-0.98x, B16 H1024 0.98x, B64 H512 1.00-1.01x; RNN B1 H64 0.97-1.00x, B1 H128-1024 1.01-1.08x, B4-B8
// 1.07-1.23x, B32-B256 1.06-1.13x, B64 H512 0.99x. Two or three rows stay on the layer, whose step takes them on
// its 1-2 row kernels: LSTM B2 H512 / H1024 0.73-0.78x as cells, GRU and RNN B2-B3 0.93-0.99x. (Before the cell
// route's ATen ops were cut in rnn_module_inference.cpp, the route lost at one row of H64 and at B4 H64, and GRU and
// RNN kept the layer.)
bool one_step_as_cell(int64_t B) { return B == 1 || B >= 4; }

}  // namespace seqfast
