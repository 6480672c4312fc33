#pragma once
// Fused per-row gate math (forward + backward) for LSTM, GRU and Elman RNN, plus a small-batch GEMV that
// computes gate pre-activations without going through MKL. Shared by rnn_cell.cpp and rnn_sequence.cpp.
// Everything here works on raw pointers: shapes, dtypes and strides were checked by the caller.
//
// ISA (cpu/isa.h): this header's kernels are an AVX2 region. The extension is built for the baseline ISA, where
// ATen's Vectorized is its scalar "generic" implementation; here the region's target pragma enables AVX2+FMA and
// ATen's vector classes go into a private inline namespace (CPU_CAPABILITY), so none of these AVX2 instantiations
// can be merged with default-ISA copies of the same inline functions elsewhere. The kernels' public entries check
// kern::check_cpu() (cpu::has_avx2_fma()) before calling in.
#include <ATen/ATen.h>
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <new>

#include "cpu/config.h"
#include "cpu/gemm.h"
#include "cpu/gemv_avx512.h"
#include "cpu/pointwise_avx512.h"
#include "cpu/isa.h"
#include "cpu/team.h"

#if defined(SEQFAST_X86_TARGETS) && !defined(CPU_CAPABILITY) && !defined(__AVX2__)
#define SEQFAST_TARGET_AVX2 1
SEQFAST_TARGET_AVX2_BEGIN
#define CPU_CAPABILITY seqfast_avx2
#define CPU_CAPABILITY_AVX2
// sleef.h (pulled in by vec256) declares its 256-bit entry points only under __AVX__; the pragma enables the ISA
// but not the macros, so define them just for these includes.
#define __AVX__ 1
#define __AVX2__ 1
#define SEQFAST_UNDEF_AVX_MACROS 1
#elif defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY seqfast_avx2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/vec.h>
#ifdef SEQFAST_UNDEF_AVX_MACROS
#undef __AVX__
#undef __AVX2__
#endif
#if defined(CPU_CAPABILITY_AVX2)
#include "cpu/avx2_reduce.h"
#endif

namespace seqfast {
namespace kern {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> ld(const T* p, int64_t n) {
  return n == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, n);
}
template <typename T>
inline void st(const Vec<T>& v, T* p, int64_t n) {
  if (n == Vec<T>::size())
    v.store(p);
  else
    v.store(p, n);
}
// Optional operand (bias may be absent): the branch is loop-invariant and well predicted.
template <typename T>
inline Vec<T> add_opt(Vec<T> v, const T* p, int64_t k, int64_t n) {
  return p ? v + ld(p + k, n) : v;
}
template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  // exp_u20 is ATen's inline polynomial exp (float); for double it is the Sleef u10 exp. Overflow of exp(-x) to
  // +inf gives exactly 0, as torch does.
  return one / (one + x.neg().exp_u20());
}

// tanh. float: (1 - e^-2|x|) / (1 + e^-2|x|) with the sign put back, on ATen's inline exp_u20 polynomial — about
// 3x cheaper than the Sleef u10 tanh call and within ~1e-7 absolute (fine for fp32 parity). double: Sleef tanh.
template <typename T>
inline Vec<T> tanh_(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    const Vec<T> one(T(1));
    const Vec<T> a = x.abs();
    const Vec<T> e = (a * Vec<T>(T(-2))).exp_u20();
    const Vec<T> t = (one - e) / (one + e);
    return Vec<T>::blendv(t, t.neg(), x < Vec<T>(T(0)));
  } else {
    return x.tanh();
  }
}

// Calls f(k, n) over [k0, k1) in vector-width chunks; the last chunk may be partial (n < width), in which case
// ld/st above do masked-by-copy loads/stores, so nothing outside [k0, k1) is read or written.
template <typename T, typename F>
inline void vloop(int64_t k0, int64_t k1, F&& f) {
  constexpr int64_t V = Vec<T>::size();
  int64_t k = k0;
  for (; k + V <= k1; k += V) f(k, V);
  if (k < k1) f(k, k1 - k);
}

