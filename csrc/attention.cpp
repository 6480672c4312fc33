// Flash-style scaled dot-product attention on CPU: forward and backward.
//
// Shape of the work: every (batch, query head, query block) is an independent task. A task walks the key blocks,
// computes the score block S = scale * Q K^T with one BLAS GEMM (MKL via at::native::cpublas, called on raw pointers
// with the tensors' own row strides, so no copies and no per-call ATen overhead), applies bias / causal masking,
// does the online-softmax update (running max m, running sum l, rescaled accumulator), and accumulates P V with a
// second GEMM. Key blocks entirely above the causal diagonal are never visited (the speed win over torch).
// bfloat16 runs the GEMMs on bf16 operands with fp32 accumulation (P / dS are rounded to bf16 as flash-attn does);
// softmax state is fp32. float64 is exact-ish and is what the gradient tests use.
// float32 on CPUs with AVX-512 takes attention_avx512.h instead, forward and backward (register-tiled loops on
// transposed blocks, attention_avx512*.cpp); float64, bfloat16 and CPUs without AVX-512 run the BLAS path below.
#include "attention.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_vec.h"
#include "attention_avx512.h"
#include "sgemm.h"

namespace seqfast {
namespace {

namespace av = attn_vec;

// ---- GEMM backend ----
// at::native::cpublas::gemm is not exported from libtorch_cpu, and at::mm on from_blob blocks costs a few us of
// dispatch per call (hundreds of block GEMMs per head). The x86 torch wheels link MKL statically and export the
// standard Fortran BLAS entry points (sgemm_, dgemm_) plus MKL's cblas_gemm_bf16bf16f32, so we bind them as weak
// symbols: present -> direct calls with no overhead; absent (other torch builds) -> the at::addmm_out fallback below.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// MKL: layout 102 = column major, trans 111 = N, 112 = T; MKL_BF16 is uint16_t; LP64 ints.
void cblas_gemm_bf16bf16f32(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                            float*, int) __attribute__((weak));
}

// Fallback: column-major C(m x n, ldc) = alpha op(A) op(B) + beta C through ATen on views of the raw buffers.
template <typename T, typename A>
void gemm_fallback(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const T* a, int64_t lda, const T* b,
                   int64_t ldb, A beta, A* c, int64_t ldc) {
  const auto to = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto co = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  // column-major X (r x c, ld) is the row-major [c, r] tensor with strides [ld, 1], transposed.
  at::Tensor opA = ta ? at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, to)
                      : at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, to).t();
  at::Tensor opB = tb ? at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, to)
                      : at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, to).t();
  at::Tensor C = at::from_blob(c, {n, m}, {ldc, 1}, co).t();
  if (!std::is_same<T, A>::value) opA = opA.to(co.dtype()), opB = opB.to(co.dtype());
  if (k == 0) {
    if (beta == A(0)) C.zero_(); else C.mul_(beta);
    return;
  }
  at::addmm_out(C, C, opA, opB, beta, alpha);
}

