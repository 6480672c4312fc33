// Whole-sequence RNN layers (one layer, one direction) for CPU, time loop in C++.
// Input is time-major packed: x[N,I], step t = rows [off_t, off_t + bs_t), bs non-increasing. Forward:
//   1. one GEMM for the input projection of all steps (bias folded in);
//   2. per step: recurrent GEMM of the active rows (own GEMV for small batches, a GEMM otherwise) + fused pointwise.
//   For float32/float64 LSTM/GRU with a first step above the GEMV batch range, steps 2 (and the backward's per-step
//   work) run inside ONE parallel region per sequence, each thread owning a hidden-unit slice (see "Fused time loop";
//   switches for A/B timing in cpu/config.h: fused, mkl_pack, step_par_min_h).
//   On CPUs with AVX-512 (config().own_gemm), float32 GEMMs run the own kernel of cpu/sgemm.h instead of the
//   bundled MKL, and a batched float32 LSTM runs steps 1-2 as one fused kernel per step and thread (rnn_sequence_lstm_step.h:
//   input and recurrent gate GEMMs plus the cell update in registers; no [N, 4H] pre-activation buffer); at 1-2 rows
//   the LSTM keeps the input GEMM and its step reads W_hh in place (forward and backward), synchronised per step by
//   the team barrier of cpu/team.h.
// There is no separate state buffer: a row's previous h (and c) is read straight from the previous step's output
// rows, or from h0 when the row was not active at the previous processed step (only possible with reverse=True,
// where a row starts at its own last step). hn/cn are gathered from each row's last processed step at the end.
// Backward walks the processing order backwards, keeping a running dh (and dc) [B,H]: per step a fused pointwise
// pass writes the gate grads of all steps into one [N,*] buffer, and one GEMM propagates dh to the previous step;
// dx, dW_ih, dW_hh and the bias grads are single big GEMMs/reductions over all steps at the end.
// Workspaces saved for the backward and gate-gradient buffers come from cpu/pool.h (reused across steps).
// Dtypes: float32/float64 throughout; bfloat16 forward = bf16 GEMMs + float32 loop (see LowP), float32 workspaces;
// bfloat16 backward = float32 backward on upcast inputs.
#include "rnn/rnn.h"
#include "rnn/rnn_args.h"
#include "rnn/rnn_pointwise.h"
#include "rnn/rnn_sequence_lstm_step.h"
#include "rnn/rnn_sequence_shared.h"
#include "rnn/rnn_sequence_step_bf16.h"
#include "cpu/block_pool.h"
#include "cpu/block_share.h"
#include "cpu/config.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/pool.h"
#include "cpu/team.h"

#include <ATen/Dispatch.h>
#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace seqfast {

namespace {

using kern::kMaxSmallB;
using seq::gather_prev;
using seq::has;
using seq::prev_row;
using seq::Steps;
using seq::summed_bias;

// 2-D a @ b through the GEMM entry point (cpu/gemm.h); transposed views cost no copy.
inline Tensor gemm(const Tensor& a, const Tensor& b, const Tensor* bias = nullptr) {
  return gemm::mm(a, b, bias ? OptTensor(*bias) : OptTensor());
}

// x @ w^T (+ bias), one GEMM over all steps.
Tensor input_proj(const Tensor& x, const Tensor& w, const Tensor* bias) { return gemm(x, w.t(), bias); }

// bf16 input projection: GEMM in bf16 (fp32 accumulation inside oneDNN/MKL), result widened to fp32, fp32 bias.
Tensor proj_bf16(const Tensor& x, const Tensor& w, const Tensor& bias_f32) {
  Tensor r = at::mm(x, w.t()).to(at::kFloat);
  if (bias_f32.defined()) r.add_(bias_f32);
  return r;
}

// Recurrent GEMM for step t (gemm::linear_out): dst[0:bs] (+)= hprev[0:bs] @ w^T, hprev split into the contiguous block
// from the previous step's rows and the block from init (h0).
inline void recur_mm(const Steps& s, int64_t t, const Tensor& buf, const Tensor& init, const Tensor& w, Tensor dst,
                     bool accumulate) {
  const int64_t bs = s.bs[t];
  const int64_t np = s.n_from_prev(t);
  const int64_t tp = s.prev(t);
  if (np > 0) {
    Tensor d = dst.narrow(0, 0, np);
    gemm::linear_out(d, buf.narrow(0, s.off[tp], np), w, accumulate);
  }
  if (bs > np) {
    Tensor d = dst.narrow(0, np, bs - np);
    gemm::linear_out(d, init.narrow(0, np, bs - np), w, accumulate);
  }
}

// bfloat16 forward: the time loop runs in float32 (state, gates, pointwise), while the big GEMMs run in bf16
// (2.5x the fp32 GEMM rate here): the input projection, and for large batches the per-step recurrent GEMM, which
// reads this bf16 mirror of the outputs (written every step) and the bf16 h0/W_hh.
struct LowP {
  Tensor out, h0, w_hh;  // bf16 [N,H], [B,H], [G*H,H]
};

// Recurrent GEMM of step t, either in the loop dtype (MKL) or, with lp, in bf16 added/copied into the fp32 dst.
inline void recur(const Steps& s, int64_t t, const Tensor& buf, const Tensor& init, const Tensor& w, Tensor dst,
                  bool accumulate, const LowP* lp) {
  if (!lp) {
    recur_mm(s, t, buf, init, w, dst, accumulate);
    return;
  }
  const int64_t bs = s.bs[t];
  const int64_t np = s.n_from_prev(t);
  const int64_t tp = s.prev(t);
  auto one = [&](Tensor d, const Tensor& h) {
    Tensor r = at::mm(h, lp->w_hh.t());
    if (accumulate) d.add_(r); else d.copy_(r);
  };
  if (np > 0) one(dst.narrow(0, 0, np), lp->out.narrow(0, s.off[tp], np));
  if (bs > np) one(dst.narrow(0, np, bs - np), lp->h0.narrow(0, np, bs - np));
}

inline void mirror(const LowP* lp, const Tensor& out, int64_t off, int64_t bs) {
  if (lp) lp->out.narrow(0, off, bs).copy_(out.narrow(0, off, bs));
}

// Final state of each row: its output at its last processed step, or init when never active (init contiguous, of
// buf's dtype).
Tensor gather_last(const Steps& s, const Tensor& buf, const Tensor& init) {
  Tensor out = at::empty(init.sizes(), init.options());
  const int64_t B = init.size(0), H = init.size(1);
  const int64_t es = buf.element_size();
  const char* bp = static_cast<const char*>(buf.const_data_ptr());
  const char* ip = static_cast<const char*>(init.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = s.last_step(b);
    std::memcpy(op + b * H * es, t >= 0 ? bp + (s.off[t] + b) * H * es : ip + b * H * es, H * es);
  }
  return out;
}

// ---- Fused time loop (one parallel region per sequence) ----
// For batches above the GEMV range, a per-step at::mm + a separate pointwise pass costs two fork/joins per step and
// a second sweep over the gates. Instead one OpenMP region spans the whole time loop: each thread owns a slice of
// hidden units (all gates of those units), runs its own single-threaded BLAS GEMM for that slice (MKL runs
// sequentially inside an active OpenMP region) plus the fused pointwise, then one barrier per step. Every gate
// pointwise function is unit-local, so a thread only ever needs other threads' data through the GEMM operands.
// Without a linked BLAS (gemm::blas_available) the per-step path below is used.

// Row-major C[rows, nk] (ldc) = beta C + A[rows, K] (lda) @ W[nk, K]^T (ldw).
template <typename T>
inline void mm_wt(int64_t rows, int64_t nk, int64_t K, const T* A, int64_t lda, const T* W, int64_t ldw, T beta, T* C,
                  int64_t ldc) {
  gemm::cm(true, false, nk, rows, K, T(1), W, ldw, A, lda, beta, C, ldc);
}

// Batch rows up to which the fused loops take the AVX2 GEMV. float32 with the own AVX-512 GEMM: 1-2 rows only
// (from 4 rows on, the GEMM / fused step won when this was tuned); otherwise, or with config().small_batch given explicitly, the GEMV range of rnn_pointwise.h.
template <typename T>
inline bool fused_gemv(int64_t nb) {
  if (std::is_same_v<T, float> && sgemm::available() && !cpu::config().small_batch_set) return nb <= 2;
  return kern::use_small(nb);
}

// Whether a 1-2 row time loop (G gate blocks of hidden H) shares each step over the team, with a barrier per step:
// from 3/4 of par_min_work weights of W_hh (98K at the default), whatever the rows (the step streams W_hh; one or two
// rows hardly change its time). Zen 5 (AMD EPYC family 26, 2 vCPUs), T32 no grad, same process, one thread's time
// over two's: LSTM B1 H64 / H128 (16K / 65K weights) 0.51 / 0.85x, H160 (102K) 1.01x, H176 1.10x, H256 1.26x; GRU B1
// H128 0.93x, H160 (77K) 0.92x, H192 (110K) 1.09x; RNN B1 H256 (65K) 0.84x, H320 (102K) 1.03x, H384 1.12x; at two rows
// LSTM H128 0.92x, H160 1.28x, GRU H128 0.79x, RNN H256 0.81x. (An earlier run on the same VM had read LSTM B1 H64 at
// 25 us on two threads, as fast as one: how much a step's barrier costs moves with the host.)
inline bool recurrent_team(int64_t G, int64_t H) { return 4 * G * H * H >= 3 * kern::par_min_work(); }

// Threads for the fused loop (1 = run it on the calling thread), or 0 = use the per-step path.
template <typename T>
inline int fused_threads(const Steps& s, int64_t H, int64_t G) {
  if (!gemm::blas_available<T>() || s.T == 0 || at::in_parallel_region() || !cpu::config().fused) return 0;
  int nt = cpu::threads(std::max<int64_t>(1, H / 16));
  const int64_t work = s.bs[0] * G * H * H;
  if (fused_gemv<T>(s.bs[0])) {
    // GEMV-sized batches: the per-step path runs steps below par_min_work on one thread; from half of it, one
    // region lets each thread stream its slice of W_hh from its own cache every step (LSTM B1 H128 gained), with a
    // barrier per step in place of a parallel region per step. Until 2026-12-06 the per-step path kept steps from
    // par_min_work on (it had been faster at LSTM B1 H512); a same-process A/B on a 2-vCPU Zen 3 (T32, no grad, 21
    // rounds, both orders) then read one region / per-step 1.07-1.15x at B1 H256-384 (LSTM, GRU), 1.02-1.06x at B1
    // H512-1024, 1.00-1.08x at B2 H256-512; training 0.98-1.03x. Since 2026-12-07 that region has its team only where
    // recurrent_team says so, and runs on the calling thread below.
    const int64_t lim = kern::par_min_work();
    if (nt < 2 || work < lim / 2) return 0;
    return recurrent_team(G, H) ? nt : 1;
  }
  if (work < kern::par_min_work()) nt = 1;
  return std::max(nt, 1);
}

// Threads for the fused AVX-512 LSTM step at 1-2 rows, or 0 = not that path. One step streams W_hh (4H x H floats)
// once; two threads each keep half of it in their own L2 once it is big enough to pay for a barrier per step. The
// path is used while each thread's share stays L2-resident (<= 256 KB, hidden <= ~180 on 2 threads); beyond that
// its rows would stream from L3 every step, and hidden 256-512 keep the per-step GEMV path (parallel over rows): one
// T64 B1 comparison favoured it there, though by less than this VM's run-to-run noise.
inline int small_step_threads(int64_t H) {
  const int nt =
      H >= cpu::config().step_par_min_h && recurrent_team(4, H) ? cpu::threads(std::max<int64_t>(1, H / 32)) : 1;
  return 16 * H * H / nt <= (int64_t(256) << 10) ? nt : 0;
}

// Unit slice [k0, k1) of thread tid, in whole 16-unit blocks.
inline void unit_slice(int64_t H, int nt, int tid, int64_t& k0, int64_t& k1) {
  const int64_t nblk = (H + 15) / 16;
  const int64_t b0 = nblk * tid / nt, b1 = nblk * (tid + 1) / nt;
  k0 = std::min(H, b0 * 16);
  k1 = std::min(H, b1 * 16);
}

// Rows of step t: GEMM the previous-state rows (prev step's rows + h0 rows) against W slice.
template <typename T>
inline void step_mm(const Steps& s, int64_t t, const T* buf, const T* init, int64_t H, const T* W, int64_t nk, T beta,
                    T* C, int64_t ldc) {
  const int64_t bs = s.bs[t], np = s.n_from_prev(t), tp = s.prev(t);
  if (np > 0) mm_wt<T>(np, nk, H, buf + s.off[tp] * H, H, W, H, beta, C, ldc);
  if (bs > np) mm_wt<T>(bs - np, nk, H, init + np * H, H, W, H, beta, C + np * ldc, ldc);
}

// A W_hh slice packed once and reused by every step (gemm::PackedWeight; float only: double never packs).
template <typename T>
struct PackedA {
  void init(bool, int64_t, int64_t, int64_t, const T*, int64_t, int64_t, int64_t = 0) {}
  bool ok() const { return false; }
  void mm(int64_t, const T*, int64_t, T, T*, int64_t) const {}
};
template <>
struct PackedA<float> : gemm::PackedWeight {};

// step_mm through a packed W slice.
template <typename T>
inline void step_mm_pk(const Steps& s, int64_t t, const T* buf, const T* init, int64_t H, const PackedA<T>& W, T beta,
                       T* C, int64_t ldc) {
  const int64_t bs = s.bs[t], np = s.n_from_prev(t), tp = s.prev(t);
  if (np > 0) W.mm(np, buf + s.off[tp] * H, H, beta, C, ldc);
  if (bs > np) W.mm(bs - np, init + np * H, H, beta, C + np * ldc, ldc);
}

// The recurrent GEMM of a fused forward step, for one thread's slice [k0, k1) of the units of each of the G gate
// blocks: row b of dst, column q H + u, gets (accumulate ? itself : 0) + h_prev[b] . W_hh[q H + u]. Small batches
// take the GEMV; larger ones the slice packed once for the whole sequence (PackedA) or, without packing, a GEMM.
template <typename T, int G>
class RecurrentForward {
 public:
  // slice_units: the units of the thread's slice this is a piece of (0: [k0, k1) is the slice), which decide the
  // packing as for the whole slice.
  RecurrentForward(const Steps& s, const T* wh, int64_t H, int64_t k0, int64_t k1, int64_t slice_units = 0)
      : s_(s), wh_(wh), H_(H), k0_(k0), k1_(k1) {
    for (int q = 0; q < G && k1 > k0 && !fused_gemv<T>(s.bs[0]); ++q)  // GEMV-only sequences never pack
      pk_[q].init(true, k1 - k0, s.bs[0], H, wh + (q * H + k0) * H, H, s.T, slice_units);
    // every gate's slice packed, or none used (a buffer one gate could not get leaves all of them in place)
    packed_ = std::all_of(pk_, pk_ + G, [](const PackedA<T>& p) { return p.ok(); });
  }
  // Rows [r0, r1) of step t (r1 <= its batch), on the packed slices or the weight in place (never the GEMV);
  // row b of dst at dst + b * ldc as in step.
  void step_rows(int64_t t, int64_t r0, int64_t r1, const T* o, const T* h0p, T* dst, int64_t ldc, bool accumulate) {
    const int64_t np = s_.n_from_prev(t), H = H_;
    const T beta = T(accumulate);
    const auto product = [&](int64_t q, int64_t n, const T* h, T* c) {
      if (packed_) pk_[q].mm(n, h, H, beta, c, ldc);
      else mm_wt<T>(n, k1_ - k0_, H, h, H, wh_ + (q * H + k0_) * H, H, beta, c, ldc);
    };
    const int64_t p1 = std::min(r1, np), i0 = std::max(r0, np);  // rows [r0, p1) from the previous step, [i0, r1) h0
    for (int64_t q = 0; q < G; ++q) {
      T* c = dst + q * H + k0_;
      if (p1 > r0) product(q, p1 - r0, o + (s_.off[s_.prev(t)] + r0) * H, c + r0 * ldc);
      if (r1 > i0) product(q, r1 - i0, h0p + i0 * H, c + i0 * ldc);
    }
  }
  // Step t; previous states from the output rows o (or h0p); row b of dst at dst + b * ldc.
  void step(int64_t t, const T* o, const T* h0p, T* dst, int64_t ldc, bool accumulate) {
    const int64_t bs = s_.bs[t], H = H_;
    if (fused_gemv<T>(bs)) {
      std::array<const T*, kMaxSmallB> hr;
      std::array<T*, kMaxSmallB> gr;
      for (int64_t b = 0; b < bs; ++b) {
        hr[b] = prev_row<T>(s_, t, b, o, h0p, H);
        gr[b] = dst + b * ldc;
      }
      for (int64_t q = 0; q < G; ++q)
        kern::gemv<T>(bs, hr.data(), wh_, H, nullptr, nullptr, 0, gr.data(), q * H + k0_, q * H + k1_, accumulate);
    } else if (packed_) {
      for (int64_t q = 0; q < G; ++q) step_mm_pk<T>(s_, t, o, h0p, H, pk_[q], T(accumulate), dst + q * H + k0_, ldc);
    } else {
      for (int64_t q = 0; q < G; ++q)
        step_mm<T>(s_, t, o, h0p, H, wh_ + (q * H + k0_) * H, k1_ - k0_, T(accumulate), dst + q * H + k0_, ldc);
    }
  }

