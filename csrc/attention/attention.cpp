// Flash-style scaled dot-product attention on CPU: forward and backward.
//
// Shape of the work: every (batch, query head, query block) is an independent task. A task walks the key blocks,
// computes the score block S = scale * Q K^T with one GEMM (cpu/gemm.h: BLAS on raw pointers with the tensors' own
// row strides, so no copies and no per-call ATen overhead), applies bias / causal masking,
// does the online-softmax update (running max m, running sum l, rescaled accumulator), and accumulates P V with a
// second GEMM. Key blocks entirely above the causal diagonal are never visited (the speed win over torch).
// bfloat16 computes in float32 on upcast copies wherever the own float32 blocks run (bf16_upcasts), except the forward
// decoder step (one query row), which streams K and V as bfloat16 into float math (decode_kernel: half the bytes
// read). Elsewhere (no AVX2) bfloat16 runs the GEMMs below on bf16 operands with fp32 accumulation (P / dS rounded to
// bf16 as flash-attn does; softmax state fp32). float64 is exact-ish and is what the gradient tests use.
// float32 on CPUs with AVX-512 takes attention_avx512.h instead, forward and backward (register-tiled loops on
// transposed blocks, attention_avx512*.cpp); on CPUs with AVX2 and no AVX-512 kernels the float32 forward and backward
// take attention_avx2.h (the same transposed layout on the own AVX2 GEMM). Decoder steps take attention_decode_avx2.h
// on both.
// float64, bfloat16 without AVX2, and float32 backwards of fewer than 8 query rows run the BLAS path below.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cmath>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "attention/attention.h"
#include "attention/attention_avx512.h"
#include "attention/attention_decode_avx2.h"
#include "attention/attention_avx2.h"
#include "attention/attention_vec.h"
#include "cpu/block_pool.h"
#include "cpu/pool.h"
#include "cpu/config.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/team.h"

namespace seqfast {
namespace {

namespace av = attn_vec;

using gemm::mm_nn;
using gemm::mm_nt;
using gemm::mm_tn;

// float32 runs the AVX-512 block kernels (attention_avx512.h) where the CPU has them and the configuration allows.
inline bool use_avx512() { return sgemm::available() && cpu::config().avx512_attention; }

// (sdpa_bf16_upcasts, below the anonymous namespace, says why and where)
inline bool bf16_upcasts(const at::Tensor& q) { return q.scalar_type() == at::kBFloat16 && sdpa_bf16_upcasts(); }
// An uninitialised float32 tensor of t's sizes from the block pool (cpu/pool.h: the upcast route's copies and float32
// results are as large as q, k and v, and at::empty's fresh pages cost more than the conversion); widened: t copied
// into one.
inline at::Tensor float_like(const at::Tensor& t) { return pooled_empty(t.sizes(), t.options().dtype(at::kFloat), 0); }
inline at::Tensor widened(const at::Tensor& t) { return float_like(t).copy_(t); }
// The mask bias in float32, still broadcast where it was (a mask expanded over batch and heads is copied once, not
// once per head).
inline std::optional<at::Tensor> float_bias(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return std::nullopt;
  at::Tensor compact = *bias;
  for (int64_t d = 0; d < compact.dim(); ++d)
    if (compact.stride(d) == 0 && compact.size(d) > 1) compact = compact.narrow(d, 0, 1);
  return compact.to(at::kFloat).expand(bias->sizes());
}

// True when some of the n scores is NaN (a row whose finite maximum is -inf may still hold NaN, which must reach
// the output as in torch).
template <typename T>
inline bool any_nan(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] != x[i]) return true;
  return false;
}

// BLAS needs unit stride on the last dim and a row stride >= the row length; anything else (rare: transposed or
// 0-stride views) is copied once.
at::Tensor blas_ready(const at::Tensor& t) {
  const int64_t last = t.size(-1);
  if (t.stride(-1) == 1 && (t.size(-2) <= 1 || t.stride(-2) >= std::max<int64_t>(last, 1))) return t;
  return t.contiguous();
}

struct Blocks {
  int64_t bq, bk;
};

// Block sizes: the score block (bq x bk floats) plus the accumulator stay in L1/L2. Chosen by timing on a 2-core AVX-512
// box (see the report); a single query row (decoder step) takes the whole key range in larger chunks since there
// is nothing to reuse across rows and fewer online-softmax rescales is cheaper.
Blocks pick_blocks(int64_t Lq, int64_t Lk, bool causal) {
  const int64_t lk = std::max<int64_t>(Lk, 1);
  if (Lq <= 8) return {std::max<int64_t>(Lq, 1), std::min<int64_t>(lk, 1024)};
  // Single-thread sweep at L 512/1024, D 64 (bq x bk in {32,64,128,256} x {64..512}): wide key blocks amortise MKL's
  // per-call packing; causal prefers 64-row query blocks (less wasted work on the diagonal), non-causal 128.
  return {std::min<int64_t>(Lq, causal ? 64 : 128), std::min<int64_t>(lk, 256)};
}

template <typename T>
struct BiasView {
  const T* ptr = nullptr;
  int64_t sn = 0, sh = 0, si = 0, sj = 0;
  // The mask of head (n, h), or nullptr without one.
  const T* head(int64_t n, int64_t h) const { return ptr ? ptr + n * sn + h * sh : nullptr; }
};

// Pointer and strides of an optional [N, H, Lq, Lk] additive mask (any strides, 0-strides from expand() too).
template <typename T>
BiasView<T> bias_view(const at::Tensor* bias) {
  BiasView<T> bv;
  if (bias != nullptr) {
    bv.ptr = bias->const_data_ptr<T>();
    bv.sn = bias->stride(0), bv.sh = bias->stride(1), bv.si = bias->stride(2), bv.sj = bias->stride(3);
  }
  return bv;
}

// One [N, H, L, d] operand (blas_ready: unit stride along d): row l of head (n, h) at head(n, h) + l * sl.
template <typename T>
struct HeadRows {
  const T* ptr;
  int64_t sn, sh, sl, d;
  explicit HeadRows(const at::Tensor& t)
      : ptr(t.const_data_ptr<T>()), sn(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)), d(t.size(3)) {}
  const T* head(int64_t n, int64_t h) const { return ptr + n * sn + h * sh; }
};