template <typename T, typename A>
inline void gemm_cm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const T* a, int64_t lda, const T* b,
                    int64_t ldb, A beta, A* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // BLAS wants ld >= rows of the stored matrix even when that dim is 1.
  lda = std::max<int64_t>(lda, ta ? k : m);
  ldb = std::max<int64_t>(ldb, tb ? n : k);
  lda = std::max<int64_t>(lda, 1), ldb = std::max<int64_t>(ldb, 1);
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
#ifndef SEQFAST_ATTN_FORCE_FALLBACK  // (defined only to test the fallback)
  if constexpr (std::is_same<T, float>::value) {
    if (sgemm_ != nullptr && k > 0) return sgemm_(&ca, &cb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
  } else if constexpr (std::is_same<T, double>::value) {
    if (dgemm_ != nullptr && k > 0) return dgemm_(&ca, &cb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
  } else if constexpr (std::is_same<T, at::BFloat16>::value) {
    if (cblas_gemm_bf16bf16f32 != nullptr && k > 0)
      return cblas_gemm_bf16bf16f32(102, ta ? 112 : 111, tb ? 112 : 111, im, in, ik, alpha,
                                    reinterpret_cast<const uint16_t*>(a), ia, reinterpret_cast<const uint16_t*>(b),
                                    ib, beta, c, ic);
  }
#endif
  gemm_fallback<T, A>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major GEMM helpers on top of column-major BLAS (a row-major X is the column-major X^T).
// C[m,n] = alpha * A[m,k] B[n,k]^T + beta * C
template <typename T, typename A>
inline void mm_nt(int64_t m, int64_t n, int64_t k, A alpha, const T* a, int64_t lda, const T* b, int64_t ldb, A beta,
                  A* c, int64_t ldc) {
  gemm_cm<T, A>(true, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}
// C[m,n] = alpha * A[m,k] B[k,n] + beta * C
template <typename T, typename A>
inline void mm_nn(int64_t m, int64_t n, int64_t k, A alpha, const T* a, int64_t lda, const T* b, int64_t ldb, A beta,
                  A* c, int64_t ldc) {
  gemm_cm<T, A>(false, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}
// C[m,n] = alpha * A[k,m]^T B[k,n] + beta * C
template <typename T, typename A>
inline void mm_tn(int64_t m, int64_t n, int64_t k, A alpha, const T* a, int64_t lda, const T* b, int64_t ldb, A beta,
                  A* c, int64_t ldc) {
  gemm_cm<T, A>(false, true, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
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

// Block sizes: the score block (bq x bk floats) plus the accumulator stay in L1/L2. Measured on this 2-core AVX-512
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

template <typename scalar_t, typename acc_t>
inline void to_operand(const acc_t* src, scalar_t* dst, int64_t ld, int64_t mq, int64_t nk) {
  for (int64_t r = 0; r < mq; ++r)
    for (int64_t c = 0; c < nk; ++c) dst[r * ld + c] = static_cast<scalar_t>(src[r * ld + c]);
}

// Query block of the idx-th task of a head. Causal: interleave cheap (early) and expensive (late) query blocks so
// that at::parallel_for's contiguous chunks carry equal work even when N*Hq is small.
inline int64_t query_block_order(int64_t idx, int64_t nqb, bool causal) {
  return causal ? ((idx % 2 == 0) ? idx / 2 : nqb - 1 - idx / 2) : idx;
}

template <typename scalar_t>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* bias, bool causal,
                double scale_d, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const int64_t G = Hq / Hk;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const Blocks bl = pick_blocks(Lq, Lk, causal);
  const int64_t Bq = bl.bq, Bk = bl.bk;
  const int64_t nqb = (Lq + Bq - 1) / Bq;

  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const int64_t sqn = q.stride(0), sqh = q.stride(1), sql = q.stride(2);
  const int64_t skn = k.stride(0), skh = k.stride(1), skl = k.stride(2);
  const int64_t svn = v.stride(0), svh = v.stride(1), svl = v.stride(2);
  const BiasView<scalar_t> bv = bias_view<scalar_t>(bias);
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t pinf = std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, N * Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(Bq * Bk), acc(Bq * Dv), m(Bq), l(Bq);
    std::vector<scalar_t> P(kSame ? 0 : Bq * Bk);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nh = t / nqb, idx = t % nqb;
      const int64_t qb = query_block_order(idx, nqb, causal);
      const int64_t n = nh / Hq, h = nh % Hq, hk = h / G;
      const int64_t i0 = qb * Bq, mq = std::min(Bq, Lq - i0);
      const int64_t kv_end = causal ? std::min(Lk, i0 + mq) : Lk;
      const scalar_t* Q = qp + n * sqn + h * sqh + i0 * sql;
      const scalar_t* K = kp + n * skn + hk * skh;
      const scalar_t* V = vp + n * svn + hk * svh;
      const scalar_t* B = bv.ptr ? bv.ptr + n * bv.sn + h * bv.sh : nullptr;
      std::fill(m.begin(), m.begin() + mq, ninf);
      std::fill(l.begin(), l.begin() + mq, acc_t(0));
      std::fill(acc.begin(), acc.begin() + mq * Dv, acc_t(0));
      for (int64_t j0 = 0; j0 < kv_end; j0 += Bk) {
        const int64_t nk = std::min(Bk, kv_end - j0);
        mm_nt<scalar_t, acc_t>(mq, nk, D, scale, Q, sql, K + j0 * skl, skl, acc_t(0), S.data(), Bk);
        mask_block<scalar_t, acc_t>(S.data(), Bk, mq, nk, i0, j0, B, bv.si, bv.sj, causal);
        for (int64_t r = 0; r < mq; ++r) {
          acc_t* s = S.data() + r * Bk;
          const acc_t mx = av::row_max(s, nk);
          const acc_t mn = std::max(m[r], mx);
          if (mn == ninf) {  // everything so far masked: contributes nothing (and must not make NaN in the GEMM)
            std::fill(s, s + nk, acc_t(0));
            continue;
          }
          const acc_t alpha = av::exp_(m[r] - mn);  // 0 when m[r] == -inf
          const acc_t sum = av::row_exp_sub_sum(s, nk, mn);
          l[r] = l[r] * alpha + sum;
          m[r] = mn;
          if (alpha != acc_t(1)) {
            acc_t* a = acc.data() + r * Dv;
            for (int64_t c = 0; c < Dv; ++c) a[c] *= alpha;
          }
        }
        const scalar_t* Pp;
        if constexpr (kSame) {
          Pp = S.data();
        } else {
          to_operand<scalar_t, acc_t>(S.data(), P.data(), Bk, mq, nk);
          Pp = P.data();
        }
        mm_nn<scalar_t, acc_t>(mq, Dv, nk, acc_t(1), Pp, Bk, V + j0 * svl, svl, acc_t(1), acc.data(), Dv);
      }
      scalar_t* O = op + (nh * Lq + i0) * Dv;
      acc_t* LS = lp + nh * Lq + i0;
      for (int64_t r = 0; r < mq; ++r) {
        const acc_t lr = l[r];
        if (lr > acc_t(0)) {
          const acc_t inv = acc_t(1) / lr;
          for (int64_t c = 0; c < Dv; ++c) O[r * Dv + c] = static_cast<scalar_t>(acc[r * Dv + c] * inv);
          LS[r] = m[r] + std::log(lr);
        } else {  // fully masked row: torch gives 0; lse = +inf makes backward's P exactly 0
          for (int64_t c = 0; c < Dv; ++c) O[r * Dv + c] = scalar_t(0);
          LS[r] = pinf;
        }
      }
    }
  });
}

// Decoder step (Lq == 1): one task per kv head (n, hk) handles all G query heads of its group, so each K and V row
// is streamed from memory exactly once (the op is memory-bound: ~2 FLOP per loaded element). Scores for the whole key
// range fit a small buffer, so the softmax is exact in one shot (no online rescaling), then one pass over V.
template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* bias, bool causal,
                   double scale_d, at::Tensor& out, at::Tensor& lse) {
  const int64_t N = q.size(0), Hq = q.size(1), D = q.size(3);
  const int64_t Hk = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const int64_t G = Hq / Hk;
  const T scale = static_cast<T>(scale_d);
  const int64_t kv_end = causal ? std::min<int64_t>(Lk, 1) : Lk;  // top-left causal: query 0 sees key 0 only
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const int64_t sqn = q.stride(0), sqh = q.stride(1);
  const int64_t skn = k.stride(0), skh = k.stride(1), skl = k.stride(2);
  const int64_t svn = v.stride(0), svh = v.stride(1), svl = v.stride(2);
  const BiasView<T> bv = bias_view<T>(bias);
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  bool avx512 = false;
  if constexpr (std::is_same_v<T, float>) avx512 = sgemm::available() && !std::getenv("SEQFAST_CPU_NO_AVX512_ATTN");
  at::parallel_for(0, N * Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(G * std::max<int64_t>(kv_end, 1)), acc(G * Dv), inv(G);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / Hk, hk = t % Hk;
      if constexpr (std::is_same_v<T, float>) {
        if (avx512) {
          attn512::DecodeHead a;
          a.G = G;
          a.q = qp + n * sqn + hk * G * sqh;
          a.sq = sqh;
          a.D = q.size(3);
          a.k = kp + n * skn + hk * skh;
          a.sk = skl;
          a.v = vp + n * svn + hk * svh;
          a.sv = svl;
          a.Dv = Dv;
          a.kv_end = kv_end;
          if (bv.ptr) {
            a.bias = bv.ptr + n * bv.sn + hk * G * bv.sh;
            a.bsg = bv.sh;
            a.bsj = bv.sj;
          }
          a.scale = scale;
          a.out = op + (n * Hq + hk * G) * Dv;
          a.so = Dv;
          a.lse = lp + n * Hq + hk * G;
          attn512::decode_head(a, S.data());
          continue;
        }
      }
      const T* K = kp + n * skn + hk * skh;
      const T* V = vp + n * svn + hk * svh;
      const T* Q = qp + n * sqn + hk * G * sqh;
      int64_t j = 0;
      for (; j + 4 <= kv_end; j += 4) {  // four keys per pass: shares the q loads, independent reductions
        const T* kr = K + j * skl;
        for (int64_t g = 0; g < G; ++g) {
          T d4[4];
          av::dot4(Q + g * sqh, kr, skl, D, d4);
          for (int r = 0; r < 4; ++r) S[g * kv_end + j + r] = scale * d4[r];
        }
      }
      for (; j < kv_end; ++j) {
        const T* kr = K + j * skl;
        for (int64_t g = 0; g < G; ++g) S[g * kv_end + j] = scale * av::dot(Q + g * sqh, kr, D);
      }
      for (int64_t g = 0; g < G; ++g) {
        T* s = S.data() + g * kv_end;
        const int64_t h = hk * G + g;
        if (bv.ptr) {
          const T* b = bv.ptr + n * bv.sn + h * bv.sh;
          for (int64_t j = 0; j < kv_end; ++j) s[j] += b[j * bv.sj];
        }
        const T mx = av::row_max(s, kv_end);
        if (mx == ninf) {  // fully masked (or no keys): out 0, lse +inf
          std::fill(s, s + kv_end, T(0));
          inv[g] = T(0);
          lp[n * Hq + h] = std::numeric_limits<T>::infinity();
          continue;
        }
        const T l = av::row_exp_sub_sum(s, kv_end, mx);
        inv[g] = T(1) / l;
        lp[n * Hq + h] = mx + std::log(l);
      }
      std::fill(acc.begin(), acc.end(), T(0));
      for (j = 0; j + 4 <= kv_end; j += 4) {
        const T* vr = V + j * svl;
        for (int64_t g = 0; g < G; ++g) av::axpy4(acc.data() + g * Dv, vr, svl, S.data() + g * kv_end + j, 1, Dv);
      }
      for (; j < kv_end; ++j) {
        const T* vr = V + j * svl;
        for (int64_t g = 0; g < G; ++g) {
          const T p = S[g * kv_end + j];
          if (p != T(0)) av::axpy(acc.data() + g * Dv, vr, p, Dv);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* o = op + (n * Hq + hk * G + g) * Dv;
        for (int64_t c = 0; c < Dv; ++c) o[c] = acc[g * Dv + c] * inv[g];
      }
    }
  });
}

