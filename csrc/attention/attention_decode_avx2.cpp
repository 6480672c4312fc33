// AVX2 decoder step: see attention_decode_avx2.h for the method and why.
// Compiled for AVX2 + FMA by the target pragma below; no ATen headers here (the rule of cpu/isa.h).
#include "attention/attention_decode_avx2.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/config.h"
#include "cpu/isa.h"

namespace seqfast {
namespace attn_avx2 {

// Compiled for the baseline ISA, outside the AVX2 region: this is the guard.
bool available() { return cpu::has_avx2_fma() && cpu::config().avx2_decode; }

}  // namespace attn_avx2
}  // namespace seqfast

#ifdef SEQFAST_X86_TARGETS
#define SEQFAST_HAVE_AVX2_DECODE 1
SEQFAST_TARGET_AVX2_BEGIN
#include <immintrin.h>

#include "cpu/avx2_bf16.h"
#include "cpu/avx2_masks.h"
#include "cpu/avx2_reduce.h"
#include "cpu/avx2_math.h"
#endif

namespace seqfast {
namespace attn_avx2 {

#ifdef SEQFAST_HAVE_AVX2_DECODE
namespace {

using avx2::hmax8;
using avx2::hsum8;
using avx2::mask8;
using avx2::reduce8;

// 8 elements from p as floats.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return avx2::load_bf16(p); }  // bfloat16 bits
// The first n (< 8) elements from p as floats, the other lanes 0; nothing past p + n is read.
inline __m256 load_part(const float* p, int64_t n) { return _mm256_maskload_ps(p, mask8(n)); }
inline __m256 load_part(const uint16_t* p, int64_t n) { return avx2::load_bf16(p, n); }
inline float to_float(float x) { return x; }
inline float to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

// Rows [r0, r1) of a K or V head (n elements each, row stride ld) towards L2, kAhead rows before they are read. The
// hardware prefetchers follow one stream well but fall behind on these interleaved row reads from memory (4096 keys:
// 81% of a plain read without, on a Zen 3); from L3 they keep up, and the prefetch instructions cost more than they
// save (DecodeHead::prefetch). On a Zen 5 (1 thread, B16 H8 D64, share of a plain read of the same bytes): 256 keys
// (16.8 MB, in L3) 77% without, 63% with 16 rows ahead; 1024 keys (from memory) 67% without, 77% at 16 rows, 84% at
// 32 (2 threads: 83 / 89 / 92%), and each head's first V rows prefetched at the end of its K pass read +3-5%.
constexpr int64_t kAhead = 32;
template <typename E>
inline void prefetch_rows(const E* base, int64_t ld, int64_t r0, int64_t r1, int64_t n) {
  const int64_t bytes = n * int64_t(sizeof(E));
  for (int64_t r = r0; r < r1; ++r) {
    const char* p = reinterpret_cast<const char*>(base + r * ld);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
  }
}

// scores[g][j0 : j0 + nj] for one block of nj <= 8 keys, all G heads. Keys past nj repeat the block's last row (in
// bounds; their scores are not stored).
template <typename E>
void scores8(const DecodeHead<E>& a, int64_t j0, int64_t nj, float* scores) {
  const E* kr[8];
  for (int j = 0; j < 8; ++j) kr[j] = a.k + (j0 + std::min<int64_t>(j, nj - 1)) * a.sk;
  const int64_t D = a.D, L = a.kv_end;
  if (a.prefetch) prefetch_rows(a.k, a.sk, j0 + kAhead, std::min<int64_t>(j0 + kAhead + 8, L), D);
  for (int64_t g = 0; g < a.G; ++g) {
    const float* q = a.q + g * a.sq;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      s0 = _mm256_fmadd_ps(qv, load8(kr[0] + d), s0);
      s1 = _mm256_fmadd_ps(qv, load8(kr[1] + d), s1);
      s2 = _mm256_fmadd_ps(qv, load8(kr[2] + d), s2);
      s3 = _mm256_fmadd_ps(qv, load8(kr[3] + d), s3);
      s4 = _mm256_fmadd_ps(qv, load8(kr[4] + d), s4);
      s5 = _mm256_fmadd_ps(qv, load8(kr[5] + d), s5);
      s6 = _mm256_fmadd_ps(qv, load8(kr[6] + d), s6);
      s7 = _mm256_fmadd_ps(qv, load8(kr[7] + d), s7);
    }
    if (d < D) {  // the lanes past D are 0 in both operands (a NaN there could otherwise leak into the score)
      const int64_t n = D - d;
      const __m256 qv = load_part(q + d, n);
      s0 = _mm256_fmadd_ps(qv, load_part(kr[0] + d, n), s0);
      s1 = _mm256_fmadd_ps(qv, load_part(kr[1] + d, n), s1);
      s2 = _mm256_fmadd_ps(qv, load_part(kr[2] + d, n), s2);
      s3 = _mm256_fmadd_ps(qv, load_part(kr[3] + d, n), s3);
      s4 = _mm256_fmadd_ps(qv, load_part(kr[4] + d, n), s4);
      s5 = _mm256_fmadd_ps(qv, load_part(kr[5] + d, n), s5);
      s6 = _mm256_fmadd_ps(qv, load_part(kr[6] + d, n), s6);
      s7 = _mm256_fmadd_ps(qv, load_part(kr[7] + d, n), s7);
    }
    __m256 sc = _mm256_mul_ps(reduce8(s0, s1, s2, s3, s4, s5, s6, s7), _mm256_set1_ps(a.scale));
    if (a.bias) {
      const E* b = a.bias + g * a.bsg + j0 * a.bsj;
      alignas(32) float t[8] = {};
      for (int64_t j = 0; j < nj; ++j) t[j] = to_float(b[j * a.bsj]);
      sc = _mm256_add_ps(sc, _mm256_load_ps(t));
    }
    float* dst = scores + g * L + j0;
    if (nj == 8) _mm256_storeu_ps(dst, sc);
    else _mm256_maskstore_ps(dst, mask8(nj), sc);
  }
}

// out[c0 : c0 + nc] = inv * sum_j p[j] v[j][c0 : c0 + nc], nc <= 64 columns in 8 accumulators. FULL: nc == 64.
template <bool FULL, typename E>
void pv64(const DecodeHead<E>& a, const float* p, int64_t c0, int64_t nc, float inv, float* out) {
  __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0, o4 = o0, o5 = o0, o6 = o0, o7 = o0;
  const E* v = a.v + c0;
  // lane counts of the 8 column vectors (FULL: 8 each); a vector with none is never loaded
  int64_t n[8];
  for (int c = 0; c < 8; ++c) n[c] = FULL ? 8 : std::clamp<int64_t>(nc - 8 * c, 0, 8);
  auto ld = [&](const E* r, int c) {
    if constexpr (FULL) return load8(r + 8 * c);
    else return n[c] == 8 ? load8(r + 8 * c) : n[c] > 0 ? load_part(r + 8 * c, n[c]) : _mm256_setzero_ps();
  };
  for (int64_t j = 0; j < a.kv_end; ++j) {
    if (a.prefetch && j + kAhead < a.kv_end) prefetch_rows(v, a.sv, j + kAhead, j + kAhead + 1, nc);
    const __m256 pj = _mm256_broadcast_ss(p + j);
    const E* r = v + j * a.sv;
    o0 = _mm256_fmadd_ps(pj, ld(r, 0), o0);
    o1 = _mm256_fmadd_ps(pj, ld(r, 1), o1);
    o2 = _mm256_fmadd_ps(pj, ld(r, 2), o2);
    o3 = _mm256_fmadd_ps(pj, ld(r, 3), o3);
    o4 = _mm256_fmadd_ps(pj, ld(r, 4), o4);
    o5 = _mm256_fmadd_ps(pj, ld(r, 5), o5);
    o6 = _mm256_fmadd_ps(pj, ld(r, 6), o6);
    o7 = _mm256_fmadd_ps(pj, ld(r, 7), o7);
  }
  const __m256 s = _mm256_set1_ps(inv);
  const __m256 res[8] = {o0, o1, o2, o3, o4, o5, o6, o7};
  for (int c = 0; c < 8; ++c) {
    if (n[c] == 8) _mm256_storeu_ps(out + c0 + 8 * c, _mm256_mul_ps(res[c], s));
    else if (n[c] > 0) _mm256_maskstore_ps(out + c0 + 8 * c, mask8(n[c]), _mm256_mul_ps(res[c], s));
  }
}

template <typename E>
void decode(const DecodeHead<E>& a, float* scores) {
  const int64_t L = a.kv_end;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t j0 = 0; j0 < L; j0 += 8) scores8(a, j0, std::min<int64_t>(8, L - j0), scores);
  // the first V rows, which pv64's look-ahead never reaches, while the softmax runs
  if (a.prefetch) prefetch_rows(a.v, a.sv, 0, std::min<int64_t>(kAhead, L), a.Dv);
  for (int64_t g = 0; g < a.G; ++g) {
    float* s = scores + g * L;
    float* out = a.out + g * a.so;
    // max over the keys; operand order: MAXPS returns its second operand when one is NaN, so NaN scores are
    // skipped here (as attention_rows.inc's row_max does) and reach the output through exp below
    __m256 mx = _mm256_set1_ps(ninf);
    int64_t j = 0;
    for (; j + 8 <= L; j += 8) mx = _mm256_max_ps(_mm256_loadu_ps(s + j), mx);
    float m = hmax8(mx);
    for (; j < L; ++j) m = s[j] > m ? s[j] : m;
    if (m == ninf) {  // every key masked (or no keys): out 0 and lse -inf, or NaN where a score is NaN
      bool nan = false;
      for (int64_t i = 0; i < L; ++i) nan |= s[i] != s[i];
      const float fill = nan ? std::numeric_limits<float>::quiet_NaN() : 0.f;
      std::fill(out, out + a.Dv, fill);
      a.lse[g] = nan ? fill : ninf;
      continue;
    }
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= L; j += 8) {
      const __m256 e = avx2::exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
      _mm256_storeu_ps(s + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    float l = hsum8(sum);
    if (j < L) {
      const __m256i tm = mask8(L - j);
      const __m256 e = _mm256_and_ps(_mm256_castsi256_ps(tm),
                                     avx2::exp_ps(_mm256_sub_ps(_mm256_maskload_ps(s + j, tm), mv)));
      _mm256_maskstore_ps(s + j, tm, e);
      l += hsum8(e);
    }
    a.lse[g] = m + std::log(l);
    const float inv = 1.f / l;
    int64_t c0 = 0;
    for (; c0 + 64 <= a.Dv; c0 += 64) pv64<true>(a, s, c0, 64, inv, out);
    if (c0 < a.Dv) pv64<false>(a, s, c0, a.Dv - c0, inv, out);
  }
}

}  // namespace

void decode_head(const DecodeHead<float>& a, float* scores) { decode(a, scores); }
void decode_head(const DecodeHead<uint16_t>& a, float* scores) { decode(a, scores); }

#else  // no x86 target regions: never available

void decode_head(const DecodeHead<float>&, float*) {}
void decode_head(const DecodeHead<uint16_t>&, float*) {}

#endif

}  // namespace attn_avx2
}  // namespace seqfast

#ifdef SEQFAST_HAVE_AVX2_DECODE
SEQFAST_TARGET_END
#endif