// The inputs every kernel reads: q [N, Hq, Lq, D], k [N, Hk, Lk, D], v [N, Hk, Lk, Dv] and the optional mask.
template <typename T>
struct Inputs {
  HeadRows<T> q, k, v;
  BiasView<T> bias;
  Inputs(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor* b)
      : q(q_), k(k_), v(v_), bias(bias_view<T>(b)) {}
};

// S[r, c] += bias[i0 + r, j0 + c] (bias already offset to (n, h)); then causal mask j > i -> -inf.
template <typename scalar_t, typename acc_t>
inline void mask_block(acc_t* S, int64_t ldS, int64_t mq, int64_t nk, int64_t i0, int64_t j0, const scalar_t* bias,
                       int64_t bsi, int64_t bsj, bool causal) {
  if (bias != nullptr) {
    for (int64_t r = 0; r < mq; ++r) {
      acc_t* s = S + r * ldS;
      const scalar_t* b = bias + (i0 + r) * bsi + j0 * bsj;
      if (bsj == 1) {
        for (int64_t c = 0; c < nk; ++c) s[c] += static_cast<acc_t>(b[c]);
      } else if (bsj == 0) {
        const acc_t bb = static_cast<acc_t>(b[0]);
        for (int64_t c = 0; c < nk; ++c) s[c] += bb;
      } else {
        for (int64_t c = 0; c < nk; ++c) s[c] += static_cast<acc_t>(b[c * bsj]);
      }
    }
  }
  if (causal && j0 + nk - 1 > i0) {
    const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t r = 0; r < mq; ++r) {
      const int64_t first_masked = std::max<int64_t>(i0 + r + 1 - j0, 0);  // columns c with j0 + c > i0 + r
      acc_t* s = S + r * ldS;
      for (int64_t c = first_masked; c < nk; ++c) s[c] = ninf;
    }
  }
}

// Score block S[mq, nk] (row stride ldS) = scale Q K[j0:j0+nk]^T, plus the mask B of the head and the causal mask,
// for the query rows [i0, i0 + mq) at Q.
template <typename scalar_t, typename acc_t>
inline void score_block(acc_t* S, int64_t ldS, int64_t mq, int64_t nk, acc_t scale, const scalar_t* Q,
                        const Inputs<scalar_t>& in, const scalar_t* K, const scalar_t* B, int64_t i0, int64_t j0,
                        bool causal) {
  gemm::mm_nt<scalar_t, acc_t>(mq, nk, in.q.d, scale, Q, in.q.sl, K + j0 * in.k.sl, in.k.sl, acc_t(0), S, ldS);
  mask_block<scalar_t, acc_t>(S, ldS, mq, nk, i0, j0, B, in.bias.si, in.bias.sj, causal);
}

// A block as a GEMM operand: itself when scalar_t is the accumulation type, else rounded into buf (bfloat16, as
// flash-attn rounds P and dS).
template <typename scalar_t, typename acc_t>
inline const scalar_t* as_operand(acc_t* src, scalar_t* buf, int64_t ld, int64_t mq, int64_t nk) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t r = 0; r < mq; ++r)
      for (int64_t c = 0; c < nk; ++c) buf[r * ld + c] = static_cast<scalar_t>(src[r * ld + c]);
    return buf;
  }
}

// The AVX-512 operands of the task: query rows at q (stride sq), kv head (n, hk), keys below kv_end.
inline void set_qkv(attn512::QkvRows& a, const Inputs<float>& in, const float* q, int64_t sq, int64_t n, int64_t hk,
                    int64_t kv_end, float scale) {
  a.q = q;
  a.sq = sq;
  a.D = in.q.d;
  a.k = in.k.head(n, hk);
  a.sk = in.k.sl;
  a.v = in.v.head(n, hk);
  a.sv = in.v.sl;
  a.Dv = in.v.d;
  a.kv_end = kv_end;
  a.scale = scale;
}

// The AVX-512 query block: rows [i0, i0 + mq) of head (n, h), its kv head hk, its mask.
inline void set_block(attn512::BlockRows& a, const Inputs<float>& in, int64_t n, int64_t h, int64_t hk, int64_t i0,
                      int64_t mq, int64_t kv_end, bool causal, float scale) {
  set_qkv(a, in, in.q.head(n, h) + i0 * in.q.sl, in.q.sl, n, hk, kv_end, scale);
  a.mq = mq;
  a.i0 = i0;
  if (const float* b = in.bias.head(n, h)) {
    a.bias = b + i0 * in.bias.si;
    a.bsi = in.bias.si;
    a.bsj = in.bias.sj;
  }
  a.causal = causal;
}

// Query block of the idx-th task of a head. Causal: interleave cheap (early) and expensive (late) query blocks so
// that parallel_for's contiguous chunks carry equal work even when N*Hq is small.
inline int64_t query_block_order(int64_t idx, int64_t nqb, bool causal) {
  return causal ? ((idx % 2 == 0) ? idx / 2 : nqb - 1 - idx / 2) : idx;
}