template <typename scalar_t>
void bwd_kernel(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& o, const at::Tensor& lse, const at::Tensor* bias, bool causal, double scale_d,
                at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const int64_t G = Hq / Hk;
  const acc_t scale = static_cast<acc_t>(scale_d);
  // Backward blocks (64 x 128): five GEMMs per block and private dK/dV rows; measured 1.5-1.9x torch causal as is.
  const int64_t Bq = std::min<int64_t>(std::max<int64_t>(Lq, 1), 64);
  const int64_t Bk = std::min<int64_t>(std::max<int64_t>(Lk, 1), 128);
  const int64_t nqb = (Lq + Bq - 1) / Bq;
  const int64_t nkb = (Lk + Bk - 1) / Bk;

  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const scalar_t* gp = go.const_data_ptr<scalar_t>();
  const scalar_t* opp = o.const_data_ptr<scalar_t>();
  const acc_t* lp = lse.const_data_ptr<acc_t>();
  const int64_t sqn = q.stride(0), sqh = q.stride(1), sql = q.stride(2);
  const int64_t skn = k.stride(0), skh = k.stride(1), skl = k.stride(2);
  const int64_t svn = v.stride(0), svh = v.stride(1), svl = v.stride(2);
  const int64_t sgn = go.stride(0), sgh = go.stride(1), sgl = go.stride(2);
  const int64_t son = o.stride(0), soh = o.stride(1), sol = o.stride(2);
  const BiasView<scalar_t> bv = bias_view<scalar_t>(bias);
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  scalar_t* dkp = dk.data_ptr<scalar_t>();
  scalar_t* dvp = dv.data_ptr<scalar_t>();

  // Work split: a task owns one kv head (n, hk) and a range [kb0, kb1) of its key blocks, so dK/dV of that range are
  // private to it. Normally one task per kv head covers all key blocks (dQ is then private too and written directly).
  // When N*Hk is smaller than the thread count, key blocks are split across tasks and each writes a private fp32
  // partial dQ that is summed afterwards.
  const int64_t nthreads = at::get_num_threads();
  int64_t splits = 1;
  if (N * Hk < nthreads && nkb > 1) splits = std::min<int64_t>(nkb, (nthreads + N * Hk - 1) / (N * Hk));
  const int64_t kb_per = (nkb + splits - 1) / std::max<int64_t>(splits, 1);
  splits = nkb > 0 ? (nkb + kb_per - 1) / kb_per : 1;
  std::vector<acc_t> dq_part;  // [splits, N, Hq, Lq, D] when splits > 1
  if (splits > 1) dq_part.assign(static_cast<size_t>(splits) * N * Hq * Lq * D, acc_t(0));

  // float32 on AVX-512: each query block's key range runs on attn512::bwd_block (same tasks, same dQ/dK/dV buffers).
  bool use_avx512 = false;
  if constexpr (std::is_same_v<scalar_t, float>)
    use_avx512 = sgemm::available() && !std::getenv("SEQFAST_CPU_NO_AVX512_ATTN");  // Bq <= kBq
  const int64_t ws512_size = use_avx512 ? attn512::bwd_workspace(D, Dv) : 0;

  at::parallel_for(0, N * Hk * splits, 1, [&](int64_t begin, int64_t end) {
    float* ws512 = use_avx512 ? sgemm::scratch_alloc(ws512_size) : nullptr;
    TORCH_CHECK(!use_avx512 || ws512 != nullptr, "seqfast sdpa backward: out of memory for the workspace");
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
      dVa.assign(nj * Dv, acc_t(0));
      const scalar_t* K = kp + n * skn + hk * skh;
      const scalar_t* V = vp + n * svn + hk * svh;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        const int64_t nh = n * Hq + h;
        const scalar_t* B = bv.ptr ? bv.ptr + n * bv.sn + h * bv.sh : nullptr;
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t i0 = qb * Bq, mq = std::min(Bq, Lq - i0);
          const int64_t kv_end = std::min(jhi, causal ? std::min(Lk, i0 + mq) : Lk);
          const scalar_t* Q = qp + n * sqn + h * sqh + i0 * sql;
          const scalar_t* dO = gp + n * sgn + h * sgh + i0 * sgl;
          const scalar_t* O = opp + n * son + h * soh + i0 * sol;
          acc_t* dQout = splits > 1 ? dq_part.data() + ((sp * N * Hq + nh) * Lq + i0) * D : dQa.data();
          if (splits == 1) std::fill(dQa.begin(), dQa.begin() + mq * D, acc_t(0));
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
            any_live |= std::isfinite(static_cast<double>(lser[r]));
          }
          if (any_live && use_avx512) {
            if constexpr (std::is_same_v<scalar_t, float>) {
              attn512::BwdBlock a;
              a.mq = mq;
              a.i0 = i0;
              a.q = Q;
              a.sq = sql;
              a.D = D;
              a.dout = dO;
              a.sdo = sgl;
              a.Dv = Dv;
              a.k = K;
              a.sk = skl;
              a.v = V;
              a.sv = svl;
              a.j_lo = jlo;
              a.kv_end = kv_end;
              if (B) {
                a.bias = B + i0 * bv.si;
                a.bsi = bv.si;
                a.bsj = bv.sj;
              }
              a.causal = causal;
              a.scale = scale;
              a.lse = lser.data();
              a.delta = delta.data();
              a.dq = dQout;
              a.sdq = D;
              a.dk = dKa.data();
              a.dv = dVa.data();
              attn512::bwd_block(a, ws512);
            }
          } else if (any_live) {
            for (int64_t j0 = jlo; j0 < kv_end; j0 += Bk) {
              const int64_t nk = std::min(Bk, kv_end - j0);
              mm_nt<scalar_t, acc_t>(mq, nk, D, scale, Q, sql, K + j0 * skl, skl, acc_t(0), S.data(), Bk);
              mask_block<scalar_t, acc_t>(S.data(), Bk, mq, nk, i0, j0, B, bv.si, bv.sj, causal);
              for (int64_t r = 0; r < mq; ++r) av::row_exp_sub(S.data() + r * Bk, nk, lser[r]);
              const scalar_t* Pp;
              if constexpr (kSame) {
                Pp = S.data();
              } else {
                to_operand<scalar_t, acc_t>(S.data(), P.data(), Bk, mq, nk);
                Pp = P.data();
              }
              // dV += P^T dO
              mm_tn<scalar_t, acc_t>(nk, Dv, mq, acc_t(1), Pp, Bk, dO, sgl, acc_t(1), dVa.data() + (j0 - jlo) * Dv,
                                     Dv);
              // dP = dO V^T ; dS = P * (dP - delta)
              mm_nt<scalar_t, acc_t>(mq, nk, Dv, acc_t(1), dO, sgl, V + j0 * svl, svl, acc_t(0), dS.data(), Bk);
              for (int64_t r = 0; r < mq; ++r) av::row_dsoftmax(S.data() + r * Bk, dS.data() + r * Bk, nk, delta[r]);
              const scalar_t* dSp;
              if constexpr (kSame) {
                dSp = dS.data();
              } else {
                to_operand<scalar_t, acc_t>(dS.data(), dSm.data(), Bk, mq, nk);
                dSp = dSm.data();
              }
              // dQ += scale dS K ; dK += scale dS^T Q
              mm_nn<scalar_t, acc_t>(mq, D, nk, scale, dSp, Bk, K + j0 * skl, skl, acc_t(1), dQout, D);
              mm_tn<scalar_t, acc_t>(nk, D, mq, scale, dSp, Bk, Q, sql, acc_t(1), dKa.data() + (j0 - jlo) * D, D);
            }
          }
          if (splits == 1) {
            scalar_t* dst = dqp + (nh * Lq + i0) * D;
            for (int64_t x = 0; x < mq * D; ++x) dst[x] = static_cast<scalar_t>(dQa[x]);
          }
        }
      }
      scalar_t* dKo = dkp + ((n * Hk + hk) * Lk + jlo) * D;
      scalar_t* dVo = dvp + ((n * Hk + hk) * Lk + jlo) * Dv;
      for (int64_t x = 0; x < nj * D; ++x) dKo[x] = static_cast<scalar_t>(dKa[x]);
      for (int64_t x = 0; x < nj * Dv; ++x) dVo[x] = static_cast<scalar_t>(dVa[x]);
    }
    if (ws512) sgemm::scratch_free(ws512, ws512_size);
  });

  if (splits > 1) {
    const int64_t total = N * Hq * Lq * D;
    at::parallel_for(0, total, 4096, [&](int64_t b, int64_t e) {
      for (int64_t x = b; x < e; ++x) {
        acc_t s = 0;
        for (int64_t sp = 0; sp < splits; ++sp) s += dq_part[sp * total + x];
        dqp[x] = static_cast<scalar_t>(s);
      }
    });
  }
}