 private:
  const Steps& s_;
  const T* wh_;
  int64_t H_, k0_, k1_;
  PackedA<T> pk_[G];
  bool packed_ = false;
};

// Largest batch of any step (the packed slices are sized by it).
inline int64_t max_rows(const Steps& s) {
  int64_t m = 0;
  for (int64_t t = 0; t < s.T; ++t) m = std::max(m, s.bs[t]);
  return m;
}

// W_hh^T [H, G H], for the backward's small-batch GEMV (contiguous rows for dh = dg W_hh), when some step takes it
// (the fused region's GEMV range, or the per-step path's); made once before the loop and shared by its threads.
template <typename T>
Tensor transposed_for_gemv(const Steps& s, const Tensor& w_hh, bool fused) {
  for (int64_t t = 0; t < s.T; ++t)
    if (s.bs[t] > 0 && (fused ? fused_gemv<T>(s.bs[t]) : kern::use_small(s.bs[t]))) return w_hh.t().contiguous();
  return Tensor();
}

// The recurrent product of a fused backward step, for one thread's units [k0, k1): dh[b][k0:k1] = (accumulate ?
// itself : 0) + sum over j < G H of dg[b][j] W_hh[j][k0:k1]. Small batches take the GEMV on W_hh^T, larger ones the
// slice packed once or a GEMM.
template <typename T, int G>
class RecurrentBackward {
 public:
  RecurrentBackward(const Steps& s, const T* wh, const Tensor& whT, int64_t H, int64_t k0, int64_t k1)
      : wh_(wh), whT_(whT.defined() ? whT.const_data_ptr<T>() : nullptr), H_(H), k0_(k0), k1_(k1) {
    const int64_t mb = max_rows(s);
    if (k1 > k0 && !fused_gemv<T>(mb))  // GEMV-only: never packs
      pk_.init(false, k1 - k0, mb, G * H, wh + k0, H, s.T);
  }
  // dg: the step's first gate-gradient row (row stride G H); dh: [B, H].
  void step(int64_t bs, const T* dg, T* dh, bool accumulate) {
    const int64_t H = H_;
    if (fused_gemv<T>(bs)) {
      std::array<const T*, kMaxSmallB> xr;
      std::array<T*, kMaxSmallB> yr;
      for (int64_t b = 0; b < bs; ++b) {
        xr[b] = dg + b * G * H;
        yr[b] = dh + b * H;
      }
      kern::gemv<T>(bs, xr.data(), whT_, G * H, nullptr, nullptr, 0, yr.data(), k0_, k1_, accumulate);
    } else if (pk_.ok()) {
      pk_.mm(bs, dg, G * H, T(accumulate), dh + k0_, H);
    } else {
      gemm::cm(false, false, k1_ - k0_, bs, G * H, T(1), wh_ + k0_, H, dg, G * H, T(accumulate), dh + k0_, H);
    }
  }