template <class R, typename scalar_t>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* bias, bool causal,
                double scale_d, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2);
  const int64_t Hk = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const int64_t G = Hq / Hk;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const Blocks bl = pick_blocks(Lq, Lk, causal);
  const int64_t Bq = bl.bq, Bk = bl.bk;
  const int64_t nqb = (Lq + Bq - 1) / Bq;
  const Inputs<scalar_t> in(q, k, v, bias);
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  cpu::parallel_for(N * Hq * nqb, 1, [&](int64_t begin, int64_t end, int) {
    std::vector<acc_t> S(Bq * Bk), acc(Bq * Dv), m(Bq), l(Bq);
    std::vector<scalar_t> P(kSame ? 0 : Bq * Bk);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nh = t / nqb, idx = t % nqb;
      const int64_t qb = query_block_order(idx, nqb, causal);
      const int64_t n = nh / Hq, h = nh % Hq, hk = h / G;
      const int64_t i0 = qb * Bq, mq = std::min(Bq, Lq - i0);
      const int64_t kv_end = causal ? std::min(Lk, i0 + mq) : Lk;
      const scalar_t* Q = in.q.head(n, h) + i0 * in.q.sl;
      const scalar_t* K = in.k.head(n, hk);
      const scalar_t* V = in.v.head(n, hk);
      const scalar_t* B = in.bias.head(n, h);
      std::fill(m.begin(), m.begin() + mq, ninf);
      std::fill(l.begin(), l.begin() + mq, acc_t(0));
      std::fill(acc.begin(), acc.begin() + mq * Dv, acc_t(0));
      for (int64_t j0 = 0; j0 < kv_end; j0 += Bk) {
        const int64_t nk = std::min(Bk, kv_end - j0);
        score_block<scalar_t, acc_t>(S.data(), Bk, mq, nk, scale, Q, in, K, B, i0, j0, causal);
        for (int64_t r = 0; r < mq; ++r) {
          acc_t* s = S.data() + r * Bk;
          const acc_t mx = R::row_max(s, nk);
          const acc_t mn = std::max(m[r], mx);
          if (mn == ninf) {  // everything so far masked: contributes nothing (and must not make NaN in the GEMM)
            if (any_nan(s, nk)) l[r] = std::numeric_limits<acc_t>::quiet_NaN();  // the row's output is NaN
            std::fill(s, s + nk, acc_t(0));
            continue;
          }
          const acc_t alpha = av::exp_(m[r] - mn);  // 0 when m[r] == -inf
          const acc_t sum = R::row_exp_sub_sum(s, nk, mn);
          l[r] = l[r] * alpha + sum;
          m[r] = mn;
          if (alpha != acc_t(1)) {
            acc_t* a = acc.data() + r * Dv;
            for (int64_t c = 0; c < Dv; ++c) a[c] *= alpha;
          }
        }
        const scalar_t* Pp = as_operand<scalar_t, acc_t>(S.data(), P.data(), Bk, mq, nk);
        mm_nn<scalar_t, acc_t>(mq, Dv, nk, acc_t(1), Pp, Bk, V + j0 * in.v.sl, in.v.sl, acc_t(1), acc.data(), Dv);
      }
      scalar_t* O = op + (nh * Lq + i0) * Dv;
      acc_t* LS = lp + nh * Lq + i0;
      for (int64_t r = 0; r < mq; ++r) {
        const acc_t lr = l[r];
        if (lr != acc_t(0)) {  // NaN (a NaN score) propagates through inv
          const acc_t inv = acc_t(1) / lr;
          for (int64_t c = 0; c < Dv; ++c) O[r * Dv + c] = static_cast<scalar_t>(acc[r * Dv + c] * inv);
          LS[r] = m[r] + std::log(lr);
        } else {  // fully masked row: torch gives 0; lse = -inf (attention.h)
          for (int64_t c = 0; c < Dv; ++c) O[r * Dv + c] = scalar_t(0);
          LS[r] = ninf;
        }
      }
    }
  });
}

// The type a decoder step computes in for stored type T (bfloat16: float) and how its K / V rows reach the row helpers
// of attention_rows.inc: bfloat16 as raw bits (uint16_t), widened to float in registers, so a bfloat16 step streams
// half the bytes of a float32 one (the op is memory-bound) and runs no GEMM (emulated on CPUs without native bf16).
template <typename T>
using DecodeAcc = std::conditional_t<std::is_same_v<T, at::BFloat16>, float, T>;
template <typename T>
inline auto decode_rows(const T* p) {
  if constexpr (std::is_same_v<T, at::BFloat16>) return reinterpret_cast<const uint16_t*>(p);
  else return p;
}