// float32 forward on the AVX-512 block kernel (attention_avx512.h): same tasks as fwd_kernel (one per (n, h,
// query block), causal blocks interleaved for balance), each task one fwd_block call.
void fwd_avx512(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* bias, bool causal,
                double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const int64_t G = Hq / Hk, Bq = attn512::kBq;
  const int64_t nqb = (Lq + Bq - 1) / Bq;
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  const BiasView<float> bv = bias_view<float>(bias);
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t wsz = attn512::fwd_workspace(D, Dv);
  at::parallel_for(0, N * Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    float* ws = sgemm::scratch_alloc(wsz);
    TORCH_CHECK(ws != nullptr, "seqfast sdpa: out of memory for the attention workspace");
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nh = t / nqb, idx = t % nqb;
      const int64_t qb = query_block_order(idx, nqb, causal);
      const int64_t n = nh / Hq, h = nh % Hq, hk = h / G;
      attn512::FwdBlock a;
      a.i0 = qb * Bq;
      a.mq = std::min(Bq, Lq - a.i0);
      a.q = qp + n * q.stride(0) + h * q.stride(1) + a.i0 * q.stride(2);
      a.sq = q.stride(2);
      a.D = D;
      a.k = kp + n * k.stride(0) + hk * k.stride(1);
      a.sk = k.stride(2);
      a.v = vp + n * v.stride(0) + hk * v.stride(1);
      a.sv = v.stride(2);
      a.Dv = Dv;
      a.kv_end = causal ? std::min(Lk, a.i0 + a.mq) : Lk;
      if (bv.ptr) {
        a.bias = bv.ptr + n * bv.sn + h * bv.sh + a.i0 * bv.si;
        a.bsi = bv.si;
        a.bsj = bv.sj;
      }
      a.causal = causal;
      a.scale = static_cast<float>(scale);
      a.out = op + (nh * Lq + a.i0) * Dv;
      a.so = Dv;
      a.lse = lp + nh * Lq + a.i0;
      attn512::fwd_block(a, ws);
    }
    sgemm::scratch_free(ws, wsz);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sdpa_forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                const std::optional<at::Tensor>& bias, bool is_causal,
                                                double scale) {
  const at::Tensor q = blas_ready(q_), k = blas_ready(k_), v = blas_ready(v_);
  const int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2), Dv = v.size(3);
  at::Tensor out = at::empty({N, Hq, Lq, Dv}, q.options());
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({N, Hq, Lq}, q.options().dtype(lse_dtype));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const at::Tensor* bp = (bias.has_value() && bias->defined()) ? &*bias : nullptr;
  const int64_t Hk = k.size(1);
  if (Lq == 1 && q.scalar_type() != at::kBFloat16 && N * Hk >= at::get_num_threads()) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "seqfast_sdpa_decode",
                               [&] { decode_kernel<scalar_t>(q, k, v, bp, is_causal, scale, out, lse); });
    return {out, lse};
  }
  if (q.scalar_type() == at::kFloat && sgemm::available() && !std::getenv("SEQFAST_CPU_NO_AVX512_ATTN")) {
    fwd_avx512(q, k, v, bp, is_causal, scale, out, lse);
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "seqfast_sdpa_forward",
                                 [&] { fwd_kernel<scalar_t>(q, k, v, bp, is_causal, scale, out, lse); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward(const at::Tensor& grad_out, const at::Tensor& q_,
                                                             const at::Tensor& k_, const at::Tensor& v_,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const std::optional<at::Tensor>& bias, bool is_causal,
                                                             double scale) {
  const at::Tensor q = blas_ready(q_), k = blas_ready(k_), v = blas_ready(v_);
  const at::Tensor go = blas_ready(grad_out), o = blas_ready(out);
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor l = lse.to(lse_dtype).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    if (q.numel() == 0 || k.size(2) == 0) return {dq, dk, dv};
  }
  const at::Tensor* bp = (bias.has_value() && bias->defined()) ? &*bias : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "seqfast_sdpa_backward", [&] {
    bwd_kernel<scalar_t>(go, q, k, v, o, l, bp, is_causal, scale, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace seqfast
