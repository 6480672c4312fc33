// AVX2 float32 flash-attention backward block. See attention_avx2.h (bwd_block) for the layout; the five products
// run on the own AVX2 GEMM (cpu/sgemm_nn.h). Compiled for AVX2 + FMA by the target pragma below; no ATen headers
// (the rule of cpu/isa.h).
#include <algorithm>
#include <cstring>
#include <limits>

#include "attention/attention_avx2.h"
#include "cpu/isa.h"
#include "cpu/sgemm_nn.h"

namespace seqfast {
namespace attn_avx2 {

int64_t bwd_workspace(int64_t D, int64_t Dv) { return (2 * D + Dv + 2 * kBkBwd + 2) * kBq; }

}  // namespace attn_avx2
}  // namespace seqfast

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX2_ATTN_BWD 1
SEQFAST_TARGET_AVX2_BEGIN
#include <immintrin.h>

#include "cpu/avx2_math.h"
#endif

namespace seqfast {
namespace attn_avx2 {

#ifdef SEQFAST_HAVE_AVX2_ATTN_BWD

void bwd_block(const attn512::BwdBlock& a, float* ws) {
  const int64_t mq = a.mq, D = a.D, Dv = a.Dv;
  const int64_t nq8 = (mq + 7) / 8 * 8;  // query lanes computed (lanes past mq: Q, dO zero, lse +inf, so P = dS = 0)
  const int nv = int(nq8 / 8);
  float* QT = ws;                  // scale Q^T [D][kBq]
  float* dOT = QT + D * kBq;       // dO^T [Dv][kBq]
  float* dQT = dOT + Dv * kBq;     // dQ^T accumulated [D][kBq]
  float* PT = dQT + D * kBq;       // P^T of a key block [kBkBwd][kBq]
  float* dST = PT + kBkBwd * kBq;  // scale dS^T of a key block
  float* lse = dST + kBkBwd * kBq;
  float* delta = lse + kBq;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < nq8; ++i) {
    const float* qr = a.q + i * a.sq;
    const float* dr = a.dout + i * a.sdo;
    for (int64_t d = 0; d < D; ++d) QT[d * kBq + i] = i < mq ? a.scale * qr[d] : 0.f;
    for (int64_t c = 0; c < Dv; ++c) dOT[c * kBq + i] = i < mq ? dr[c] : 0.f;
  }
  for (int64_t i = 0; i < kBq; ++i) {
    lse[i] = i < mq ? a.lse[i] : inf;  // +inf: P = 0 (a fully masked row, as sdpa_backward maps it, or no row)
    delta[i] = i < mq ? a.delta[i] : 0.f;
  }
  std::memset(dQT, 0, sizeof(float) * D * kBq);
  const __m256 vscale = _mm256_set1_ps(a.scale);

  for (int64_t j0 = a.j_lo; j0 < a.kv_end; j0 += kBkBwd) {
    const int64_t nk = std::min(kBkBwd, a.kv_end - j0);
    // P^T = exp(K_blk (scale Q)^T + mask - lse)
    sgemm_nn::gemm(nk, nq8, D, a.k + j0 * a.sk, a.sk, 1, QT, kBq, 0.f, PT, kBq);
    if (a.bias) add_mask_t(a, j0, nk, PT);
    for (int64_t j = 0; j < nk; ++j) {
      float* s = PT + j * kBq;
      for (int v = 0; v < nv; ++v)
        _mm256_storeu_ps(s + 8 * v, avx2::exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + 8 * v),
                                                               _mm256_loadu_ps(lse + 8 * v))));
    }
    const bool diag = a.causal && j0 + nk - 1 > a.i0;
    if (diag) {  // P = 0 where the key is causally masked
      for (int64_t j = 0; j < nk; ++j) std::fill(PT + j * kBq, PT + j * kBq + causal_masked(a, j0 + j, nq8), 0.f);
    }
    // dV += P^T dO (k = query, dO rows read in place)
    sgemm_nn::gemm(nk, Dv, mq, PT, kBq, 1, a.dout, a.sdo, 1.f, a.dv + (j0 - a.j_lo) * Dv, Dv);
    // dS^T = scale P^T (V_blk dO^T - delta)
    sgemm_nn::gemm(nk, nq8, Dv, a.v + j0 * a.sv, a.sv, 1, dOT, kBq, 0.f, dST, kBq);
    for (int64_t j = 0; j < nk; ++j) {
      const float* p = PT + j * kBq;
      float* ds = dST + j * kBq;
      for (int v = 0; v < nv; ++v) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(ds + 8 * v), _mm256_loadu_ps(delta + 8 * v));
        _mm256_storeu_ps(ds + 8 * v, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(p + 8 * v), d), vscale));
      }
    }
    // dQ^T += K_blk^T dS^T (K read in place: element (d, j) at k[j * sk + d]); dK += dS^T Q (Q rows in place)
    sgemm_nn::gemm(D, nq8, nk, a.k + j0 * a.sk, 1, a.sk, dST, kBq, 1.f, dQT, kBq);
    sgemm_nn::gemm(nk, D, mq, dST, kBq, 1, a.q, a.sq, 1.f, a.dk + (j0 - a.j_lo) * D, D);
  }
  for (int64_t i = 0; i < mq; ++i) {
    float* o = a.dq + i * a.sdq;
    for (int64_t d = 0; d < D; ++d) o[d] += dQT[d * kBq + i];
  }
}

#else

void bwd_block(const attn512::BwdBlock&, float*) {}

#endif

}  // namespace attn_avx2
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX2_ATTN_BWD
SEQFAST_TARGET_END
#endif