// Decoder step (Lq == 1): one task per kv head (n, hk) handles all G query heads of its group, so each K and V row
// is streamed from memory exactly once (the op is memory-bound: ~2 FLOP per loaded element). Scores for the whole key
// range fit a small buffer, so the softmax is exact in one shot (no online rescaling), then one pass over V.
// bfloat16 (T) computes in float (A): the query heads are widened once per task, K and V stream as bfloat16, scores,
// softmax and output accumulate in float, the output is rounded to bfloat16 once; lse is float32.
template <class R, typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* bias, bool causal,
                   double scale_d, at::Tensor& out, at::Tensor& lse) {
  using A = DecodeAcc<T>;
  constexpr bool widen = !std::is_same_v<A, T>;
  const int64_t N = q.size(0), Hq = q.size(1), D = q.size(3);
  const int64_t Hk = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const int64_t G = Hq / Hk;
  const A scale = static_cast<A>(scale_d);
  const int64_t kv_end = causal ? std::min<int64_t>(Lk, 1) : Lk;  // top-left causal: query 0 sees key 0 only
  const Inputs<T> in(q, k, v, bias);
  const BiasView<T>& bv = in.bias;
  const int64_t sqh = in.q.sh, skl = in.k.sl, svl = in.v.sl;
  T* op = out.data_ptr<T>();
  A* lp = lse.data_ptr<A>();
  const A ninf = -std::numeric_limits<A>::infinity();
  // float32 and bfloat16 on AVX2 CPUs, AVX-512 ones included: attention_decode_avx2.h. The loops below ran at 39% of a
  // plain read of the same bytes at 256 keys on a Zen 3; an AVX-512 kernel (16-key score blocks, reduced by a
  // transpose tree) at 28-36% of it on a Zen 5 (AMD EPYC family 26), where this one reads at 67-92% (2.5-2.7x, B16 H8
  // D64 at 256-4096 keys, same-process runs of 15 rounds).
  constexpr bool kAvx2Type = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;
  const bool avx2 = kAvx2Type && attn_avx2::available();
  // the kernel's row prefetch only where K and V outgrow the L3, i.e. come from memory (see attention_decode_avx2.cpp).
  // Zen 5 (AMD EPYC family 26, 32 MB L3), 2 threads, B16 H8 D64 float32, share of a plain read of the same bytes with /
  // without it (same process, 21 rounds, twice): 1024 keys 93-95% / 84-85%, 4096 keys 94% / 85-86%. The L3 counted is
  // at most kL3PerCpu per thread of the team: a VM reports its host's whole L3, which the host's other guests share
  // (an Intel Xeon family 6 model 167 guest with 2 vCPUs reports 480 MB; there, with / without the prefetch, same
  // process, 11 rounds: float32 1024 keys (67 MB) 99% / 94%, 4096 keys 108% / 96%, 256 keys (17 MB) 87% / 86%,
  // bfloat16 1024 keys 86% / 85%).
  constexpr int64_t kL3PerCpu = int64_t(16) << 20;
  const int64_t l3 = std::min<int64_t>(cpu::l3_cache_bytes(), kL3PerCpu * std::max(1, cpu::threads()));
  const bool kv_from_memory = N * Hk * kv_end * (D + Dv) * int64_t(sizeof(T)) > l3;
  // Heads per thread: at least config().par_min_work multiply-adds each (parallel_for_shared's team rule), so a small
  // step (batch 1, 8 heads, a few dozen keys: microseconds of work) runs on the calling thread instead of waking a
  // team for it.
  const int64_t head_work = std::max<int64_t>(1, G * kv_end * (D + Dv));
  auto body = [&](int64_t begin, int64_t end) {
    std::vector<A> S(G * std::max<int64_t>(kv_end, 1)), acc(G * Dv), inv(G), Qw(widen ? G * D : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / Hk, hk = t % Hk;
      const A* Q;
      int64_t sq;  // row stride of Q's heads
      if constexpr (widen) {
        const T* Qs = in.q.head(n, hk * G);
        for (int64_t g = 0; g < G; ++g)
          for (int64_t c = 0; c < D; ++c) Qw[g * D + c] = static_cast<A>(Qs[g * sqh + c]);
        Q = Qw.data();
        sq = D;
      } else {
        Q = in.q.head(n, hk * G);
        sq = sqh;
      }
      if constexpr (kAvx2Type) {
        if (avx2) {
          // E: how K, V and the mask are stored (bfloat16 as its raw bits); the kernel computes in float
          using E = std::conditional_t<widen, uint16_t, float>;
          attn_avx2::DecodeHead<E> a;
          a.q = Q;
          a.sq = sq;
          a.D = D;
          a.k = reinterpret_cast<const E*>(in.k.head(n, hk));
          a.sk = skl;
          a.v = reinterpret_cast<const E*>(in.v.head(n, hk));
          a.sv = svl;
          a.Dv = Dv;
          a.kv_end = kv_end;
          a.scale = scale;
          a.G = G;
          if (bv.ptr) {
            a.bias = reinterpret_cast<const E*>(bv.head(n, hk * G));
            a.bsg = bv.sh;
            a.bsj = bv.sj;
          }
          T* o = op + (n * Hq + hk * G) * Dv;
          a.out = widen ? acc.data() : reinterpret_cast<float*>(o);  // bfloat16: rounded below, once
          a.so = Dv;
          a.lse = lp + n * Hq + hk * G;
          a.prefetch = kv_from_memory;
          attn_avx2::decode_head(a, S.data());
          if constexpr (widen)
            for (int64_t i = 0; i < G * Dv; ++i) o[i] = static_cast<T>(acc[i]);
          continue;
        }
      }
      const auto K = decode_rows(in.k.head(n, hk));
      const auto V = decode_rows(in.v.head(n, hk));
      int64_t j = 0;
      for (; j + 4 <= kv_end; j += 4) {  // four keys per pass: shares the q loads, independent reductions
        const auto kr = K + j * skl;
        for (int64_t g = 0; g < G; ++g) {
          A d4[4];
          R::dot4(Q + g * sq, kr, skl, D, d4);
          for (int r = 0; r < 4; ++r) S[g * kv_end + j + r] = scale * d4[r];
        }
      }
      for (; j < kv_end; ++j) {
        const auto kr = K + j * skl;
        for (int64_t g = 0; g < G; ++g) S[g * kv_end + j] = scale * R::dot(Q + g * sq, kr, D);
      }
      for (int64_t g = 0; g < G; ++g) {
        A* s = S.data() + g * kv_end;
        const int64_t h = hk * G + g;
        if (bv.ptr) {
          const T* b = bv.head(n, h);
          for (int64_t j = 0; j < kv_end; ++j) s[j] += static_cast<A>(b[j * bv.sj]);
        }
        const A mx = R::row_max(s, kv_end);
        if (mx == ninf) {  // fully masked (or no keys): out 0, lse -inf; NaN scores make out and lse NaN
          const A nan_or_0 = any_nan(s, kv_end) ? std::numeric_limits<A>::quiet_NaN() : A(0);
          std::fill(s, s + kv_end, A(0));
          inv[g] = nan_or_0;
          lp[n * Hq + h] = nan_or_0 == A(0) ? ninf : nan_or_0;
          continue;
        }
        const A l = R::row_exp_sub_sum(s, kv_end, mx);
        inv[g] = A(1) / l;
        lp[n * Hq + h] = mx + std::log(l);
      }
      std::fill(acc.begin(), acc.end(), A(0));
      for (j = 0; j + 4 <= kv_end; j += 4) {
        const auto vr = V + j * svl;
        for (int64_t g = 0; g < G; ++g) R::axpy4(acc.data() + g * Dv, vr, svl, S.data() + g * kv_end + j, 1, Dv);
      }
      for (; j < kv_end; ++j) {
        const auto vr = V + j * svl;
        for (int64_t g = 0; g < G; ++g) {
          const A p = S[g * kv_end + j];
          if (p != A(0)) R::axpy(acc.data() + g * Dv, vr, p, Dv);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* o = op + (n * Hq + hk * G + g) * Dv;
        for (int64_t c = 0; c < Dv; ++c) o[c] = static_cast<T>(acc[g * Dv + c] * inv[g]);  // 0 * NaN: NaN
      }
    }
  };
  // heads shared in pieces (cpu::parallel_for_shared): a thread done with its own takes a slower teammate's last
  // heads. Same process on the Zen 5, B16 H8 D64 at 256 keys (in L3), share of a plain read: 87-91% against the fixed
  // split's 85-88%; from memory (1024 / 4096 keys) the same.
  cpu::parallel_for_shared(N * Hk, head_work, 1, body);
}

template <class R, typename scalar_t>
void bwd_kernel(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& o, const at::Tensor& lse, const at::Tensor* bias, bool causal, double scale_d,
                at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, bool fold_kv) {
  // fold_kv (sdpa_backward: k and v the same tensor): dk receives dK + dV, and dv is not written
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const int64_t G = Hq / Hk;
  const acc_t scale = static_cast<acc_t>(scale_d);
  // Backward blocks (64 x 128): five GEMMs per block and private dK/dV rows.
  const int64_t Bq = std::min<int64_t>(std::max<int64_t>(Lq, 1), 64);
  const int64_t Bk = std::min<int64_t>(std::max<int64_t>(Lk, 1), 128);
  const int64_t nqb = (Lq + Bq - 1) / Bq;
  const int64_t nkb = (Lk + Bk - 1) / Bk;

  const Inputs<scalar_t> in(q, k, v, bias);
  const HeadRows<scalar_t> grows(go), orows(o);
  const int64_t sql = in.q.sl, skl = in.k.sl, svl = in.v.sl, sgl = grows.sl, sol = orows.sl;
  const acc_t* lp = lse.const_data_ptr<acc_t>();
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  scalar_t* dkp = dk.data_ptr<scalar_t>();
  scalar_t* dvp = fold_kv ? nullptr : dv.data_ptr<scalar_t>();

  // Work split: a task owns one kv head (n, hk) and a range [kb0, kb1) of its key blocks, so dK/dV of that range are
  // private to it. Normally one task per kv head covers all key blocks (dQ is then private too and written directly).
  // When N*Hk is smaller than the thread count, key blocks are split across tasks; each task then adds its dQ
  // block into one shared accumulator (dq itself, or one float32 copy for bfloat16) under a lock striped by query
  // block, so the extra memory does not grow with the thread count.
  const int64_t nthreads = cpu::threads();
  int64_t splits = 1;
  if (N * Hk < nthreads && nkb > 1) splits = std::min<int64_t>(nkb, (nthreads + N * Hk - 1) / (N * Hk));
  const int64_t kb_per = (nkb + splits - 1) / std::max<int64_t>(splits, 1);
  splits = nkb > 0 ? (nkb + kb_per - 1) / kb_per : 1;
  at::Tensor dq_acc_t;  // splits > 1: the shared dQ accumulator
  acc_t* dq_acc = nullptr;
  if (splits > 1) {
    dq_acc_t = kSame ? dq : at::empty(dq.sizes(), dq.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    dq_acc_t.zero_();
    dq_acc = dq_acc_t.data_ptr<acc_t>();
  }
  std::array<std::mutex, 64> dq_locks;

  // float32 on AVX-512: each query block's key range runs on attn512::bwd_block (same tasks, same dQ/dK/dV buffers).
  bool avx512 = false;
  if constexpr (std::is_same_v<scalar_t, float>) avx512 = use_avx512();  // Bq <= kBq
  // float32 on AVX2 CPUs without the AVX-512 kernels: attn_avx2::bwd_block, the same way, from 8 query rows (its
  // queries run along 8-float vectors: a decoder step's one query row would compute 8 lanes for one; the BLAS
  // blocks below keep those)
  bool avx2 = false;
  if constexpr (std::is_same_v<scalar_t, float>) avx2 = !avx512 && Lq >= 8 && attn_avx2::blocks_available();
  const int64_t ws512_size = avx512 ? attn512::bwd_workspace(D, Dv) : avx2 ? attn_avx2::bwd_workspace(D, Dv) : 0;
  // One query row, float32 / float64: the per-key pass below. Same process, training steps, that pass against the
  // blocked kernels: SDPA B16 H8 keys 256 / 1024 D64 1.80x / 1.33x, B32 H1 keys 512 D256 1.95x, B1 H8 keys 2048 D64
  // 1.84x; the Luong decoder step B32 S512 size 256 2.11x.
  const bool one_row = kSame && Lq == 1;

  cpu::parallel_for(N * Hk * splits, 1, [&](int64_t begin, int64_t end, int) {
    block_pool::Floats ws512_buf;
    if (avx512 || avx2) ws512_buf.reset(ws512_size);
    TORCH_CHECK(!(avx512 || avx2) || ws512_buf.ok(), "seqfast sdpa backward: out of memory for the workspace");
    float* ws512 = ws512_buf.get();
    std::vector<acc_t> S(Bq * Bk), dS(Bq * Bk), dQa(Bq * D), delta(Bq), lser(Bq);
    std::vector<acc_t> dKa, dVa;
    std::vector<scalar_t> P(kSame ? 0 : Bq * Bk), dSm(kSame ? 0 : Bq * Bk);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nhk = t / splits, sp = t % splits;
      const int64_t n = nhk / Hk, hk = nhk % Hk;
      const int64_t kb0 = sp * kb_per, kb1 = std::min(nkb, kb0 + kb_per);
      const int64_t jlo = kb0 * Bk, jhi = std::min(Lk, kb1 * Bk);
      const int64_t nj = std::max<int64_t>(jhi - jlo, 0);
      dKa.assign(nj * D, acc_t(0));
      // one query row folding dV into dK: its pass adds both into dKa (below), dVa stays empty
      dVa.assign(fold_kv && one_row ? 0 : nj * Dv, acc_t(0));
      const scalar_t* K = in.k.head(n, hk);
      const scalar_t* V = in.v.head(n, hk);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        const int64_t nh = n * Hq + h;
        const scalar_t* B = in.bias.head(n, h);
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t i0 = qb * Bq, mq = std::min(Bq, Lq - i0);
          const int64_t kv_end = std::min(jhi, causal ? std::min(Lk, i0 + mq) : Lk);
          const scalar_t* Q = in.q.head(n, h) + i0 * sql;
          const scalar_t* dO = grows.head(n, h) + i0 * sgl;
          const scalar_t* O = orows.head(n, h) + i0 * sol;
          acc_t* dQout = dQa.data();
          std::fill(dQa.begin(), dQa.begin() + mq * D, acc_t(0));
          if (kv_end <= jlo) {
            if (splits == 1) {
              scalar_t* dst = dqp + (nh * Lq + i0) * D;
              for (int64_t x = 0; x < mq * D; ++x) dst[x] = scalar_t(0);
            }
            continue;
          }
          bool any_live = false;
          for (int64_t r = 0; r < mq; ++r) {
            acc_t d = 0;
            const scalar_t* a = dO + r * sgl;
            const scalar_t* b = O + r * sol;
            for (int64_t c = 0; c < Dv; ++c) d += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
            delta[r] = d;
            lser[r] = lp[nh * Lq + i0 + r];
            // +inf: a fully masked row (sdpa_backward maps the forward's -inf), P = 0. NaN stays live: NaN grads.
            any_live |= !(lser[r] == std::numeric_limits<acc_t>::infinity());
          }
          if (any_live && one_row) {
            // One query row (a decoder step's training call): one pass over the keys, each key's score, probability
            // and gradients from its own rows. The blocked paths run 16-64 query lanes for the one live row.
            if constexpr (kSame) {
              const acc_t l = lser[0], dl = delta[0];
              const scalar_t* brow = B ? B + i0 * in.bias.si : nullptr;
              for (int64_t j = jlo; j < kv_end; ++j) {
                const scalar_t* kj = K + j * skl;
                const scalar_t* vj = V + j * svl;
                acc_t sc = scale * R::dot(Q, kj, D);
                if (brow) sc += brow[j * in.bias.sj];
                const acc_t p = std::exp(sc - l);
                if (p == acc_t(0)) continue;  // a masked key (or one past exp's range): no gradient from it
                const acc_t ds = p * (R::dot(dO, vj, Dv) - dl);
                R::axpy((fold_kv ? dKa : dVa).data() + (j - jlo) * Dv, dO, p, Dv);
                R::axpy(dKa.data() + (j - jlo) * D, Q, scale * ds, D);
                R::axpy(dQout, kj, scale * ds, D);
              }
            }
          } else if (any_live && (avx512 || avx2)) {
            if constexpr (std::is_same_v<scalar_t, float>) {
              attn512::BwdBlock a;
              set_block(a, in, n, h, hk, i0, mq, kv_end, causal, scale);
              a.dout = dO;
              a.sdo = sgl;
              a.j_lo = jlo;
              a.lse = lser.data();
              a.delta = delta.data();
              a.dq = dQout;
              a.sdq = D;
              a.dk = dKa.data();
              a.dv = dVa.data();
              if (avx512) attn512::bwd_block(a, ws512);
              else attn_avx2::bwd_block(a, ws512);
            }
          } else if (any_live) {
            for (int64_t j0 = jlo; j0 < kv_end; j0 += Bk) {
              const int64_t nk = std::min(Bk, kv_end - j0);
              score_block<scalar_t, acc_t>(S.data(), Bk, mq, nk, scale, Q, in, K, B, i0, j0, causal);
              for (int64_t r = 0; r < mq; ++r) R::row_exp_sub(S.data() + r * Bk, nk, lser[r]);
              const scalar_t* Pp = as_operand<scalar_t, acc_t>(S.data(), P.data(), Bk, mq, nk);
              // dV += P^T dO
              mm_tn<scalar_t, acc_t>(nk, Dv, mq, acc_t(1), Pp, Bk, dO, sgl, acc_t(1), dVa.data() + (j0 - jlo) * Dv,
                                     Dv);
              // dP = dO V^T ; dS = P * (dP - delta)
              mm_nt<scalar_t, acc_t>(mq, nk, Dv, acc_t(1), dO, sgl, V + j0 * svl, svl, acc_t(0), dS.data(), Bk);
              for (int64_t r = 0; r < mq; ++r) R::row_dsoftmax(S.data() + r * Bk, dS.data() + r * Bk, nk, delta[r]);
              const scalar_t* dSp = as_operand<scalar_t, acc_t>(dS.data(), dSm.data(), Bk, mq, nk);
              // dQ += scale dS K ; dK += scale dS^T Q
              mm_nn<scalar_t, acc_t>(mq, D, nk, scale, dSp, Bk, K + j0 * skl, skl, acc_t(1), dQout, D);
              mm_tn<scalar_t, acc_t>(nk, D, mq, scale, dSp, Bk, Q, sql, acc_t(1), dKa.data() + (j0 - jlo) * D, D);
            }
          }
          if (splits == 1) {
            scalar_t* dst = dqp + (nh * Lq + i0) * D;
            for (int64_t x = 0; x < mq * D; ++x) dst[x] = static_cast<scalar_t>(dQa[x]);
          } else if (any_live) {
            std::lock_guard<std::mutex> lock(dq_locks[(nh * nqb + qb) % dq_locks.size()]);
            acc_t* dst = dq_acc + (nh * Lq + i0) * D;
            for (int64_t x = 0; x < mq * D; ++x) dst[x] += dQa[x];
          }
        }
      }
      scalar_t* dKo = dkp + ((n * Hk + hk) * Lk + jlo) * D;
      if (fold_kv && !dVa.empty()) {
        for (int64_t x = 0; x < nj * D; ++x) dKo[x] = static_cast<scalar_t>(dKa[x] + dVa[x]);
      } else {
        for (int64_t x = 0; x < nj * D; ++x) dKo[x] = static_cast<scalar_t>(dKa[x]);
      }
      if (!fold_kv) {
        scalar_t* dVo = dvp + ((n * Hk + hk) * Lk + jlo) * Dv;
        for (int64_t x = 0; x < nj * Dv; ++x) dVo[x] = static_cast<scalar_t>(dVa[x]);
      }
    }
  });

  if (splits > 1 && !kSame) dq.copy_(dq_acc_t);
}