 private:
  const T* wh_;
  const T* whT_;
  int64_t H_, k0_, k1_;
  PackedA<T> pk_;
};

// ---- The time loop, shared by every cell ----

// Steps in processing order, or backwards (reverse_order, for a backward pass), empty steps skipped: f(t, bs, off).
template <class F>
inline void each_step(const Steps& s, bool reverse_order, const F& f) {
  for (int64_t i = 0; i < s.T; ++i) {
    const int64_t t = s.at(reverse_order ? s.T - 1 - i : i);
    if (s.bs[t] > 0) f(t, s.bs[t], s.off[t]);
  }
}

// One parallel region for a whole sequence: body(tid, nth, k0, k1) runs on each thread of a team of up to nt, thread
// tid owning the hidden units [k0, k1) (unit_slice); the body synchronises its steps with cpu::team_barrier(nth).
template <class Body>
inline void unit_team(int nt, int64_t H, const Body& body) {
  cpu::run_team(nt, [&](int tid, int nth) {
    int64_t k0, k1;
    unit_slice(H, nth, tid, k0, k1);
    body(tid, nth, k0, k1);
  });
}

// A cell's pointwise for one row: row(t, b, off, k0, k1) handles hidden units [k0, k1) of batch row b of step t
// (whose first row is `off`). Passed as a template argument (inlined lambda), never through a function pointer.

// Multiply-adds of a forward time loop's shared piece per step (at the step's first batch), and pieces per thread.
constexpr int64_t kStepPieceWork = int64_t(1) << 18;
constexpr int64_t kStepMaxPieces = 8;
// 16-unit blocks a piece holds at least: narrower products ran the loop slower than the fixed split (GRU T32 B64 /
// B256 H256 and LSTM B256 H256 0.94x in pieces of one block, the packed GEMM's n of 16 columns per gate).
constexpr int64_t kStepPieceBlocks = 4;

// Whether a time loop on nt threads splits the batch rows between them instead of the units, each thread holding
// weights of `bytes` (packed in its own cache): each thread then carries its own rows (16 or more) through every step
// with no barrier and nothing read from a teammate's cache (the units split had every thread read the other's half
// of each step's h rows or gate gradients after a barrier); the price, each thread reading all of the weights, is
// paid from L2 while they fit half of it. float32 on the own AVX-512 GEMM only: with the MKL / AVX2 kernels
// (SEQFAST_CPU_NO_OWN_GEMM on the same machine) the split read 0.84-1.31x (GRU B64 H128 0.84x, LSTM B64 H128 training
// 0.88x), and no AVX2-only CPU was at hand to settle it there.
inline bool rows_split_fits(const Steps& s, int nt, int64_t bytes) {
  return sgemm::available() && cpu::config().rows_split && nt > 1 && max_rows(s) >= 16 * int64_t(nt) &&
         bytes <= int64_t(cpu::l2_cache_bytes()) / 2;
}

// The split for the generic time loops, each thread holding all of W_hh: the backward loops (the pointwise backward of
// all units, then dh = dg W_hh) and the forward loop of the GRU and the Elman RNN (the recurrent product, then the
// pointwise). Same process, T32, rows / units split (Elman RNN backward: rows / its per-step path): training LSTM B256
// H128 1.07x, B64 H128 1.12x, B256 H64 1.22x, GRU B256 H128 1.12x, B256 H64 1.17x; RNN B256 H256 1.19x, B256 H128
// 1.17x, B64 H256 1.17x, B32 H128 1.26x (Zen 5, 2 vCPUs, in a phase with slow cross-core transfers; 1.03-1.06x in a
// quicker one); GRU forward B256 H128 1.11x (training 1.09x), B256 H64 1.11x, B32 H64 1.12x, B64 H128 1.04x; RNN
// forward B256 H256 1.02x, B64 H128 1.05x.
template <typename T>
inline bool rows_split(const Steps& s, int nt, int64_t G, int64_t H) {
  return std::is_same_v<T, float> && rows_split_fits(s, nt, G * H * H * int64_t(sizeof(T)));
}

// First row of thread tid's share of B rows split over nt threads, in whole 8-row register tiles (tid == nt: B).
inline int64_t row_share(int64_t B, int nt, int tid) {
  return tid >= nt ? B : std::min(B, (B / 8) * tid / nt * 8);
}

// The rows split's team: fn(tid, nth, b0, b1) on each thread with a share [b0, b1) of the steps' rows (threads left
// without rows do nothing).
template <class Fn>
void run_row_shares(const Steps& s, int nt, const Fn& fn) {
  const int64_t B = max_rows(s);
  cpu::run_team(nt, [&](int tid, int nth) {
    const int64_t b0 = row_share(B, nth, tid), b1 = row_share(B, nth, tid + 1);
    if (b1 > b0) fn(tid, nth, b0, b1);
  });
}

// Forward time loop of a cell with G gate blocks, in processing order. Per step t, the step's rows of dst (rows
// [off, off + bs) when dst_per_step, else [0, bs): a scratch reused every step) get the recurrent product
// h_prev W_hh^T (added onto them when accumulate), then `row` runs the cell's pointwise.
// nt > 0: one region for the sequence, each thread its unit slice, one barrier per step (see "Fused time loop").
// nt == 0: the per-step path: GEMV over unit chunks for small batches, else one GEMM (lp: in bf16, with the output
// mirrored), then the pointwise over row chunks of row_work multiply-adds each.
template <typename T, int G, class Row>
void time_loop_forward(const Steps& s, int nt, const Tensor& h0, const Tensor& w_hh, const Tensor& out,
                       const Tensor& dst, bool dst_per_step, bool accumulate, int64_t row_work, const LowP* lp,
                       const Row& row) {
  const int64_t H = h0.size(1);
  const T* o = out.const_data_ptr<T>();
  const T* h0p = h0.const_data_ptr<T>();
  const T* wh = w_hh.const_data_ptr<T>();
  T* d = dst.data_ptr<T>();
  if (rows_split<T>(s, nt, G, H)) {
    run_row_shares(s, nt, [&](int, int, int64_t b0, int64_t b1) {
      RecurrentForward<T, G> rec(s, wh, H, 0, H);  // the whole of W_hh, this thread's own packing
      each_step(s, false, [&](int64_t t, int64_t bs, int64_t off) {
        const int64_t r1 = std::min(bs, b1);
        if (r1 <= b0) return;
        rec.step_rows(t, b0, r1, o, h0p, d + (dst_per_step ? off : 0) * G * H, G * H, accumulate);
        for (int64_t b = b0; b < r1; ++b) row(t, b, off, 0, H);
      });
    });
    return;
  }
  if (nt > 0) {
    // Each thread's slice in pieces of 16-unit blocks, each with its own recurrent product (packed as the whole slice
    // would be), shared by the team every step (cpu/block_share.h): a thread done with its own pieces takes a slower
    // teammate's last ones. A piece holds at least kStepPieceWork multiply-adds of the step's first batch.
    struct Piece {
      RecurrentForward<T, G>* rec;
      int64_t k0, k1;
    };
    std::vector<std::vector<Piece>> pieces(size_t(std::max(nt, 1)));
    cpu::BlockShare share(std::max(nt, 1));
    const bool sharing = cpu::config().block_share;
    unit_team(nt, H, [&](int tid, int nth, int64_t k0, int64_t k1) {
      const bool shared = sharing && nth > 1;
      const int64_t blocks = (k1 - k0 + 15) / 16;
      const int64_t n = k1 <= k0 ? 0
                        : !shared ? 1
                                  : std::clamp<int64_t>(s.bs[0] * G * (k1 - k0) * H / kStepPieceWork, 1,
                                                        std::max<int64_t>(1, std::min(blocks / kStepPieceBlocks,
                                                                                      kStepMaxPieces)));
      std::vector<std::unique_ptr<RecurrentForward<T, G>>> own;
      std::vector<Piece>& mine = pieces[size_t(tid)];
      for (int64_t i = 0; i < n; ++i) {
        const int64_t u0 = std::min(k1, k0 + 16 * (blocks * i / n));
        const int64_t u1 = std::min(k1, k0 + 16 * (blocks * (i + 1) / n));
        own.emplace_back(new RecurrentForward<T, G>(s, wh, H, u0, u1, k1 - k0));
        mine.push_back(Piece{own.back().get(), u0, u1});
      }
      each_step(s, false, [&](int64_t t, int64_t bs, int64_t off) {
        T* dt = d + (dst_per_step ? off : 0) * G * H;
        const auto run = [&](const Piece& p) {
          p.rec->step(t, o, h0p, dt, G * H, accumulate);
          for (int64_t b = 0; b < bs; ++b) row(t, b, off, p.k0, p.k1);
        };
        if (!shared) {
          if (n > 0) run(mine[0]);
        } else {
          share.run(tid, nth, n, [&](int owner, int64_t i) { run(pieces[size_t(owner)][size_t(i)]); });
        }
        cpu::team_barrier(nth);
      });
    });
    return;
  }
  each_step(s, false, [&](int64_t t, int64_t bs, int64_t off) {
    const int64_t r0 = dst_per_step ? off : 0;
    if (kern::use_small(bs)) {
      std::array<const T*, kMaxSmallB> hr;
      std::array<T*, kMaxSmallB> dr;
      for (int64_t b = 0; b < bs; ++b) {
        hr[b] = prev_row<T>(s, t, b, o, h0p, H);
        dr[b] = d + (r0 + b) * G * H;
      }
      kern::par_units(H, bs * G * H * H, [&](int64_t k0, int64_t k1) {
        for (int64_t q = 0; q < G; ++q)
          kern::gemv<T>(bs, hr.data(), wh, H, nullptr, nullptr, 0, dr.data(), q * H + k0, q * H + k1, accumulate);
        for (int64_t b = 0; b < bs; ++b) row(t, b, off, k0, k1);
      });
    } else {
      recur(s, t, out, h0, w_hh, dst.narrow(0, r0, bs), accumulate, lp);
      kern::par_rows(bs, row_work, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) row(t, b, off, 0, H);
      });
    }
    mirror(lp, out, off, bs);
  });
}

// Backward time loop of a cell with G gate blocks, in reverse processing order. Per step: `row` runs the cell's
// pointwise backward (reading the running dh [B, H], writing the step's rows of the gate grads dg [N, G H]), then
// dh[0:bs] = (accumulate ? dh : 0) + dg[off:off+bs] W_hh carries it to the previous step. nt as in
// time_loop_forward: a barrier between the two phases in the fused region (or, where rows_split, each thread its
// own rows and no barrier); per-step, a GEMV on W_hh^T for small batches, else one GEMM.
template <typename T, int G, class Row>
void time_loop_backward(const Steps& s, int nt, const Tensor& w_hh, const Tensor& dg, Tensor& dh, bool accumulate,
                        int64_t row_work, const Row& row) {
  const int64_t H = dh.size(1);
  const T* wh = w_hh.const_data_ptr<T>();
  const T* dgp = dg.const_data_ptr<T>();
  T* dhp = dh.data_ptr<T>();
  if (rows_split<T>(s, nt, G, H)) {
    run_row_shares(s, nt, [&](int, int, int64_t b0, int64_t b1) {
      PackedA<T> pk;  // the whole of W_hh, this thread's own copy
      pk.init(false, H, b1 - b0, G * H, wh, H, s.T);
      each_step(s, true, [&](int64_t t, int64_t bs, int64_t off) {
        const int64_t r1 = std::min(bs, b1);
        if (r1 <= b0) return;
        for (int64_t b = b0; b < r1; ++b) row(t, b, off, 0, H);
        const T* dgr = dgp + (off + b0) * G * H;
        T* dhr = dhp + b0 * H;
        if (pk.ok()) pk.mm(r1 - b0, dgr, G * H, T(accumulate), dhr, H);
        else gemm::cm(false, false, H, r1 - b0, G * H, T(1), wh, H, dgr, G * H, T(accumulate), dhr, H);
      });
    });
    return;
  }
  const Tensor whT = transposed_for_gemv<T>(s, w_hh, nt > 0);
  if (nt > 0) {
    unit_team(nt, H, [&](int, int nth, int64_t k0, int64_t k1) {
      RecurrentBackward<T, G> rec(s, wh, whT, H, k0, k1);
      each_step(s, true, [&](int64_t t, int64_t bs, int64_t off) {
        for (int64_t b = 0; b < bs && k1 > k0; ++b) row(t, b, off, k0, k1);
        cpu::team_barrier(nth);
        if (k1 > k0) rec.step(bs, dgp + off * G * H, dhp, accumulate);
      });
    });
    return;
  }
  const T* whTp = whT.defined() ? whT.const_data_ptr<T>() : nullptr;
  each_step(s, true, [&](int64_t t, int64_t bs, int64_t off) {
    kern::par_rows(bs, row_work, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) row(t, b, off, 0, H);
    });
    if (kern::use_small(bs)) {
      std::array<const T*, kMaxSmallB> xr;
      std::array<T*, kMaxSmallB> yr;
      for (int64_t b = 0; b < bs; ++b) {
        xr[b] = dgp + (off + b) * G * H;
        yr[b] = dhp + b * H;
      }
      kern::par_units(H, bs * G * H * H, [&](int64_t k0, int64_t k1) {
        kern::gemv<T>(bs, xr.data(), whTp, G * H, nullptr, nullptr, 0, yr.data(), k0, k1, accumulate);
      });
    } else {
      Tensor d = dh.narrow(0, 0, bs);
      gemm::matmul_out(d, dg.narrow(0, off, bs), w_hh, accumulate);
    }
  });
}

