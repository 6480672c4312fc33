// AVX2 float32 flash-attention forward block. See attention_avx2.h for the transposed layout and why.
// Compiled for AVX2 + FMA by the target pragma below; no ATen headers here (the rule of cpu/isa.h). The two products
// run on the own AVX2 GEMM (cpu/sgemm_nn.h, its own translation unit).
#include "attention/attention_avx2.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/config.h"
#include "cpu/isa.h"
#include "cpu/sgemm_nn.h"
#include "cpu/sgemm_nt.h"

namespace seqfast {
namespace attn_avx2 {

// Compiled for the baseline ISA, outside the AVX2 region: this is the guard (sgemm_nt::available(): AVX2 + FMA and
// the own AVX2 GEMMs allowed, which sgemm_nn shares).
bool blocks_available() { return sgemm_nt::available() && cpu::config().avx2_attention; }

int64_t fwd_workspace(int64_t D, int64_t Dv) { return (D + kBk + Dv + 3) * kBq; }

}  // namespace attn_avx2
}  // namespace seqfast

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX2_ATTN 1
SEQFAST_TARGET_AVX2_BEGIN
#include <immintrin.h>

#include "cpu/avx2_math.h"
#endif

namespace seqfast {
namespace attn_avx2 {

#ifdef SEQFAST_HAVE_AVX2_ATTN

constexpr int64_t kPv = 64;  // keys per exp + P V chunk (see the loop)

void fwd_block(const attn512::FwdBlock& a, float* ws) {
  const int64_t mq = a.mq, D = a.D, Dv = a.Dv;
  const int64_t nq8 = (mq + 7) / 8 * 8;  // query lanes computed: whole vectors (lanes past mq hold zeros of Q)
  const int nv = int(nq8 / 8);
  constexpr int kNv = int(kBq / 8);
  float* QT = ws;                // scale * Q^T: QT[d * kBq + i] = scale * q[i][d]
  float* ST = QT + D * kBq;      // S^T of the block [kBk keys][kBq queries], then P^T
  float* OT = ST + kBk * kBq;    // unnormalised output transposed [Dv][kBq]
  float* mrow = OT + Dv * kBq;   // running max per query
  float* lrow = mrow + kBq;      // running sum per query
  float* arow = lrow + kBq;      // this block's rescale factor per query
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m256 vninf = _mm256_set1_ps(ninf);

  // the softmax scale folded into Q^T once per task: the scores need no multiply
  for (int64_t i = 0; i < nq8; ++i) {
    const float* qr = a.q + i * a.sq;
    for (int64_t d = 0; d < D; ++d) QT[d * kBq + i] = i < mq ? a.scale * qr[d] : 0.f;
  }
  for (int64_t i = 0; i < kBq; ++i) {
    mrow[i] = ninf;
    lrow[i] = 0.f;
  }
  std::memset(OT, 0, sizeof(float) * Dv * kBq);

  for (int64_t j0 = 0; j0 < a.kv_end; j0 += kBk) {
    const int64_t nk = std::min(kBk, a.kv_end - j0);
    // S^T = K_blk (scale Q)^T: keys x queries, K broadcast in place
    sgemm_nn::gemm(nk, nq8, D, a.k + j0 * a.sk, a.sk, 1, QT, kBq, 0.f, ST, kBq);
    if (a.bias) add_mask_t(a, j0, nk, ST);
    if (a.causal && j0 + nk - 1 > a.i0) {  // the block crosses the diagonal
      for (int64_t j = 0; j < nk; ++j) std::fill(ST + j * kBq, ST + j * kBq + causal_masked(a, j0 + j, nq8), ninf);
    }
    // the block's max per query; operand order: MAXPS returns its second operand when one is NaN, so a NaN score is
    // skipped here and reaches l (and the output) through exp below
    __m256 mx[kNv], mu[kNv], sum[kNv];
    for (int v = 0; v < nv; ++v) mx[v] = vninf;
    for (int64_t j = 0; j < nk; ++j) {
      const float* s = ST + j * kBq;
      for (int v = 0; v < nv; ++v) mx[v] = _mm256_max_ps(_mm256_loadu_ps(s + 8 * v), mx[v]);
    }
    bool rescale = false;
    for (int v = 0; v < nv; ++v) {
      const __m256 mold = _mm256_loadu_ps(mrow + 8 * v);
      const __m256 mnew = _mm256_max_ps(mx[v], mold);
      // a query with every score -inf so far subtracts 0 (exp(-inf - 0) = 0), never -inf - -inf
      mu[v] = _mm256_blendv_ps(mnew, _mm256_setzero_ps(), _mm256_cmp_ps(mnew, vninf, _CMP_EQ_OQ));
      const __m256 alpha = avx2::exp_ps(_mm256_sub_ps(mold, mu[v]));  // 0 for a first live block
      rescale |= _mm256_movemask_ps(_mm256_cmp_ps(alpha, _mm256_set1_ps(1.f), _CMP_NEQ_UQ)) != 0;
      _mm256_storeu_ps(mrow + 8 * v, mnew);
      _mm256_storeu_ps(arow + 8 * v, alpha);
      sum[v] = _mm256_setzero_ps();
    }
    if (rescale && j0 > 0) {
      for (int64_t c = 0; c < Dv; ++c) {
        float* o = OT + c * kBq;
        for (int v = 0; v < nv; ++v)
          _mm256_storeu_ps(o + 8 * v, _mm256_mul_ps(_mm256_loadu_ps(o + 8 * v), _mm256_loadu_ps(arow + 8 * v)));
      }
    }
    // Per chunk of kPv keys: P^T = exp(S^T - m) in place, then O^T += V_chunk^T P_chunk^T with V broadcast in place
    // (element (c, j) at v[j * sv + c]). Why chunks: over a whole 256-key block a row tile's V lines (one per key) and
    // the 256 x 16 slice of P^T it multiplies (16 KB each) overflowed L1, and the product ran at ~65% of the core's
    // FMA rate; 64 keys keep both in L1 (and the chunk of P^T is still there from the exp).
    for (int64_t c0 = 0; c0 < nk; c0 += kPv) {
      const int64_t nc = std::min(kPv, nk - c0);
      for (int64_t j = c0; j < c0 + nc; ++j) {
        float* s = ST + j * kBq;
        for (int v = 0; v < nv; ++v) {
          const __m256 p = avx2::exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + 8 * v), mu[v]));
          _mm256_storeu_ps(s + 8 * v, p);
          sum[v] = _mm256_add_ps(sum[v], p);
        }
      }
      sgemm_nn::gemm(Dv, nq8, nc, a.v + (j0 + c0) * a.sv, 1, a.sv, ST + c0 * kBq, kBq, 1.f, OT, kBq);
    }
    for (int v = 0; v < nv; ++v) {
      const __m256 l = _mm256_loadu_ps(lrow + 8 * v);
      _mm256_storeu_ps(lrow + 8 * v, _mm256_fmadd_ps(l, _mm256_loadu_ps(arow + 8 * v), sum[v]));
    }
  }
  // out = O^T^T / l; a fully masked row (or no keys: l == 0) gives 0 with lse = -inf, as torch's output and the
  // contract of attention.h; a NaN score made l NaN, so out and lse are NaN
  for (int64_t i = 0; i < mq; ++i) {
    float* o = a.out + i * a.so;
    const float l = lrow[i];
    if (l != 0.f) {
      const float inv = 1.f / l;
      for (int64_t c = 0; c < Dv; ++c) o[c] = OT[c * kBq + i] * inv;
      a.lse[i] = mrow[i] + std::log(l);
    } else {
      std::fill(o, o + Dv, 0.f);
      a.lse[i] = ninf;
    }
  }
}

#else  // no x86 target regions: never available

void fwd_block(const attn512::FwdBlock&, float*) {}

#endif

}  // namespace attn_avx2
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX2_ATTN
SEQFAST_TARGET_END
#endif