// float32 forward on a block kernel taking attn512::FwdBlock (attn512::fwd_block on AVX-512, attn_avx2::fwd_block on
// AVX2, both with attn512::kBq-row query blocks): same tasks as fwd_kernel (one per (n, h, query block), causal
// blocks interleaved for balance), each task one block call with a wsz-float workspace.
// Tasks run on cpu::parallel_for_shared: each thread's contiguous run of tasks in pieces that a thread done with its
// own takes from a slower teammate's end. Why: with a fixed split the call ended with its slowest thread, and vCPUs
// run at uneven speeds: on the 2 vCPUs of a Zen 3 EPYC the shared pieces ran the forward 1.02-1.09x faster (batch 1,
// 8 heads, L128-1024, head dim 64-128, full and causal; same-process A/B, 41 rounds, both arm orders). At least
// config().par_min_work multiply-adds per thread: a short sequence's few microseconds of work run on the calling
// thread instead of waking a team for them.
template <class Block>
void fwd_blocks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* bias, bool causal,
                double scale, at::Tensor& out, at::Tensor& lse, int64_t wsz, const Block& block) {
  const int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2);
  const int64_t Hk = k.size(1), Lk = k.size(2), D = q.size(3), Dv = v.size(3);
  const int64_t G = Hq / Hk, Bq = attn512::kBq;
  const int64_t nqb = (Lq + Bq - 1) / Bq;
  // multiply-adds of a task (causal: of a diagonal-length block, the average)
  const int64_t task_work = std::max<int64_t>(1, std::min(Bq, Lq) * (causal ? std::min(Lk, Lq) : Lk) * (D + Dv));
  const Inputs<float> in(q, k, v, bias);
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  cpu::parallel_for_shared(N * Hq * nqb, task_work, 1, [&](int64_t begin, int64_t end) {
    block_pool::Floats ws_buf(wsz);
    TORCH_CHECK(ws_buf.ok(), "seqfast sdpa: out of memory for the attention workspace");
    float* ws = ws_buf.get();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nh = t / nqb, idx = t % nqb;
      const int64_t qb = query_block_order(idx, nqb, causal);
      const int64_t n = nh / Hq, h = nh % Hq, hk = h / G;
      const int64_t i0 = qb * Bq, mq = std::min(Bq, Lq - i0);
      attn512::FwdBlock a;
      set_block(a, in, n, h, hk, i0, mq, causal ? std::min(Lk, i0 + mq) : Lk, causal, static_cast<float>(scale));
      a.out = op + (nh * Lq + a.i0) * Dv;
      a.so = Dv;
      a.lse = lp + nh * Lq + a.i0;
      block(a, ws);
    }
  });
}