// ------------------------------------------------------------------------------------------------------------------
// LSTM: nt from fused_threads (0 = per-step path); lp only on the per-step path; small_nt > 0: the float32 AVX-512
// 1-2 row backward on that many threads.
template <typename T>
void lstm_fwd(const Steps& s, int nt, const Tensor& h0, const Tensor& c0, const Tensor& w_hh, Tensor& gates,
              Tensor& out, Tensor& cs, const LowP* lp) {
  const int64_t H = h0.size(1);
  T* g = gates.data_ptr<T>();
  T* o = out.data_ptr<T>();
  T* c = cs.data_ptr<T>();
  const T* c0p = c0.const_data_ptr<T>();
  // gates hold the input projection: the recurrent product is added onto the step's rows
  time_loop_forward<T, 4>(s, nt, h0, w_hh, out, gates, true, true, 64 * H, lp,
                          [&](int64_t t, int64_t b, int64_t off, int64_t k0, int64_t k1) {
                            kern::lstm_fwd_row<T>(g + (off + b) * 4 * H, nullptr, nullptr,
                                                  prev_row<T>(s, t, b, c, c0p, H), c + (off + b) * H,
                                                  o + (off + b) * H, H, k0, k1);
                          });
}

// float32 LSTM backward for 1-2 row batches on AVX-512 (fused_gemv range with the own kernels): per step each thread
// runs the pointwise backward of its units, then the partial dh of its own gate rows of W_hh (lstm_step::gemv_t_small:
// the same rows its forward step read, contiguous, no transposed copy of W_hh), and after the barrier sums the
// threads' partials for its units. Partials are double-buffered: a thread can be at most one step ahead of the rest.
// row: the LSTM pointwise backward of lstm_bwd.
template <class Row>
void lstm_bwd_small_avx512(const Steps& s, int nt, const Tensor& w_hh, const Tensor& dgates, Tensor& dh,
                           const Row& row) {
  const int64_t H = dh.size(1);
  const float* wh = w_hh.const_data_ptr<float>();
  const float* dg = dgates.const_data_ptr<float>();
  float* dhp = dh.data_ptr<float>();
  nt = std::max(nt, 1);
  Tensor part_t = at::empty({2, nt, 2, H}, dh.options());  // [buffer, thread, row, unit]
  float* part = part_t.data_ptr<float>();
  unit_team(nt, H, [&](int tid, int nth, int64_t k0, int64_t k1) {
    const int64_t j0[4] = {k0, H + k0, 2 * H + k0, 3 * H + k0};
    int buf = 0;
    each_step(s, true, [&](int64_t t, int64_t bs, int64_t off) {
      const float* xr[2];
      float* yr[2];
      for (int64_t b = 0; b < bs; ++b) {
        row(t, b, off, k0, k1);
        xr[b] = dg + (off + b) * 4 * H;
        yr[b] = part + ((buf * nth + tid) * 2 + b) * H;
      }
      if (k1 > k0) lstm_step::gemv_t_small(bs, xr, j0, 4, k1 - k0, wh, H, H, yr);
      else
        for (int64_t b = 0; b < bs; ++b) std::fill(yr[b], yr[b] + H, 0.f);
      cpu::team_barrier(nth);
      for (int64_t b = 0; b < bs; ++b)
        for (int64_t u = k0; u < k1; ++u) {
          float sum = 0.f;
          for (int i = 0; i < nth; ++i) sum += part[((buf * nth + i) * 2 + b) * H + u];
          dhp[b * H + u] = sum;
        }
      buf ^= 1;
    });
  });
}

template <typename T>
void lstm_bwd(const Steps& s, int nt, int small_nt, const Tensor& grad_out, const Tensor& c0, const Tensor& w_hh,
              const Tensor& gates, const Tensor& cs, Tensor& dgates, Tensor& dh, Tensor& dc) {
  const int64_t H = c0.size(1);
  const T* g = gates.const_data_ptr<T>();
  const T* c = cs.const_data_ptr<T>();
  const T* c0p = c0.const_data_ptr<T>();
  const T* go = grad_out.const_data_ptr<T>();
  T* dg = dgates.data_ptr<T>();
  T* dhp = dh.data_ptr<T>();
  T* dcp = dc.data_ptr<T>();
  const auto row = [&](int64_t t, int64_t b, int64_t off, int64_t k0, int64_t k1) {
    kern::lstm_bwd_row<T>(g + (off + b) * 4 * H, prev_row<T>(s, t, b, c, c0p, H), c + (off + b) * H, dhp + b * H,
                          go + (off + b) * H, dcp + b * H, dg + (off + b) * 4 * H, dcp + b * H, H, k0, k1);
  };
  if constexpr (std::is_same_v<T, float>)
    if (small_nt > 0) return lstm_bwd_small_avx512(s, small_nt, w_hh, dgates, dh, row);
  time_loop_backward<T, 4>(s, nt, w_hh, dgates, dh, false, 64 * H, row);
}

// float32 LSTM forward on a fused step kernel (rnn_sequence_lstm_step.h: AVX-512, or its AVX2 twin when avx2): per
// thread, its units' W_ih / W_hh / bias packed gate-interleaved once, then per step one call that does both gate
// GEMMs and the cell update in registers.
// pre: [N, 4H] input pre-activations x W_ih^T + bias from one GEMM, or undefined (the step kernel does the input GEMM
// from the packed W_ih). AVX-512: given for 1-2 row batches (streaming W_ih per step would double the step's traffic
// there), where lstm_step::step_small reads W_hh in place. AVX2: given where W_ih would not stay in cache between
// steps (see lstm_forward_impl); the step then starts from those rows instead of the bias.
// gates: [N, 4H] activated-gate workspace for the backward (may be `pre` itself: filled in place), or undefined
// (inference: not written).
template <bool avx2>
void lstm_fwd_fused(const Steps& s, int nt, const Tensor& x, const Tensor& pre, const Tensor& h0, const Tensor& c0,
                    const Tensor& w_ih, const Tensor& w_hh, const Tensor& bias, Tensor& gates, Tensor& out,
                    Tensor& cs) {
  constexpr int64_t kUnits = avx2 ? lstm_step_avx2::kUnits : lstm_step::kUnits;
  const auto pack_size = avx2 ? lstm_step_avx2::pack_size : lstm_step::pack_size;
  const auto pack_weights = avx2 ? lstm_step_avx2::pack_weights : lstm_step::pack_weights;
  const int64_t H = h0.size(1), I = pre.defined() ? 0 : x.size(1);
  const float* xp = x.const_data_ptr<float>();
  const float* pp = pre.defined() ? pre.const_data_ptr<float>() : nullptr;
  const float* wi = w_ih.const_data_ptr<float>();
  const float* wh = w_hh.const_data_ptr<float>();
  const float* bp = bias.defined() && !pp ? bias.const_data_ptr<float>() : nullptr;
  float* g = gates.defined() ? gates.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  float* c = cs.data_ptr<float>();
  const float* h0p = h0.const_data_ptr<float>();
  const float* c0p = c0.const_data_ptr<float>();
  // Each thread packs its own slice of the units; each step's blocks are then shared by the team (cpu/block_share.h:
  // a thread done with its own takes a slower teammate's last blocks, packed weights and all), except on the 1-2 row
  // path, which packs nothing and reads W_hh in place.
  struct Slice {
    const float *wx = nullptr, *wh = nullptr, *bias = nullptr;
    int64_t u0 = 0, u1 = 0;
  };
  std::vector<Slice> slices(size_t(std::max(nt, 1)));
  cpu::BlockShare share(std::max(nt, 1));
  const bool sharing = cpu::config().block_share;
  // The rows split (rows_split_fits), for the AVX-512 step: each thread packs all the units' weights. Same process,
  // T32, rows / units split: inference B256 H128 1.15x, B64 H128 1.15x, B256 H64 1.28x, B32 H64 1.37x, B64 H96 1.20x;
  // training B256 H128 0.97-1.05x, B128 H128 1.03x, B64 H128 1.05x, B256 H64 1.07x.
  const bool by_rows =
      !avx2 && rows_split_fits(s, nt, int64_t(sizeof(float)) * (pack_size(I, H) + pack_size(H, H)));
  // units [k0, k1) of batch rows [row0, row1) (by_rows: all units of the thread's rows, no barrier)
  const auto body = [&](int tid, int nth, int64_t k0, int64_t k1, int64_t row0, int64_t row1) {
    const int64_t nu = k1 - k0;
    const int64_t nblk = (nu + kUnits - 1) / kUnits;
    // 1-2 rows (pre given): lstm_step::step_small reads W_hh in place, nothing to pack.
    const bool small = !avx2 && pp != nullptr && s.bs[0] <= 2;
    block_pool::Floats pw_i_buf, pw_h_buf, pb_buf(nblk * 4 * kUnits);
    if (I) pw_i_buf.reset(pack_size(I, nu));
    if (!small) pw_h_buf.reset(pack_size(H, nu));
    TORCH_CHECK(pb_buf.ok() && (!I || pw_i_buf.ok()) && (small || pw_h_buf.ok()),
                "seqfast LSTM: out of memory packing the weights");
    float* pw_i = pw_i_buf.get();
    float* pw_h = pw_h_buf.get();
    float* pb = pb_buf.get();
    std::vector<const float*> hr(s.bs.empty() ? 0 : s.bs[0]), cr(hr.size());
    if (nu > 0) {
      if (I) pack_weights(wi, I, I, H, k0, k1, pw_i);
      if (!small) pack_weights(wh, H, H, H, k0, k1, pw_h);
      lstm_step::pack_bias(bp, H, k0, k1, kUnits, pb);
    }
    // a team smaller than nt shares among its own threads (the ranges of the rest are never opened)
    const bool shared = sharing && !small && nth > 1 && !by_rows;
    const Slice own{pw_i, pw_h, pb, k0, k1};
    if (shared) slices[size_t(tid)] = own;
    lstm_step::StepArgs a;
    a.ldx = I;
    a.I = I;
    a.H = H;
    a.ldpre = 4 * H;
    // runs blocks [b0, b1) of a slice (its packed weights) for this step's rows
    auto run = [&](const Slice& sl, int64_t b0, int64_t b1) {
      a.u0 = sl.u0 + b0 * kUnits;
      a.u1 = std::min(sl.u1, sl.u0 + b1 * kUnits);
      a.wx = sl.wx ? sl.wx + pack_size(I, b0 * kUnits) : nullptr;
      a.wh = sl.wh ? sl.wh + pack_size(H, b0 * kUnits) : nullptr;
      a.bias = sl.bias + b0 * 4 * kUnits;
      if constexpr (avx2) lstm_step_avx2::step(a);
      else if (small) lstm_step::step_small(a, wh);
      else lstm_step::step(a);
    };
    each_step(s, false, [&](int64_t t, int64_t bs, int64_t off) {
      const int64_t r1 = std::min(bs, row1);
      if (r1 > row0) {
        for (int64_t b = row0; b < r1; ++b) {
          hr[b - row0] = prev_row<float>(s, t, b, o, h0p, H);
          cr[b - row0] = prev_row<float>(s, t, b, c, c0p, H);
        }
        const int64_t r = off + row0;  // the first row of this step handled here
        a.rows = r1 - row0;
        a.x = I ? xp + r * I : nullptr;
        a.pre = pp ? pp + r * 4 * H : nullptr;
        a.h = hr.data();
        a.cprev = cr.data();
        a.c = c + r * H;
        a.hout = o + r * H;
        a.gates = g ? g + r * 4 * H : nullptr;
        if (!shared) {
          if (nu > 0) run(own, 0, nblk);
        } else {
          share.run(tid, nth, nblk, [&](int owner, int64_t b) { run(slices[size_t(owner)], b, b + 1); });
        }
      }
      if (!by_rows) cpu::team_barrier(nth);
    });
  };
  if (by_rows) {
    run_row_shares(s, nt, [&](int tid, int nth, int64_t r0, int64_t r1) { body(tid, nth, 0, H, r0, r1); });
  } else {
    unit_team(nt, H, [&](int tid, int nth, int64_t k0, int64_t k1) {
      body(tid, nth, k0, k1, 0, std::numeric_limits<int64_t>::max());
    });
  }
}