// ---------------------------------------------------------------------------------------------------------------
// LSTM. g: one row of pre-activations [i f g o] (4H), overwritten with the activated gates (kept for backward).
// b1/b2: optional biases added here (cell path; the sequence path folds them into the input GEMM).
template <typename T>
inline void lstm_fwd_row(T* g, const T* b1, const T* b2, const T* cp, T* cy, T* hy, int64_t H, int64_t k0,
                         int64_t k1) {
  if constexpr (std::is_same_v<T, float>)
    if (pointwise512::available()) return pointwise512::lstm_fwd_row(g, b1, b2, cp, cy, hy, H, k0, k1);
  vloop<T>(k0, k1, [&](int64_t k, int64_t n) {
    Vec<T> pi = ld(g + k, n), pf = ld(g + H + k, n), pg = ld(g + 2 * H + k, n), po = ld(g + 3 * H + k, n);
    if (b1) {
      pi += ld(b1 + k, n); pf += ld(b1 + H + k, n); pg += ld(b1 + 2 * H + k, n); po += ld(b1 + 3 * H + k, n);
    }
    if (b2) {
      pi += ld(b2 + k, n); pf += ld(b2 + H + k, n); pg += ld(b2 + 2 * H + k, n); po += ld(b2 + 3 * H + k, n);
    }
    const Vec<T> i = sigmoid(pi), f = sigmoid(pf), gg = tanh_(pg), o = sigmoid(po);
    const Vec<T> c = at::vec::fmadd(f, ld(cp + k, n), i * gg);
    const Vec<T> h = o * tanh_(c);
    st(i, g + k, n); st(f, g + H + k, n); st(gg, g + 2 * H + k, n); st(o, g + 3 * H + k, n);
    st(c, cy + k, n);
    st(h, hy + k, n);
  });
}