void fwd_avx512(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* bias, bool causal,
                double scale, at::Tensor& out, at::Tensor& lse) {
  fwd_blocks(q, k, v, bias, causal, scale, out, lse, attn512::fwd_workspace(q.size(3), v.size(3)), attn512::fwd_block);
}

void fwd_avx2(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* bias, bool causal,
              double scale, at::Tensor& out, at::Tensor& lse) {
  fwd_blocks(q, k, v, bias, causal, scale, out, lse, attn_avx2::fwd_workspace(q.size(3), v.size(3)),
             attn_avx2::fwd_block);
}

// The checks every SDPA entry makes before a kernel reads a raw pointer (RuntimeError naming the argument).
void check_sdpa_inputs(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& bias) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK(t->defined() && t->device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
    TORCH_CHECK(t->dim() == 4, fn, ": ", name, " must be 4-D [N, H, L, D], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), fn, ": ", name, " has dtype ", t->scalar_type(), " but q has ",
                q.scalar_type());
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble || q.scalar_type() == at::kBFloat16,
              fn, ": q must be float32, float64 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), fn, ": q, k and v must have the same batch size, got ",
              q.size(0), ", ", k.size(0), " and ", v.size(0));
  // zero heads everywhere is an empty call (torch returns empty outputs); otherwise k's heads must divide q's
  TORCH_CHECK(v.size(1) == k.size(1) && (k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0), fn,
              ": k and v must have the same number of heads, dividing q's, got q ", q.size(1), ", k ", k.size(1),
              ", v ", v.size(1));
  TORCH_CHECK(k.size(3) == q.size(3), fn, ": k's last dimension must match q's (", q.size(3), "), got ", k.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), fn, ": v must have as many keys as k (", k.size(2), "), got ", v.size(2));
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == q.scalar_type(), fn, ": bias must be a CPU tensor of q's dtype (",
                q.scalar_type(), "), got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 4 && b.size(0) == q.size(0) && b.size(1) == q.size(1) && b.size(2) == q.size(2) &&
                    b.size(3) == k.size(2),
                fn, ": bias must be [", q.size(0), ", ", q.size(1), ", ", q.size(2), ", ", k.size(2),
                "] (expanded views are fine), got ", b.sizes());
  }
}