// bfloat16 LSTM / GRU / RNN forward on the fused bfloat16 steps (rnn_sequence_step_bf16.h): per thread its units'
// W_ih / W_hh packed pair-interleaved once, then per step one call doing both products (vdpbf16ps) and the cell
// update. x, h0, w_ih, w_hh: bfloat16, contiguous; bias: float32 (step_bf16::StepArgs::bias: [4H] for LSTM / GRU,
// [H] for RNN) or undefined; LSTM: c0f float32 [B, H], cs float32 [N, H] (else both undefined). out: bfloat16
// [N, H] (each step's h, which the next step reads); ws: float32 [N, 4H] for the backward (StepArgs::ws), or
// undefined.
enum class Bf16Cell { kLstm, kGru, kRnn };
template <Bf16Cell kCell>
void fwd_fused_bf16(const Steps& s, int nt, const Tensor& x, const Tensor& h0, const Tensor& c0f, const Tensor& w_ih,
                    const Tensor& w_hh, const Tensor& bias, bool relu, Tensor& ws, Tensor& out, Tensor& cs) {
  using step_bf16::pack_size;
  constexpr bool kLstm = kCell == Bf16Cell::kLstm, kRnn = kCell == Bf16Cell::kRnn;
  constexpr int64_t G = kLstm ? 4 : kCell == Bf16Cell::kGru ? 3 : 1;
  constexpr int64_t kBlock = kRnn ? step_bf16::kRnnUnits : step_bf16::kUnits;
  const auto raw = [](const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()); };
  const int64_t H = h0.size(1), I = x.size(1);
  const uint16_t *xp = raw(x), *wi = raw(w_ih), *wh = raw(w_hh), *h0p = raw(h0);
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* wsp = ws.defined() ? ws.data_ptr<float>() : nullptr;
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  float* c = kLstm ? cs.data_ptr<float>() : nullptr;
  const float* c0p = kLstm ? c0f.const_data_ptr<float>() : nullptr;
  unit_team(nt, H, [&](int, int nth, int64_t k0, int64_t k1) {
    const int64_t nblk = (k1 - k0 + kBlock - 1) / kBlock, span = nblk * kBlock;  // span: the units packed
    // packed bfloat16 pairs in the pool's 64-byte-aligned float blocks (two per float)
    block_pool::Floats pw_i_buf((pack_size(I, span, G) + 1) / 2), pw_h_buf((pack_size(H, span, G) + 1) / 2),
        pb_buf(nblk * 4 * step_bf16::kUnits);
    TORCH_CHECK(pw_i_buf.ok() && pw_h_buf.ok() && pb_buf.ok(), "seqfast RNN: out of memory packing the weights");
    uint16_t* pw_i = reinterpret_cast<uint16_t*>(pw_i_buf.get());
    uint16_t* pw_h = reinterpret_cast<uint16_t*>(pw_h_buf.get());
    float* pb = pb_buf.get();
    if (k1 > k0) {
      if constexpr (kRnn) {
        step_bf16::pack_rnn_weights(wi, I, I, k0, k1, pw_i);
        step_bf16::pack_rnn_weights(wh, H, H, k0, k1, pw_h);
        for (int64_t u = 0; u < span; ++u) pb[u] = (bp && k0 + u < k1) ? bp[k0 + u] : 0.f;
      } else {
        step_bf16::pack_weights(wi, I, I, H, G, k0, k1, pw_i);
        step_bf16::pack_weights(wh, H, H, H, G, k0, k1, pw_h);
        lstm_step::pack_bias(bp, H, k0, k1, step_bf16::kUnits, pb);
      }
    }
    std::vector<const uint16_t*> hr(s.bs.empty() ? 0 : s.bs[0]);
    std::vector<const float*> cr(kLstm ? hr.size() : 0);
    step_bf16::StepArgs a;
    a.ldx = I;
    a.I = I;
    a.wx = pw_i;
    a.wh = pw_h;
    a.H = H;
    a.bias = pb;
    a.relu = relu;
    a.u0 = k0;
    a.u1 = k1;
    each_step(s, false, [&](int64_t t, int64_t bs, int64_t off) {
      for (int64_t b = 0; b < bs; ++b) {
        hr[b] = prev_row<uint16_t>(s, t, b, o, h0p, H);
        if constexpr (kLstm) cr[b] = prev_row<float>(s, t, b, c, c0p, H);
      }
      a.rows = bs;
      a.x = xp + off * I;
      a.h = hr.data();
      a.cprev = cr.data();
      a.c = c ? c + off * H : nullptr;
      a.hout = o + off * H;
      a.ws = wsp ? wsp + off * 4 * H : nullptr;
      if (k1 > k0) {
        if constexpr (kLstm) step_bf16::lstm(a);
        else if constexpr (kRnn) step_bf16::rnn(a);
        else step_bf16::gru(a);
      }
      cpu::team_barrier(nth);
    });
  });
}

// Threads for fwd_fused_bf16 (1: the calling thread alone), or 0: not that path (no such CPU, nothing to run, or
// already inside a parallel region).
inline int bf16_step_threads(const Steps& s, int64_t H, int64_t G) {
  if (!step_bf16::available() || s.T == 0 || at::in_parallel_region()) return 0;
  return s.bs[0] * G * H * H < kern::par_min_work() ? 1 : cpu::threads(std::max<int64_t>(1, H / 16));
}

// ------------------------------------------------------------------------------------------------------------------
// GRU: as LSTM.
template <typename T>
void gru_fwd(const Steps& s, int nt, const Tensor& h0, const Tensor& w_hh, const T* bhh, const Tensor& gi,
             Tensor& out, Tensor& ws, const LowP* lp) {
  const int64_t H = h0.size(1), B = h0.size(0);
  Tensor gh = at::empty({std::max<int64_t>(B, 1), 3 * H}, h0.options());  // per-step W_hh h, reused
  const T* ghp = gh.const_data_ptr<T>();
  const T* gip = gi.const_data_ptr<T>();
  T* o = out.data_ptr<T>();
  T* w = ws.data_ptr<T>();
  const T* h0p = h0.const_data_ptr<T>();
  // W_hh h goes to the step's scratch gh, not onto gi: b_hn applies inside r * (.)
  time_loop_forward<T, 3>(s, nt, h0, w_hh, out, gh, false, false, 64 * H, lp,
                          [&](int64_t t, int64_t b, int64_t off, int64_t k0, int64_t k1) {
                            kern::gru_fwd_row<T>(gip + (off + b) * 3 * H, nullptr, ghp + b * 3 * H, bhh,
                                                 prev_row<T>(s, t, b, o, h0p, H), o + (off + b) * H,
                                                 w + (off + b) * 4 * H, H, k0, k1);
                          });
}

template <typename T>
void gru_bwd(const Steps& s, int nt, const Tensor& grad_out, const Tensor& h0, const Tensor& w_hh, const Tensor& out,
             const Tensor& ws, Tensor& dgi, Tensor& dgh, Tensor& dh) {
  const int64_t H = h0.size(1);
  const T* o = out.const_data_ptr<T>();
  const T* h0p = h0.const_data_ptr<T>();
  const T* w = ws.const_data_ptr<T>();
  const T* go = grad_out.const_data_ptr<T>();
  T* dgip = dgi.data_ptr<T>();
  T* dghp = dgh.data_ptr<T>();
  T* dhp = dh.data_ptr<T>();
  // the recurrent part is added onto the direct part dh * z the pointwise left in dh
  time_loop_backward<T, 3>(s, nt, w_hh, dgh, dh, true, 64 * H,
                           [&](int64_t t, int64_t b, int64_t off, int64_t k0, int64_t k1) {
                             kern::gru_bwd_row<T>(dhp + b * H, go + (off + b) * H, prev_row<T>(s, t, b, o, h0p, H),
                                                  w + (off + b) * 4 * H, dgip + (off + b) * 3 * H,
                                                  dghp + (off + b) * 3 * H, dhp + b * H, H, k0, k1);
                           });
}

// ------------------------------------------------------------------------------------------------------------------
// Elman RNN: out holds x W_ih^T + b_ih on entry and is activated in place, step by step. The forward runs the fused
// loop where GRU / LSTM do (nt from fused_threads; the bfloat16 path lp: 0, per step); until 2026-12-06 it ran per
// step only.
// Same-process A/B on a 2-vCPU Zen 3 (T32, no grad, 21 rounds, both orders): fused / per-step 1.22-1.45x at B1
// H256-384, 1.09-1.13x at B1-8 H512, 1.91x at B8 H128, 0.99-1.03x at B1 H1024 and B32-256 H256-512; one thread 1.01-
// 1.04x (B8 H64 2.3x); training 1.00-1.08x. The backward stays per step: its fused loop read 0.87-1.15x (B8 H512
// 0.93x, B256 H256 0.87x).
template <typename T>
void rnn_fwd(const Steps& s, int nt, const Tensor& h0, const Tensor& w_hh, const T* bhh, bool relu, Tensor& out,
             const LowP* lp) {
  const int64_t H = h0.size(1);
  T* o = out.data_ptr<T>();
  time_loop_forward<T, 1>(s, nt, h0, w_hh, out, out, true, true, 16 * H, lp,
                          [&](int64_t, int64_t b, int64_t off, int64_t k0, int64_t k1) {
                            T* y = o + (off + b) * H;
                            kern::rnn_fwd_row<T>(y, bhh, nullptr, y, relu, k0, k1);
                          });
}

template <typename T>
void rnn_bwd(const Steps& s, const Tensor& grad_out, const Tensor& w_hh, const Tensor& out, bool relu, Tensor& dpre,
             Tensor& dh) {
  const int64_t H = dh.size(1);
  const T* o = out.const_data_ptr<T>();
  const T* go = grad_out.const_data_ptr<T>();
  T* dp = dpre.data_ptr<T>();
  T* dhp = dh.data_ptr<T>();
  // the per-step path, except where the rows split pays (rows_split)
  int nt = fused_threads<T>(s, H, 1);
  if (!rows_split<T>(s, nt, 1, H)) nt = 0;
  time_loop_backward<T, 1>(s, nt, w_hh, dpre, dh, false, 8 * H,
                           [&](int64_t, int64_t b, int64_t off, int64_t k0, int64_t k1) {
                             kern::rnn_bwd_row<T>(dhp + b * H, go + (off + b) * H, o + (off + b) * H,
                                                  dp + (off + b) * H, relu, k0, k1);
                           });
}

// The gradients a layer's backward computes (rnn.h: the entries' need_* flags); dh0 (and dc0) always.
struct LayerNeeds {
  bool dx = true, dw_ih = true, dw_hh = true;
};