// g: activated gates; cp: previous cell; cy: this step's cell; dh = dh1 + dh2 (dh2 optional: the sequence passes
// the running recurrent grad and grad_out separately to avoid an extra pass); dc_in: grad wrt cy.
// Writes dg (4H pre-activation grads) and dc_out = grad wrt cp. dc_out may alias dc_in (each element is read
// before it is written); dh1/dh2 must not alias dg.
template <typename T>
inline void lstm_bwd_row(const T* g, const T* cp, const T* cy, const T* dh1, const T* dh2, const T* dc_in, T* dg,
                         T* dc_out, int64_t H, int64_t k0, int64_t k1) {
  const Vec<T> one(T(1));
  vloop<T>(k0, k1, [&](int64_t k, int64_t n) {
    const Vec<T> i = ld(g + k, n), f = ld(g + H + k, n), gg = ld(g + 2 * H + k, n), o = ld(g + 3 * H + k, n);
    const Vec<T> dh = add_opt(ld(dh1 + k, n), dh2, k, n);
    const Vec<T> tc = tanh_(ld(cy + k, n));
    const Vec<T> dc = at::vec::fmadd(dh * o, one - tc * tc, ld(dc_in + k, n));
    st(dc * gg * i * (one - i), dg + k, n);
    st(dc * ld(cp + k, n) * f * (one - f), dg + H + k, n);
    st(dc * i * (one - gg * gg), dg + 2 * H + k, n);
    st(dh * tc * o * (one - o), dg + 3 * H + k, n);
    st(dc * f, dc_out + k, n);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// GRU. gi: x-part pre-activations [r z n] (3H), gh: h-part W_hh h (3H); optional biases. ws row (4H) receives
// [r, z, n, hn] with hn = W_hn h + b_hn, which is all backward needs besides h_prev (ws nullptr: not stored, for a
// step no backward reads).
// summed_rz: gi's r and z already hold x W_ir^T + h W_hr^T (and z's), gh's r and z slots are not read.
template <typename T, bool summed_rz = false>
inline void gru_fwd_row(const T* gi, const T* bih, const T* gh, const T* bhh, const T* hp, T* hy, T* ws, int64_t H,
                        int64_t k0, int64_t k1) {
  if constexpr (std::is_same_v<T, float>)
    if (pointwise512::available())
      return pointwise512::gru_fwd_row(gi, bih, gh, bhh, hp, hy, ws, H, k0, k1, summed_rz);
  vloop<T>(k0, k1, [&](int64_t k, int64_t n) {
    Vec<T> pr = ld(gi + k, n);
    Vec<T> pz = ld(gi + H + k, n);
    if constexpr (!summed_rz) {
      pr += ld(gh + k, n);
      pz += ld(gh + H + k, n);
    }
    Vec<T> pn = ld(gi + 2 * H + k, n);
    Vec<T> hn = ld(gh + 2 * H + k, n);
    if (bih) {
      pr += ld(bih + k, n); pz += ld(bih + H + k, n); pn += ld(bih + 2 * H + k, n);
    }
    if (bhh) {
      pr += ld(bhh + k, n); pz += ld(bhh + H + k, n); hn += ld(bhh + 2 * H + k, n);
    }
    const Vec<T> r = sigmoid(pr), z = sigmoid(pz);
    const Vec<T> nn = tanh_(at::vec::fmadd(r, hn, pn));
    const Vec<T> h = at::vec::fmadd(z, ld(hp + k, n) - nn, nn);  // (1-z) n + z h
    if (ws) {
      st(r, ws + k, n); st(z, ws + H + k, n); st(nn, ws + 2 * H + k, n); st(hn, ws + 3 * H + k, n);
    }
    st(h, hy + k, n);
  });
}

// dh = dh1 + dh2 (dh2 optional). Writes dgi (grad of x-part pre-activations incl. b_ih, 3H), dgh (grad of
// W_hh h + b_hh, 3H) and dhp = the direct part of grad wrt h_prev (dh * z); dhp may alias dh1.
template <typename T>
inline void gru_bwd_row(const T* dh1, const T* dh2, const T* hp, const T* ws, T* dgi, T* dgh, T* dhp, int64_t H,
                        int64_t k0, int64_t k1) {
  const Vec<T> one(T(1));
  vloop<T>(k0, k1, [&](int64_t k, int64_t n) {
    const Vec<T> r = ld(ws + k, n), z = ld(ws + H + k, n), nn = ld(ws + 2 * H + k, n), hn = ld(ws + 3 * H + k, n);
    const Vec<T> dh = add_opt(ld(dh1 + k, n), dh2, k, n);
    const Vec<T> dnp = dh * (one - z) * (one - nn * nn);
    const Vec<T> dzp = dh * (ld(hp + k, n) - nn) * z * (one - z);
    const Vec<T> drp = dnp * hn * r * (one - r);
    st(drp, dgi + k, n); st(dzp, dgi + H + k, n); st(dnp, dgi + 2 * H + k, n);
    st(drp, dgh + k, n); st(dzp, dgh + H + k, n); st(dnp * r, dgh + 2 * H + k, n);
    st(dh * z, dhp + k, n);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Elman RNN. pre -> hy (may alias), optional biases.
template <typename T>
inline void rnn_fwd_row(const T* pre, const T* b1, const T* b2, T* hy, bool relu, int64_t k0, int64_t k1) {
  if constexpr (std::is_same_v<T, float>)
    if (pointwise512::available()) return pointwise512::rnn_fwd_row(pre, b1, b2, hy, relu, k0, k1);
  const Vec<T> zero(T(0));
  vloop<T>(k0, k1, [&](int64_t k, int64_t n) {
    Vec<T> p = add_opt(add_opt(ld(pre + k, n), b1, k, n), b2, k, n);
    st(relu ? at::vec::maximum(p, zero) : tanh_(p), hy + k, n);
  });
}
// dpre = (dh1 + dh2) * act'(.) expressed through the output hy.
template <typename T>
inline void rnn_bwd_row(const T* dh1, const T* dh2, const T* hy, T* dpre, bool relu, int64_t k0, int64_t k1) {
  const Vec<T> zero(T(0)), one(T(1));
  vloop<T>(k0, k1, [&](int64_t k, int64_t n) {
    const Vec<T> dh = add_opt(ld(dh1 + k, n), dh2, k, n);
    const Vec<T> y = ld(hy + k, n);
    st(relu ? Vec<T>::blendv(zero, dh, y > zero) : dh * (one - y * y), dpre + k, n);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Small-batch GEMM against row-major weights, "dot product" form:
//   y[b][j] (= or +=) sum_k x1[b][k] * w1[j*K1 + k] + sum_k x2[b][k] * w2[j*K2 + k]   for j in [j0, j1), b < nb
// x1/x2/y are per-batch-row pointers (rows of one step may come from different buffers: h0 vs previous output).
// w2 may be null (single matrix). For batch <= ~8 this beats MKL's per-call overhead by a wide margin; each
// weight vector is loaded once per group of NB batch rows and feeds NB*NR independent FMA chains.
template <typename T>
inline T hsum(const Vec<T>& v) {
  __at_align__ T tmp[Vec<T>::size()];
  v.store(tmp);
  T s = T(0);
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += tmp[i];
  return s;
}

// Accumulators constructed from the first products (dot_first), never zeroed: ATen's Vectorized() zeroes its value,
// and a zeroed accumulator array compiled to a `rep stos` of the whole array per call (the array lives in memory
// between the inlined loops), a fifth of an LSTM B1 H64 step's GEMV time on a Zen 3.
template <typename T, int NB, int NR>
struct Accumulators {
  alignas(64) unsigned char raw[sizeof(Vec<T>) * NR * NB];
  Vec<T> (&get())[NR][NB] { return *reinterpret_cast<Vec<T>(*)[NR][NB]>(raw); }
};

// Constructs acc[r][b] from the products of the first min(K, V) k (K >= 0).
template <typename T, int NB, int NR>
inline void dot_first(const T* const* x, const T* w, int64_t K, Vec<T> (&acc)[NR][NB]) {
  if (K < Vec<T>::size()) {  // the partial loads (zero-filled copies) only here, out of the common path
    for (int r = 0; r < NR; ++r)
      for (int b = 0; b < NB; ++b) new (&acc[r][b]) Vec<T>(Vec<T>::loadu(w + r * K, K) * Vec<T>::loadu(x[b], K));
    return;
  }
  Vec<T> xv[NB];
  for (int b = 0; b < NB; ++b) xv[b] = Vec<T>::loadu(x[b]);
  for (int r = 0; r < NR; ++r) {
    const Vec<T> wv = Vec<T>::loadu(w + r * K);
    for (int b = 0; b < NB; ++b) new (&acc[r][b]) Vec<T>(wv * xv[b]);
  }
}

// acc[r][b] += the products of k in [k, K).
template <typename T, int NB, int NR>
inline void dot_block(const T* const* x, const T* w, int64_t K, Vec<T> (&acc)[NR][NB], int64_t k = 0) {
  constexpr int64_t V = Vec<T>::size();
  for (; k + V <= K; k += V) {
    Vec<T> xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = Vec<T>::loadu(x[b] + k);
    for (int r = 0; r < NR; ++r) {
      const Vec<T> wv = Vec<T>::loadu(w + r * K + k);
      for (int b = 0; b < NB; ++b) acc[r][b] = at::vec::fmadd(wv, xv[b], acc[r][b]);
    }
  }
  if (k < K) {
    const int64_t n = K - k;
    Vec<T> xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = Vec<T>::loadu(x[b] + k, n);
    for (int r = 0; r < NR; ++r) {
      const Vec<T> wv = Vec<T>::loadu(w + r * K + k, n);
      for (int b = 0; b < NB; ++b) acc[r][b] = at::vec::fmadd(wv, xv[b], acc[r][b]);
    }
  }
}

// Writes the horizontal sums of acc[0..NR)[b] to y[b][j..j+NR). The float/AVX2/NR==8 case reduces eight
// accumulators at once with a hadd tree (one 8-wide store instead of eight scalar reductions): with small K the
// reductions otherwise cost as much as the FMAs.
template <typename T, int NB, int NR>
inline void store_sums(Vec<T> (&acc)[NR][NB], T* const* y, int64_t j, bool accumulate) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float> && NR == 8) {
    for (int b = 0; b < NB; ++b) {
      __m256 s = avx2::reduce8(acc[0][b], acc[1][b], acc[2][b], acc[3][b], acc[4][b], acc[5][b], acc[6][b], acc[7][b]);
      if (accumulate) s = _mm256_add_ps(s, _mm256_loadu_ps(y[b] + j));
      _mm256_storeu_ps(y[b] + j, s);
    }
    return;
  }
#endif
  for (int r = 0; r < NR; ++r)
    for (int b = 0; b < NB; ++b) {
      const T s = hsum(acc[r][b]);
      y[b][j + r] = accumulate ? y[b][j + r] + s : s;
    }
}

template <typename T, int NB, int NR>
inline void gemv_rows_nr(const T* const* x1, const T* w1, int64_t K1, const T* const* x2, const T* w2, int64_t K2,
                         T* const* y, int64_t j, bool accumulate) {
  Accumulators<T, NB, NR> storage;
  Vec<T>(&acc)[NR][NB] = storage.get();
  dot_first<T, NB, NR>(x1, w1 + j * K1, K1, acc);
  dot_block<T, NB, NR>(x1, w1 + j * K1, K1, acc, std::min<int64_t>(K1, Vec<T>::size()));
  if (w2) dot_block<T, NB, NR>(x2, w2 + j * K2, K2, acc);
  store_sums<T, NB, NR>(acc, y, j, accumulate);
}

template <typename T, int NB>
inline void gemv_nb(const T* const* x1, const T* w1, int64_t K1, const T* const* x2, const T* w2, int64_t K2,
                    T* const* y, int64_t j0, int64_t j1, bool accumulate) {
  // Enough independent accumulators to hide FMA latency without spilling the 16 ymm registers.
  constexpr int NR = NB == 1 ? 8 : (NB == 2 ? 4 : 2);
  int64_t j = j0;
  for (; j + NR <= j1; j += NR) gemv_rows_nr<T, NB, NR>(x1, w1, K1, x2, w2, K2, y, j, accumulate);
  for (; j < j1; ++j) gemv_rows_nr<T, NB, 1>(x1, w1, K1, x2, w2, K2, y, j, accumulate);
}

template <typename T>
inline void gemv(int64_t nb, const T* const* x1, const T* w1, int64_t K1, const T* const* x2, const T* w2, int64_t K2,
                 T* const* y, int64_t j0, int64_t j1, bool accumulate) {
  if constexpr (std::is_same_v<T, float>)
    if (gemv512::available()) return gemv512::gemv(nb, x1, w1, K1, x2, w2, K2, y, j0, j1, accumulate);
  for (int64_t b0 = 0; b0 < nb; b0 += 4) {
    const int64_t m = std::min<int64_t>(4, nb - b0);
    const T* const* xx2 = w2 ? x2 + b0 : nullptr;
    switch (m) {
      case 1: gemv_nb<T, 1>(x1 + b0, w1, K1, xx2, w2, K2, y + b0, j0, j1, accumulate); break;
      case 2: gemv_nb<T, 2>(x1 + b0, w1, K1, xx2, w2, K2, y + b0, j0, j1, accumulate); break;
      case 3: gemv_nb<T, 3>(x1 + b0, w1, K1, xx2, w2, K2, y + b0, j0, j1, accumulate); break;
      default: gemv_nb<T, 4>(x1 + b0, w1, K1, xx2, w2, K2, y + b0, j0, j1, accumulate); break;
    }
  }
}

}  // namespace kern
}  // namespace seqfast

#ifdef SEQFAST_TARGET_AVX2
SEQFAST_TARGET_END
#endif

namespace seqfast {
namespace kern {

// Compiled for the default ISA on purpose: this is what guards entry into the AVX2 code above.
inline bool cpu_supported() {
#ifdef SEQFAST_TARGET_AVX2
  return cpu::has_avx2_fma();
#else
  return true;
#endif
}

// Work (multiply-adds) below which a parallel region costs more than it saves (config().par_min_work).
inline int64_t par_min_work() { return cpu::config().par_min_work; }

// Largest number of active batch rows for which the hand-written GEMV is used instead of a GEMM: config().small_batch,
// or where the own AVX2 GEMM takes the step's products (gemm::nt_available) and no size was given, 2. From 3 rows its
// 3x4 tiles beat the GEMV's 4-row passes (same process, Zen 3, T32 sequences: LSTM B4 H128 1.39x -> 1.62x torch,
// B8 H128 1.18x -> 1.44x, GRU B8 H256 1.95x -> 2.15x, GRU B8 H64 3.11x -> 3.62x; cells within noise).
inline int64_t small_batch_max() {
  const cpu::Config& c = cpu::config();
  return !c.small_batch_set && gemm::nt_available() ? std::min<int64_t>(c.small_batch, 2) : c.small_batch;
}

// Runs f(k0, k1) over hidden units [0, H), split across threads in blocks of 16 units (whole vectors) when the
// total work is large enough; otherwise inline on the calling thread.
template <typename F>
inline void par_units(int64_t H, int64_t work, const F& f) {
  if (H <= 0) return;
  if (work < par_min_work()) {
    f(int64_t(0), H);
    return;
  }
  const int64_t nblk = (H + 15) / 16;
  // shared pieces (cpu::parallel_for_shared): the step ends with the team, not with its slowest thread. Every block
  // is its own grain, as before (par_min_work is met by the whole step).
  cpu::parallel_for_shared(nblk, std::max<int64_t>(cpu::config().par_min_work, work / nblk), 1,
                           [&](int64_t a, int64_t b) { f(a * 16, std::min(H, b * 16)); });
}

// Same for batch rows [0, n) each costing work_per_row.
template <typename F>
inline void par_rows(int64_t n, int64_t work_per_row, const F& f) {
  if (n <= 0) return;
  const int64_t grain = std::max<int64_t>(1, par_min_work() / std::max<int64_t>(1, work_per_row));
  cpu::parallel_for(n, grain, [&](int64_t a, int64_t b, int) { f(a, b); });
}

}  // namespace kern
}  // namespace seqfast

namespace seqfast {
namespace kern {

template <typename T>
inline const T* opt_ptr(const std::optional<at::Tensor>& b) {
  return (b.has_value() && b->defined()) ? b->const_data_ptr<T>() : nullptr;
}

inline void check_cpu() {
  TORCH_CHECK(cpu_supported(), "seqfast C++ RNN kernels need a CPU with AVX2 and FMA; use the reference backend");
}

// Own GEMV handles at most this many rows per call (row-pointer arrays live on the stack).
constexpr int64_t kMaxSmallB = 16;
inline bool use_small(int64_t nb) { return nb <= std::min(small_batch_max(), kMaxSmallB); }

}  // namespace kern
}  // namespace seqfast