void check_like(const char* fn, const char* name, const at::Tensor& t, at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == sizes, fn, ": ", name, " must be ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// The forward's block kernels for q's dtype (the query length >= 2, or a decoder step left to them): float32 on the
// AVX-512 or AVX2 blocks where they run, anything else on the BLAS blocks (fwd_kernel).
void forward_blocks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* bp, bool is_causal,
                    double scale, at::Tensor& out, at::Tensor& lse) {
  if (q.scalar_type() == at::kFloat && use_avx512()) {
    fwd_avx512(q, k, v, bp, is_causal, scale, out, lse);
    return;
  }
  if (q.scalar_type() == at::kFloat && attn_avx2::blocks_available()) {
    fwd_avx2(q, k, v, bp, is_causal, scale, out, lse);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "seqfast_sdpa_forward", [&] {
    av::with_rows([&](auto rows) { fwd_kernel<decltype(rows), scalar_t>(q, k, v, bp, is_causal, scale, out, lse); });
  });
}

}  // namespace

// bfloat16 calls other than the forward decoder step compute in float32 on upcast copies wherever the own float32
// blocks run (AVX-512, or AVX2 + FMA): forward and backward, the results rounded to bfloat16 once. Why: the bfloat16
// blocks below run the BLAS's bfloat16 GEMM on each small block (emulated on CPUs without native bfloat16; on the Zen 5
// with AVX512_BF16 no faster than torch's own bfloat16 op), while the float32 blocks run register-tiled near the FMA
// peak and the copies cost one read and write of q, k, v (and grad_out, out), O(L D) against the O(L^2 D) work. Same
// process on a Zen 5 (AMD EPYC family 26), 8 heads, training step, torch's bfloat16 op over float32 seqfast on copies:
// L512 D64 1.88x, L2048 D64 causal 1.78x, L128 D128 2.40x, L512 D128 causal 2.46x (the bfloat16 blocks: 0.97-1.26x).
// The op keeps bfloat16 inputs and outputs, so what autograd saves stays bfloat16. Not on AMX CPUs, where the BLAS's
// bfloat16 GEMM runs on tiles (not measured there).
bool sdpa_bf16_upcasts() { return !cpu::has_amx() && (use_avx512() || attn_avx2::blocks_available()); }