// bfloat16 backward: the time loop (the pointwise gate derivatives and the recurrent dh = dg W_hh) runs in float32
// on upcast copies of what it reads (the forward's workspaces already are float32). Where the CPU has native bfloat16
// (bf16_products) the weight-sized products after it stay in bfloat16 (products); elsewhere the whole backward runs
// in float32 and the gradients are rounded to bfloat16 once (to_bf16).
inline Tensor f32(const Tensor& t) { return t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t; }
template <class Tup>
Tup to_bf16(Tup r) {
  // gradients the caller skipped stay undefined
  std::apply([](auto&... t) { ((t = t.defined() ? t.to(at::kBFloat16) : t), ...); }, r);
  return r;
}

// Whether a bfloat16 layer's backward runs its weight-sized products (dx = dg W_ih, dW_ih = dg^T x, dW_hh = dg^T
// h_prev) in bfloat16 with float32 accumulation: on CPUs with AVX512_BF16 (torch's bfloat16 GEMMs, oneDNN's, run
// vdpbf16ps there, or AMX tiles), not where torch's bfloat16 GEMM is a slow generic loop; config().bf16_products.
// Why: three of a layer backward's four products are these, and on upcast copies they ran at float32's rate. Zen 5
// (AMD EPYC family 26), T32 training, torch's time over seqfast's with them / upcast: LSTM B32 H256 0.99x / 0.73x,
// B64 H512 1.12x / 0.79x, B256 H256 0.98x / 0.73x; GRU B64 H512 1.27x / 0.98x, B32 H1024 1.38x / 1.01x; RNN B64 H512
// 1.12x / 0.87x, B256 H256 0.97x / 0.72x (same process, 9 rounds).
inline bool bf16_products() { return cpu::has_avx512_bf16() && cpu::config().bf16_products; }

// The products of a backward from its float32 gate gradients dg [N, G H], in the layer's dtype: dg rounded to
// bfloat16 once for a bfloat16 layer (at::mm then accumulates in float32 and rounds each result once), float32 /
// float64 through the GEMM entry point. a @ b for a = dg (or its transpose) in the layer's dtype.
inline Tensor products(const Tensor& a, const Tensor& b) {
  return a.scalar_type() == at::kBFloat16 ? at::mm(a, b) : gemm(a, b);
}
// dg in the layer's dtype (x's).
inline Tensor layer_dtype(const Tensor& dg, const Tensor& x) {
  return x.scalar_type() == dg.scalar_type() ? dg : dg.to(x.scalar_type());
}

}  // namespace

// rnn.h. Inside the step, each step streams the packed W_ih beside W_hh; that pays while the stream stays in a cache
// or enough rows share it. The GEMM goes first:
//   * up to 8 rows, where a thread's packed slices outgrow half its L2 (measured in the caller);
//   * up to 32 rows, where both packed matrices together outgrow 3/4 of the L3: each step then streams them from
//     memory, 2 bytes per FLOP per batch row, and the GEMM-first form halves that stream (W_hh alone, which can stay
//     in L3). Zen 5 (AMD EPYC family 26, 32 MB L3), 2 threads, T32 no grad, seqfast's time in the step over its time
//     with the GEMM first (same process, 9-15 rounds): H1024 (32 MB packed) B12 1.17x, B16 1.16x / 1.155x (two
//     runs), B24 1.065x, B32 0.99x / 1.03x, B48 0.98x, B64 0.92x; H1536 B32 1.08x; H768 (19 MB) B16 0.94x, B32
//     0.94x; H512 (8 MB) B32 0.87x, B64 0.89x. Training (the forward is shared) H1024 B32 T16 1.02x.
namespace {
// Bytes of one thread's packed W_ih and W_hh slices for the fused AVX-512 LSTM step (`units` units, I inputs).
int64_t step_slice_bytes(int64_t I, int64_t H, int64_t units) {
  return int64_t(sizeof(float)) * lstm_step::pack_size(I + H, units);
}
}  // namespace

bool lstm_input_first(int64_t rows, int64_t I, int64_t H, int64_t units) {
  const int64_t slices = step_slice_bytes(I, H, units);
  const int64_t all = int64_t(sizeof(float)) * 4 * H * (I + H);
  return (rows <= 8 && slices > cpu::l2_cache_bytes() / 2) || (rows <= 32 && all > cpu::l3_cache_bytes() / 4 * 3);
}

// Whether the LSTM layer leaves the fused step for the per-step path (one input GEMM, then per step the recurrent
// product split over the team and the pointwise pass) on a CPU whose BLAS runs natively (gemm::blas_native: Intel):
// from 8 to 64 rows, where a thread's packed slices outgrow twice its L2, the fused step re-reads them from the L3
// every step, which an Intel core's share of its mesh L3 feeds more slowly than the EPYCs' L3 the step was tuned on.
// Intel Xeon (family 6 model 167, 2 MB L2 per core), 2 threads, T32, torch's time over seqfast's, same process, 5-7
// rounds. The fused step / the per-step path (config fused off), no grad: H1024 (16 MB of slices per thread) B4 1.33
// / 1.45x, B8 0.92 / 1.06x, B16 0.85 / 1.15x, B32 0.92 / 1.07x, B64 0.93 / 1.03x; against B256 H1024 0.98 / 0.92x;
// H512 (4 MB) B8 1.24 / 1.15x, B16 1.02 / 1.16x, B32 0.90 / 0.98x, B64 1.01 / 0.93x; H256 (1 MB) B8-256 1.05-1.15 /
// 0.61-0.88x. With this rule / without it (blas_native forced off), H1024: B4 1.42 / 1.52x (so from 8 rows), B8
// 1.05 / 0.95x, B16 1.09 / 0.87x, B32 0.99 / 0.84x, B64 1.02 / 0.96x; training B16 1.30 / 1.15x, B64 1.09 / 0.99x.
bool lstm_step_yields(int64_t rows, int64_t I, int64_t H, int64_t units) {
  return rows >= 8 && rows <= 64 && step_slice_bytes(I, H, units) > 2 * cpu::l2_cache_bytes() && gemm::blas_native();
}

// ==================================================================================================================
namespace {
// save = false (inference): the gate workspace is not kept (returned empty) where the fused loop can avoid it.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_impl(const Tensor& x, const Steps& s,
                                                                     const Tensor& h0, const Tensor& c0,
                                                                     const Tensor& w_ih, const Tensor& w_hh,
                                                                     const OptTensor& b_ih, const OptTensor& b_hh,
                                                                     bool save) {
  kern::check_cpu();
  const int64_t H = h0.size(1);
  const bool bf = x.scalar_type() == at::kBFloat16;
  const auto fopt = x.options().dtype(bf ? at::kFloat : x.scalar_type());
  const Tensor bias = summed_bias(b_ih, b_hh, fopt.dtype().toScalarType());
  Tensor out = at::empty({x.size(0), H}, fopt);
  Tensor cs = pooled_empty({x.size(0), H}, fopt);  // workspace: saved for backward, never a user-visible output
  if (bf) {
    const int nt = bf16_step_threads(s, H, 4);
    if (nt > 0) {
      const Tensor h0c = h0.contiguous(), c0f = c0.to(at::kFloat).contiguous();
      Tensor outb = at::empty({x.size(0), H}, x.options());
      Tensor gates = save ? pooled_empty({x.size(0), 4 * H}, fopt) : Tensor();
      fwd_fused_bf16<Bf16Cell::kLstm>(s, nt, x.contiguous(), h0c, c0f, w_ih.contiguous(), w_hh.contiguous(), bias,
                                      false, gates, outb, cs);
      if (!save) gates = at::empty({0, 4 * H}, fopt);
      return {outb, gather_last(s, outb, h0c), gather_last(s, cs, c0f).to(at::kBFloat16), gates, cs};
    }
    Tensor gates = proj_bf16(x, w_ih, bias);  // [N,4H] fp32
    const LowP lp{at::empty({x.size(0), H}, x.options()), h0, w_hh};
    Tensor h0f = h0.to(at::kFloat), c0f = c0.to(at::kFloat);
    lstm_fwd<float>(s, 0, h0f, c0f, w_hh.to(at::kFloat), gates, out, cs, &lp);
    return {lp.out, gather_last(s, out, h0f).to(at::kBFloat16), gather_last(s, cs, c0f).to(at::kBFloat16), gates,
            cs};
  }
  Tensor gates;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::lstm_layer_forward", [&] {
    const int nt = fused_threads<scalar_t>(s, H, 4);
    // Fused AVX-512 step (gate GEMMs and cell update per step in registers) for float32. Batches above the GEMV range
    // do the input projection inside the step, except where lstm_input_first: for batches of up to 8 rows, where
    // their packed W_ih and W_hh slices would not stay in half a thread's L2, each step would stream W_ih again beside
    // W_hh for at most two row tiles, and one GEMM over all steps first reads it once. Zen 5, 2 threads, T32, torch's
    // time over seqfast's with the GEMM first / in the step (same process, 11-15 rounds): inference B4 H512 1.60 /
    // 1.40x, B4 H1024 1.54 / 1.24x, B8 H512 1.19 / 1.13x, B8 H1024 1.58 / 1.06x, training B4 H512 1.27 / 1.21x, B8
    // H1024 1.43 / 1.23x; from 12 rows, with the weights within the L3, the step's own product won (B16 H512 1.03 /
    // 1.13x, B64 H512 0.92 / 1.08x; the weights past the L3: lstm_input_first). 1-2 row batches always take that GEMM
    // first (at one row the step is a stream of the weights and W_ih would double it) and read W_hh in place, up to the
    // hidden size small_step_threads allows. Where the step yields (lstm_step_yields), the per-step path below runs
    // the layer (the steps' products split over the team by gemm::linear_out).
    bool yields = false;
    if (std::is_same_v<scalar_t, float> && sgemm::available() && s.T > 0 && cpu::config().fused) {
      const bool small = s.bs[0] <= 2;
      const int n = small ? small_step_threads(H) : nt;
      yields = !small && n && lstm_step_yields(s.bs[0], x.size(1), H, (H + n - 1) / n);
      if (n && !yields) {
        const Tensor xc = x.contiguous(), wc = w_ih.contiguous(), whc = w_hh.contiguous();
        const int64_t I = x.size(1), units = (H + n - 1) / n;
        const bool proj = small || (s.T >= 2 && lstm_input_first(s.bs[0], I, H, units));
        Tensor pre;
        if (proj) pre = input_proj(x, w_ih, bias.defined() ? &bias : nullptr);  // [N,4H], becomes the workspace
        if (save) gates = proj ? pre : pooled_empty({x.size(0), 4 * H}, fopt);
        lstm_fwd_fused<false>(s, n, xc, pre, h0.contiguous(), c0.contiguous(), wc, whc, bias, gates, out, cs);
        if (!save) gates = at::empty({0, 4 * H}, fopt);
        return;
      }
    }
    // The AVX2 twin of that step on CPUs without AVX-512, for the fused loop's batches (above the GEMV range). The
    // input product runs inside the step while both packed weight slices of a thread fit half its L2 (re-read from
    // there every step, and the longer k loop amortises the cell update: ~80 against ~66 GFLOP/s per Zen 3 core at
    // LSTM B8 H128); above that, re-reading W_ih every step would come from L3, and one GEMM over all steps first
    // reads it once. That second form stops at 64 rows: beyond, the loop's packed GEMM blocks the rows better than
    // 3-row tiles reading strided pre-activation rows (LSTM T32 B256 H256 inference, same-process A/B on a Zen 3:
    // 82 ms against the step's 94 ms; at B32-64, H256-1024 the step read 1.09-1.11x the GEMM loop, and 0.97x once).
    // Either form packs its weight slices on every call, which only enough rows repay: in a same-process A/B
    // against the GEMM loop on the Zen 3 (fused / loop, no grad), the in-step form read 0.78-0.89x at one step (B3
    // H64, B8 H128) and 1.01-1.02x at two; the other form 0.55-0.96x at 4-32 rows (B4-B32, H256-1024, T1-T8: the
    // packing of W_hh, up to 120 us per thread at H512 against steps of 60-250 us), 0.94-1.03x at 64-128 rows and
    // 0.98-1.11x from 192 (B8 H512 T24 1.11x, B16 H1024 T16 0.98x). A seq2seq decoder calling the layer one step at
    // a time (beam search at batch 8, H512) took 598 us fused against 329 us in the GEMM loop.
    const int64_t I = x.size(1), units = (H + std::max(nt, 1) - 1) / std::max(nt, 1);
    const bool in_step =
        int64_t(sizeof(float)) * lstm_step_avx2::pack_size(I + H, units) <= cpu::l2_cache_bytes() / 2;
    const bool repays = in_step ? s.T >= 2 : x.size(0) >= 128;
    if (std::is_same_v<scalar_t, float> && !sgemm::available() && lstm_step_avx2::available() && nt > 0 &&
        !fused_gemv<float>(s.bs[0]) && (in_step || s.bs[0] <= 64) && repays) {
      Tensor pre;
      if (!in_step) pre = input_proj(x, w_ih, bias.defined() ? &bias : nullptr);  // [N,4H], becomes the workspace
      if (save) gates = pre.defined() ? pre : pooled_empty({x.size(0), 4 * H}, fopt);
      lstm_fwd_fused<true>(s, nt, x.contiguous(), pre, h0.contiguous(), c0.contiguous(), w_ih.contiguous(),
                           w_hh.contiguous(), bias, gates, out, cs);
      if (!save) gates = at::empty({0, 4 * H}, fopt);
      return;
    }
    gates = input_proj(x, w_ih, bias.defined() ? &bias : nullptr);  // [N,4H]
    lstm_fwd<scalar_t>(s, yields ? 0 : nt, h0, c0, w_hh, gates, out, cs, nullptr);
  });
  return {out, gather_last(s, out, h0), gather_last(s, cs, c0), gates, cs};
}
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_impl(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn, const Tensor& x, const Tensor& batch_sizes,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& out,
    const Tensor& gates, const Tensor& cs, bool reverse, const LayerNeeds& n) {
  kern::check_cpu();
  const bool bf = x.scalar_type() == at::kBFloat16;
  if (bf && !bf16_products())
    return to_bf16(lstm_layer_backward(f32(grad_out), f32(grad_hn), f32(grad_cn), f32(x), batch_sizes, f32(h0),
                                       f32(c0), f32(w_ih), f32(w_hh), f32(out), f32(gates), f32(cs), reverse, n.dx,
                                       n.dw_ih, n.dw_hh));
  const Steps s(batch_sizes, reverse);
  const Tensor go = f32(grad_out), c0l = f32(c0), whl = f32(w_hh), gl = f32(gates), csl = f32(cs);
  Tensor dgates = pooled_empty(gl.sizes(), gl.options());
  Tensor dh = f32(grad_hn).clone();
  Tensor dc = f32(grad_cn).clone();
  AT_DISPATCH_FLOATING_TYPES(gl.scalar_type(), "seqfast::lstm_layer_backward",
                             [&] {
    const int nt = fused_threads<scalar_t>(s, c0.size(1), 4);
    const bool small =
        std::is_same_v<scalar_t, float> && sgemm::available() && s.T > 0 && s.bs[0] <= 2 && cpu::config().fused;
    const int small_nt = small ? small_step_threads(c0.size(1)) : 0;
    lstm_bwd<scalar_t>(s, nt, small_nt, go, c0l, whl, gl, csl, dgates, dh, dc);
  });
  const Tensor dg = layer_dtype(dgates, x);
  Tensor dw_hh = n.dw_hh ? products(dg.t(), gather_prev(s, out, h0)) : Tensor();
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> r{
      n.dx ? products(dg, w_ih) : Tensor(), dh, dc, n.dw_ih ? products(dg.t(), x) : Tensor(), dw_hh, dgates.sum(0)};
  return bf ? to_bf16(std::move(r)) : r;
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_forward_impl(const Tensor& x, const Steps& s, const Tensor& h0,
                                                          const Tensor& w_ih, const Tensor& w_hh,
                                                          const OptTensor& b_ih, const OptTensor& b_hh) {
  kern::check_cpu();
  const int64_t H = h0.size(1);
  const bool bf = x.scalar_type() == at::kBFloat16;
  const auto fopt = x.options().dtype(bf ? at::kFloat : x.scalar_type());
  Tensor out = at::empty({x.size(0), H}, fopt);
  Tensor ws = pooled_empty({x.size(0), 4 * H}, fopt);
  if (bf) {
    if (const int nt = bf16_step_threads(s, H, 3); nt > 0) {
      // [b_ir + b_hr, b_iz + b_hz, b_in, b_hn] in float32 (step_bf16::StepArgs::bias)
      Tensor bias = at::zeros({4 * H}, fopt), none;
      if (has(b_ih)) bias.narrow(0, 0, 3 * H).add_(b_ih->to(at::kFloat));
      if (has(b_hh)) {
        bias.narrow(0, 0, 2 * H).add_(b_hh->narrow(0, 0, 2 * H).to(at::kFloat));
        bias.narrow(0, 3 * H, H).copy_(b_hh->narrow(0, 2 * H, H));
      }
      const Tensor h0c = h0.contiguous();
      Tensor outb = at::empty({x.size(0), H}, x.options());
      fwd_fused_bf16<Bf16Cell::kGru>(s, nt, x.contiguous(), h0c, none, w_ih.contiguous(), w_hh.contiguous(), bias,
                                     false, ws, outb, none);
      return {outb, gather_last(s, outb, h0c), ws};
    }
    Tensor gi = proj_bf16(x, w_ih, has(b_ih) ? b_ih->to(at::kFloat) : Tensor());
    Tensor bhh = has(b_hh) ? b_hh->to(at::kFloat) : Tensor();
    const LowP lp{at::empty({x.size(0), H}, x.options()), h0, w_hh};
    Tensor h0f = h0.to(at::kFloat);
    gru_fwd<float>(s, 0, h0f, w_hh.to(at::kFloat), bhh.defined() ? bhh.const_data_ptr<float>() : nullptr, gi, out,
                        ws, &lp);
    return {lp.out, gather_last(s, out, h0f).to(at::kBFloat16), ws};
  }
  Tensor gi = input_proj(x, w_ih, has(b_ih) ? &*b_ih : nullptr);  // [N, 3H]
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::gru_layer_forward", [&] {
    gru_fwd<scalar_t>(s, fused_threads<scalar_t>(s, H, 3), h0, w_hh, kern::opt_ptr<scalar_t>(b_hh), gi, out, ws,
                      nullptr);
  });
  return {out, gather_last(s, out, h0), ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_backward_impl(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& x, const Tensor& batch_sizes, const Tensor& h0,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& out, const Tensor& ws, bool reverse,
    const LayerNeeds& n) {
  kern::check_cpu();
  const bool bf = x.scalar_type() == at::kBFloat16;
  if (bf && !bf16_products())
    return to_bf16(gru_layer_backward(f32(grad_out), f32(grad_hn), f32(x), batch_sizes, f32(h0), f32(w_ih),
                                      f32(w_hh), f32(out), f32(ws), reverse, n.dx, n.dw_ih, n.dw_hh));
  const Steps s(batch_sizes, reverse);
  const int64_t N = x.size(0), H = h0.size(1);
  const Tensor go = f32(grad_out), h0l = f32(h0), whl = f32(w_hh), outl = f32(out), wsl = f32(ws);
  Tensor dgi = pooled_empty({N, 3 * H}, go.options());
  Tensor dgh = pooled_empty({N, 3 * H}, go.options());
  Tensor dh = f32(grad_hn).clone();
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "seqfast::gru_layer_backward",
                             [&] {
    gru_bwd<scalar_t>(s, fused_threads<scalar_t>(s, H, 3), go, h0l, whl, outl, wsl, dgi, dgh, dh);
  });
  const Tensor dgil = layer_dtype(dgi, x), dghl = layer_dtype(dgh, x);
  Tensor dw_hh = n.dw_hh ? products(dghl.t(), gather_prev(s, out, h0)) : Tensor();
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> r{
      n.dx ? products(dgil, w_ih) : Tensor(), dh, n.dw_ih ? products(dgil.t(), x) : Tensor(), dw_hh, dgi.sum(0),
      dgh.sum(0)};
  return bf ? to_bf16(std::move(r)) : r;
}

std::tuple<Tensor, Tensor> rnn_layer_forward_impl(const Tensor& x, const Steps& s, const Tensor& h0,
                                                  const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                  const OptTensor& b_hh, bool relu) {
  kern::check_cpu();
  if (x.scalar_type() == at::kBFloat16) {
    const int64_t H = h0.size(1);
    if (const int nt = bf16_step_threads(s, H, 1); nt > 0) {
      const Tensor bias = summed_bias(b_ih, b_hh, at::kFloat), h0c = h0.contiguous();
      Tensor outb = at::empty({x.size(0), H}, x.options()), none;
      fwd_fused_bf16<Bf16Cell::kRnn>(s, nt, x.contiguous(), h0c, none, w_ih.contiguous(), w_hh.contiguous(), bias,
                                     relu, none, outb, none);
      return {outb, gather_last(s, outb, h0c)};
    }
    Tensor out = proj_bf16(x, w_ih, has(b_ih) ? b_ih->to(at::kFloat) : Tensor());  // fp32 [N,H]
    Tensor bhh = has(b_hh) ? b_hh->to(at::kFloat) : Tensor();
    const LowP lp{at::empty({x.size(0), h0.size(1)}, x.options()), h0, w_hh};
    Tensor h0f = h0.to(at::kFloat);
    rnn_fwd<float>(s, 0, h0f, w_hh.to(at::kFloat), bhh.defined() ? bhh.const_data_ptr<float>() : nullptr, relu,
                   out, &lp);
    return {lp.out, gather_last(s, out, h0f).to(at::kBFloat16)};
  }
  Tensor out = input_proj(x, w_ih, has(b_ih) ? &*b_ih : nullptr);  // [N, H], activated in place
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqfast::rnn_layer_forward", [&] {
    rnn_fwd<scalar_t>(s, fused_threads<scalar_t>(s, h0.size(1), 1), h0, w_hh, kern::opt_ptr<scalar_t>(b_hh), relu,
                      out, nullptr);
  });
  return {out, gather_last(s, out, h0)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_layer_backward_impl(const Tensor& grad_out, const Tensor& grad_hn,
                                                                      const Tensor& x, const Tensor& batch_sizes,
                                                                      const Tensor& h0, const Tensor& w_ih,
                                                                      const Tensor& w_hh, const Tensor& out,
                                                                      bool relu, bool reverse, const LayerNeeds& n) {
  kern::check_cpu();
  const bool bf = x.scalar_type() == at::kBFloat16;
  if (bf && !bf16_products())
    return to_bf16(rnn_layer_backward(f32(grad_out), f32(grad_hn), f32(x), batch_sizes, f32(h0), f32(w_ih),
                                      f32(w_hh), f32(out), relu, reverse, n.dx, n.dw_ih, n.dw_hh));
  const Steps s(batch_sizes, reverse);
  const Tensor go = f32(grad_out), whl = f32(w_hh), outl = f32(out);
  Tensor dpre = pooled_empty(outl.sizes(), outl.options());
  Tensor dh = f32(grad_hn).clone();
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "seqfast::rnn_layer_backward",
                             [&] { rnn_bwd<scalar_t>(s, go, whl, outl, relu, dpre, dh); });
  const Tensor dp = layer_dtype(dpre, x);
  Tensor dw_hh = n.dw_hh ? products(dp.t(), gather_prev(s, out, h0)) : Tensor();
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> r{n.dx ? products(dp, w_ih) : Tensor(), dh,
                                                       n.dw_ih ? products(dp.t(), x) : Tensor(), dw_hh, dpre.sum(0)};
  return bf ? to_bf16(std::move(r)) : r;
}

}  // namespace