std::tuple<at::Tensor, at::Tensor> sdpa_forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                const std::optional<at::Tensor>& bias, bool is_causal,
                                                double scale) {
  check_sdpa_inputs("sdpa_forward", q_, k_, v_, bias);
  const at::Tensor q = blas_ready(q_), k = blas_ready(k_), v = blas_ready(v_);
  const int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2), Dv = v.size(3);
  at::Tensor out = at::empty({N, Hq, Lq, Dv}, q.options());
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({N, Hq, Lq}, q.options().dtype(lse_dtype));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const at::Tensor* bp = (bias.has_value() && bias->defined()) ? &*bias : nullptr;
  const int64_t Hk = k.size(1);
  // bfloat16 takes the decoder step whatever the task count (the other path would run emulated bf16 GEMMs)
  if (Lq == 1 && (q.scalar_type() == at::kBFloat16 || N * Hk >= cpu::threads())) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "seqfast_sdpa_decode", [&] {
      av::with_rows([&](auto rows) { decode_kernel<decltype(rows), scalar_t>(q, k, v, bp, is_causal, scale, out, lse); });
    });
    return {out, lse};
  }
  if (bf16_upcasts(q)) {
    const std::optional<at::Tensor> bf = float_bias(bias);
    at::Tensor o32 = float_like(out);
    forward_blocks(widened(q), widened(k), widened(v), bf ? &*bf : nullptr, is_causal, scale, o32, lse);
    out.copy_(o32);
    return {out, lse};
  }
  forward_blocks(q, k, v, bp, is_causal, scale, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward(const at::Tensor& grad_out, const at::Tensor& q_,
                                                             const at::Tensor& k_, const at::Tensor& v_,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const std::optional<at::Tensor>& bias, bool is_causal,
                                                             double scale, bool fold_kv) {
  check_sdpa_inputs("sdpa_backward", q_, k_, v_, bias);
  // k and v one tensor (a Luong step's keys as its values): autograd would add the two gradients into a third
  // tensor; here dK + dV is summed where it is computed (one query row: in the per-key pass itself) and dv comes back
  // undefined (None: the caller returns the sum as k's gradient alone)
  fold_kv = fold_kv && k_.is_same(v_);
  const std::vector<int64_t> out_sizes{q_.size(0), q_.size(1), q_.size(2), v_.size(3)};
  check_like("sdpa_backward", "grad_out", grad_out, out_sizes, q_.scalar_type());
  check_like("sdpa_backward", "out", out, out_sizes, q_.scalar_type());
  TORCH_CHECK(lse.defined() && lse.device().is_cpu() && lse.sizes() == q_.sizes().slice(0, 3),
              "sdpa_backward: lse must be a CPU tensor of size ", q_.sizes().slice(0, 3), ", got ", lse.sizes());
  const at::Tensor q = blas_ready(q_), k = blas_ready(k_), v = blas_ready(v_);
  const at::Tensor go = blas_ready(grad_out), o = blas_ready(out);
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // The kernels take +inf as "fully masked row" (exp(s - lse) is then exactly 0); the forward's contract is -inf.
  at::Tensor l = lse.to(lse_dtype).contiguous();
  l = at::where(l == -std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity(), l);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = fold_kv ? at::Tensor() : at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0) {
    dq.zero_(), dk.zero_();
    if (!fold_kv) dv.zero_();
    if (q.numel() == 0 || k.size(2) == 0) return {dq, dk, dv};
  }
  const at::Tensor* bp = (bias.has_value() && bias->defined()) ? &*bias : nullptr;
  if (bf16_upcasts(q)) {  // float32 gradients on widened copies, rounded into dq, dk, dv once
    const std::optional<at::Tensor> bf = float_bias(bias);
    at::Tensor dq32 = float_like(dq);
    at::Tensor dk32 = float_like(dk);
    at::Tensor dv32 = fold_kv ? at::Tensor() : float_like(dv);
    const at::Tensor go32 = widened(go), q32 = widened(q), k32 = widened(k), v32 = fold_kv ? k32 : widened(v);
    const at::Tensor o32 = widened(o);
    av::with_rows([&](auto rows) {
      bwd_kernel<decltype(rows), float>(go32, q32, k32, v32, o32, l, bf ? &*bf : nullptr, is_causal, scale, dq32, dk32,
                                        dv32, fold_kv);
    });
    dq.copy_(dq32), dk.copy_(dk32);
    if (!fold_kv) dv.copy_(dv32);
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "seqfast_sdpa_backward", [&] {
    av::with_rows(
        [&](auto rows) {
          bwd_kernel<decltype(rows), scalar_t>(go, q, k, v, o, l, bp, is_causal, scale, dq, dk, dv, fold_kv);
        });
  });
  return {dq, dk, dv};
}

}  // namespace seqfast