// ---- checked entries (rnn_args.h): shapes, dtypes, batch sizes, contiguity, then the kernel ----
namespace {
using rnn_args::kAny;
using rnn_args::need;
using rnn_args::need_opt;

// The arguments every layer entry shares, checked: x [N, I], h0 [B, H], W_ih [G H, I], W_hh [G H, H], and either
// batch sizes (a packed input) or a step count (a padded input: every step B rows).
struct LayerArgs {
  Tensor x, bs, h0, w_ih, w_hh;
  int64_t N, I, B, H, T = 0;
  at::ScalarType dt;
  LayerArgs(const char* fn, const Tensor& x_, const Tensor& bs_, const Tensor& h0_, const Tensor& w_ih_,
            const Tensor& w_hh_, int64_t G) {
    common(fn, x_, h0_, w_ih_, w_hh_, G);
    bs = rnn_args::need_batch_sizes(fn, bs_, B, N);
  }
  LayerArgs(const char* fn, const Tensor& x_, int64_t steps, const Tensor& h0_, const Tensor& w_ih_,
            const Tensor& w_hh_, int64_t G) : T(steps) {
    common(fn, x_, h0_, w_ih_, w_hh_, G);
    TORCH_CHECK(T >= 0 && N == T * B, fn, ": input has ", N, " rows, not ", T, " steps of ", B);
  }
  Steps steps(bool reverse) const { return bs.defined() ? Steps(bs, reverse) : Steps(T, B, reverse); }

 private:
  void common(const char* fn, const Tensor& x_, const Tensor& h0_, const Tensor& w_ih_, const Tensor& w_hh_,
              int64_t G) {
    x = need(fn, "input", x_, {kAny, kAny}, at::ScalarType::Undefined);
    dt = x.scalar_type();
    N = x.size(0);
    I = x.size(1);
    h0 = need(fn, "hx", h0_, {kAny, kAny}, dt);
    B = h0.size(0);
    H = h0.size(1);
    w_ih = need(fn, "weight_ih", w_ih_, {G * H, I}, dt);
    w_hh = need(fn, "weight_hh", w_hh_, {G * H, H}, dt);
  }
};

// The LSTM forward entries: the same checks, then the forward saving the gates or not.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_checked(const char* fn, const LayerArgs& a,
                                                                        const Tensor& c0, const OptTensor& b_ih,
                                                                        const OptTensor& b_hh, bool reverse,
                                                                        bool save) {
  return lstm_forward_impl(a.x, a.steps(reverse), a.h0, need(fn, "cx", c0, {a.B, a.H}, a.dt), a.w_ih, a.w_hh,
                           need_opt(fn, "bias_ih", b_ih, 4 * a.H, a.dt), need_opt(fn, "bias_hh", b_hh, 4 * a.H, a.dt),
                           save);
}

// The GRU and Elman forward entries, packed or padded: the same checks, then the forward.
std::tuple<Tensor, Tensor, Tensor> gru_forward_checked(const char* fn, const LayerArgs& a, const OptTensor& b_ih,
                                                       const OptTensor& b_hh, bool reverse) {
  return gru_layer_forward_impl(a.x, a.steps(reverse), a.h0, a.w_ih, a.w_hh,
                                need_opt(fn, "bias_ih", b_ih, 3 * a.H, a.dt),
                                need_opt(fn, "bias_hh", b_hh, 3 * a.H, a.dt));
}

std::tuple<Tensor, Tensor> rnn_forward_checked(const char* fn, const LayerArgs& a, const OptTensor& b_ih,
                                               const OptTensor& b_hh, bool relu, bool reverse) {
  return rnn_layer_forward_impl(a.x, a.steps(reverse), a.h0, a.w_ih, a.w_hh, need_opt(fn, "bias_ih", b_ih, a.H, a.dt),
                                need_opt(fn, "bias_hh", b_hh, a.H, a.dt), relu);
}
}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward(const Tensor& x, const Tensor& batch_sizes,
                                                                      const Tensor& h0, const Tensor& c0,
                                                                      const Tensor& w_ih, const Tensor& w_hh,
                                                                      const OptTensor& b_ih, const OptTensor& b_hh,
                                                                      bool reverse) {
  const char* fn = "lstm_layer_forward";
  return lstm_forward_checked(fn, LayerArgs(fn, x, batch_sizes, h0, w_ih, w_hh, 4), c0, b_ih, b_hh, reverse, true);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_inference(const Tensor& x, const Tensor& batch_sizes,
                                                                        const Tensor& h0, const Tensor& c0,
                                                                        const Tensor& w_ih, const Tensor& w_hh,
                                                                        const OptTensor& b_ih, const OptTensor& b_hh,
                                                                        bool reverse) {
  const char* fn = "lstm_layer_inference";
  return lstm_forward_checked(fn, LayerArgs(fn, x, batch_sizes, h0, w_ih, w_hh, 4), c0, b_ih, b_hh, reverse, false);
}

std::tuple<Tensor, Tensor, Tensor> lstm_layer_padded_inference(const Tensor& x, int64_t steps, const Tensor& h0,
                                                               const Tensor& c0, const Tensor& w_ih,
                                                               const Tensor& w_hh, const OptTensor& b_ih,
                                                               const OptTensor& b_hh, bool reverse) {
  const char* fn = "lstm_layer_padded_inference";
  auto r = lstm_forward_checked(fn, LayerArgs(fn, x, steps, h0, w_ih, w_hh, 4), c0, b_ih, b_hh, reverse, false);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn, const Tensor& x, const Tensor& batch_sizes,
    const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& out,
    const Tensor& gates, const Tensor& cs, bool reverse, bool need_dx, bool need_dw_ih, bool need_dw_hh) {
  const char* fn = "lstm_layer_backward";
  const LayerArgs a(fn, x, batch_sizes, h0, w_ih, w_hh, 4);
  const auto ws = at::ScalarType::Undefined;  // workspaces: float32 for a bfloat16 input
  return lstm_layer_backward_impl(
      need(fn, "grad_out", grad_out, {a.N, a.H}, a.dt), need(fn, "grad_hn", grad_hn, {a.B, a.H}, a.dt),
      need(fn, "grad_cn", grad_cn, {a.B, a.H}, a.dt), a.x, a.bs, a.h0, need(fn, "cx", c0, {a.B, a.H}, a.dt), a.w_ih,
      a.w_hh, need(fn, "out", out, {a.N, a.H}, a.dt), need(fn, "gates", gates, {a.N, 4 * a.H}, ws),
      need(fn, "cs", cs, {a.N, a.H}, ws), reverse, LayerNeeds{need_dx, need_dw_ih, need_dw_hh});
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_forward(const Tensor& x, const Tensor& batch_sizes, const Tensor& h0,
                                                     const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                     const OptTensor& b_hh, bool reverse) {
  const char* fn = "gru_layer_forward";
  return gru_forward_checked(fn, LayerArgs(fn, x, batch_sizes, h0, w_ih, w_hh, 3), b_ih, b_hh, reverse);
}

std::tuple<Tensor, Tensor> gru_layer_padded_forward(const Tensor& x, int64_t steps, const Tensor& h0,
                                                    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                    const OptTensor& b_hh, bool reverse) {
  const char* fn = "gru_layer_padded_forward";
  auto r = gru_forward_checked(fn, LayerArgs(fn, x, steps, h0, w_ih, w_hh, 3), b_ih, b_hh, reverse);
  return {std::get<0>(r), std::get<1>(r)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_layer_backward(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& x, const Tensor& batch_sizes, const Tensor& h0,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& out, const Tensor& ws, bool reverse, bool need_dx,
    bool need_dw_ih, bool need_dw_hh) {
  const char* fn = "gru_layer_backward";
  const LayerArgs a(fn, x, batch_sizes, h0, w_ih, w_hh, 3);
  return gru_layer_backward_impl(need(fn, "grad_out", grad_out, {a.N, a.H}, a.dt),
                                 need(fn, "grad_hn", grad_hn, {a.B, a.H}, a.dt), a.x, a.bs, a.h0, a.w_ih, a.w_hh,
                                 need(fn, "out", out, {a.N, a.H}, a.dt),
                                 need(fn, "ws", ws, {a.N, 4 * a.H}, at::ScalarType::Undefined), reverse,
                                 LayerNeeds{need_dx, need_dw_ih, need_dw_hh});
}

std::tuple<Tensor, Tensor> rnn_layer_forward(const Tensor& x, const Tensor& batch_sizes, const Tensor& h0,
                                             const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                             const OptTensor& b_hh, bool relu, bool reverse) {
  const char* fn = "rnn_layer_forward";
  return rnn_forward_checked(fn, LayerArgs(fn, x, batch_sizes, h0, w_ih, w_hh, 1), b_ih, b_hh, relu, reverse);
}

std::tuple<Tensor, Tensor> rnn_layer_padded_forward(const Tensor& x, int64_t steps, const Tensor& h0,
                                                    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                    const OptTensor& b_hh, bool relu, bool reverse) {
  const char* fn = "rnn_layer_padded_forward";
  return rnn_forward_checked(fn, LayerArgs(fn, x, steps, h0, w_ih, w_hh, 1), b_ih, b_hh, relu, reverse);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_layer_backward(const Tensor& grad_out, const Tensor& grad_hn,
                                                                      const Tensor& x, const Tensor& batch_sizes,
                                                                      const Tensor& h0, const Tensor& w_ih,
                                                                      const Tensor& w_hh, const Tensor& out,
                                                                      bool relu, bool reverse, bool need_dx,
                                                                      bool need_dw_ih, bool need_dw_hh) {
  const char* fn = "rnn_layer_backward";
  const LayerArgs a(fn, x, batch_sizes, h0, w_ih, w_hh, 1);
  return rnn_layer_backward_impl(need(fn, "grad_out", grad_out, {a.N, a.H}, a.dt),
                                 need(fn, "grad_hn", grad_hn, {a.B, a.H}, a.dt), a.x, a.bs, a.h0, a.w_ih, a.w_hh,
                                 need(fn, "out", out, {a.N, a.H}, a.dt), relu, reverse,
                                 LayerNeeds{need_dx, need_dw_ih, need_dw_hh});
}

}  // namespace seqfast
