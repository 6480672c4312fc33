// The GEMM entry point; see gemm.h. The only translation unit that declares BLAS symbols.
#include "cpu/gemm.h"

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "cpu/config.h"
#include "cpu/gemv_avx512.h"
#include "cpu/isa.h"
#include "cpu/sgemm_nn.h"
#include "cpu/sgemm_wt.h"
#include "cpu/team.h"

extern "C" {
// Fortran BLAS (column major), exported by the x86 torch wheels' statically linked MKL; weak: absent elsewhere.
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// MKL CBLAS enums: 102 column major, 111 no transpose, 112 transpose, 151 packed, 161 the A matrix. MKL_BF16 is
// uint16_t; LP64 ints.
void cblas_gemm_bf16bf16f32(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                            float*, int) __attribute__((weak));
size_t cblas_sgemm_pack_get_size(int, int, int, int) __attribute__((weak));
void cblas_sgemm_pack(int, int, int, int, int, int, float, const float*, int, float*) __attribute__((weak));
void cblas_sgemm_compute(int, int, int, int, int, int, const float*, int, const float*, int, float, float*, int)
    __attribute__((weak));
}

namespace seqfast {
namespace gemm {

template <>
bool blas_available<float>() {
  return sgemm_ != nullptr;
}
template <>
bool blas_available<double>() {
  return dgemm_ != nullptr;
}
template <>
bool blas_available<at::BFloat16>() {
  return cblas_gemm_bf16bf16f32 != nullptr;
}

namespace {

// Column-major C(m x n, ldc) = alpha op(A) op(B) + beta C through ATen on views of the raw buffers.
template <typename T, typename A>
void cm_aten(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const T* a, int64_t lda, const T* b,
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

struct BlasArgs {
  int m, n, k, lda, ldb, ldc;
  char ta, tb;
};

// BLAS wants ld >= the rows of the stored matrix even when that dimension is 1.
BlasArgs blas_args(bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  lda = std::max<int64_t>({lda, ta ? k : m, 1});
  ldb = std::max<int64_t>({ldb, tb ? n : k, 1});
  return {int(m), int(n), int(k), int(lda), int(ldb), int(ldc), ta ? 'T' : 'N', tb ? 'T' : 'N'};
}

}  // namespace

// The own AVX2 kernels run on every CPU with AVX2 + FMA, AVX-512 ones included: the wheel's MKL takes its AVX2 path
// on AMD cores, and there the own kernels' reading the weights in place beat it on the cell steps (Zen 5, AMD EPYC
// family 26, same-process A/B, no grad, torch's time over seqfast's with them / without: RNNCell B32 H1024 1.58 /
// 1.03x, LSTMCell B64 H512 1.46 / 1.07x, GRUCell B256 H512 1.25 / 1.04x, LSTMCell B8 H128 2.79 / 2.04x; training
// LSTMCell B64 H512 1.52 / 1.25x, GRUCell B32 H512 1.41 / 1.02x). Where the CPU has AVX-512 the own AVX-512 GEMM
// (sgemm.h) keeps what it owns: see nt_in_regions and kMinOwnRows.
bool nt_available() { return sgemm_nt::available(); }

// (gemm.h) MKL, the BLAS of torch's x86 wheels, runs its own AVX-512 kernels on Intel CPUs (cpu::is_intel), where the
// measurements below, made against MKL's generic path on AMD EPYCs, do not hold. config().blas_native forces the answer
// either way (tests, A/B). There the BLAS takes every product with a row-major B (the backward's dx = dgates @ W and
// weight gradients dW = dgates^T @ x) and products A @ W^T from kBlasMinRows (129) rows; the own forms keep the
// products A @ W^T of fewer rows (the steps' gate products). Measured on an Intel Xeon (family 6 model 167, AVX-512 +
// AMX, 2 threads; mm_f32 with the own kernels / torch.mm, GFLOP/s, M x K x N): dx 8x4096x1024 69 / 98, 32x2048x512 167
// / 230, 256x4096x1024 254 / 309 (2x1024x256 89 / 49 the exception); dW 4096x1x1024 12 / 26, 4096x8x1024 105 / 166,
// 2048x32x512 242 / 346, 4096x1024x1024 278 / 329; A @ W^T at K 512-1024, N 2048-4096, M 512-2048 259-289 / 303-357,
// against M 8 181 / 72 (the broadcast form), M 16 229 / 121, M 64 288 / 234, M 128 302 / 279, M 256 283 / 285 (K 1024,
// N 4096), and at (1024, 1024) M 256 the broadcast form's 268 against 294. Module A/B, own / BLAS choice: LSTMCell B8
// H1024 training step 10.5 / 8.1 ms (torch's op 8.1); with the BLAS from 512 rows / from 129, torch's time over
// seqfast's (same process, 7 rounds): RNNCell B256 H1024 no-grad 0.86 / 1.06x, training 0.91 / 1.05x, LSTMCell B256
// H1024 no-grad 0.90 / 1.05x, B256 H512 training 0.92 / 1.20x.
bool blas_native() {
  const int64_t forced = cpu::config().blas_native;
  if (forced >= 0) return forced > 0 && sgemm_ != nullptr;
  return sgemm_ != nullptr && cpu::has_avx512() && cpu::is_intel();
}

namespace {
// Rows from which a product runs on the own AVX-512 GEMM (sgemm.h), B packed per call, where the CPU has it: packing
// costs about as much per element as ~50 multiply-adds, and each packed element serves M rows. Zen 5 (AMD EPYC family
// 26), GFLOP/s of the packed AVX-512 GEMM / the dot-product form on AVX-512 (gemm_nt) / MKL, 2 threads, A [M, K] @
// W [N, K]^T: 8x512x2048 152 / 231 / -, 16x512x2048 275 / 292 / -, 32x256x1024 318 / 307 / 156, 64x1024x2048 383 /
// 347 / 186, 128x512x1536 460 / 346 / 197, 256x1024x1536 441 / 325 / 183; A @ B (row-major B, the backward's dx):
// 32x2048x512 358 against MKL's 160 and the outer-product AVX2 kernel's 225, 64x2048x512 426 / 183 / 219,
// 128x3072x1024 365 / 180 / -. (On the Zen 4 this was tuned on first, against MKL alone, it paid from 256 rows.)
// With the dot-product form's AVX-512 tile widened to 8 W rows (sgemm_nt_body.inc), products A W^T of 32-63 rows whose
// rows are long (K > 4 M, where the AVX2 packing kernel would not take them either: ntp_prefers) went back to it:
// module steps, same process, packed / dot-product form time: RNNCell B32 H1024 1.09x, B32 H256 1.08x, GRUCell B32
// H512 1.01x, LSTMCell B32 H256 1.01x; at 64 rows the packed GEMM kept its lead (LSTMCell B64 H512 0.89x, RNNCell B64
// H512 0.92x, GRUCell B64 H256 0.64x; GRUCell B64 H1024 1.10x the exception). Shorter rows stay on the packed GEMM
// from 32 (moving them to the AVX2 packing kernel read bfloat16 LSTMCell B32 H128 0.91-0.97x torch in two sweeps,
// 1.05-1.14x before), and so do products A @ B (K = 0 here: 32x2048x512 358 GFLOP/s against the AVX2 kernel's 225).
constexpr int64_t kMinOwnRows = 32;
// (blas_native, above; wt_takes keeps its 129-256 rows only where it is false)
constexpr int64_t kBlasMinRows = 129;
inline bool blas_rows(int64_t M) { return M >= kBlasMinRows && blas_native(); }

inline bool own_rows(int64_t M, int64_t K = 0) {
  return sgemm::available() && M >= kMinOwnRows && (M >= 2 * kMinOwnRows || K == 0 || 4 * M >= K) && !blas_rows(M);
}
}  // namespace

// Whether the single-threaded entry (cm: the fused loops' per-step products, attention's blocks) and the sequence
// loops' choices run the own AVX2 kernels: on CPUs without the AVX-512 GEMM only. With it the loops pack their
// weights once for that GEMM, which beat the AVX2 kernels there (Zen 5, same-process A/B, no grad, the AVX2 kernels
// in the loops too / not: GRU T32 B64 H512 0.68x, RNN T32 B256 H512 0.70x, GRU T32 B8 H1024 0.82x).
bool nt_in_regions() { return nt_available() && !sgemm::available(); }

// Whether the own AVX2 kernel should take an A [M, K] @ W^T product. Its dot products pay a horizontal reduction per
// output, which short rows (small K) do not amortise, while BLAS packs its operands once per call, which many rows of
// A (large M) do amortise. Measured on the Zen 3 EPYC (2 threads, N = 4K, `python benchmarks/gemm_nt.py`): the own
// kernel won at K >= 256 while M < 2K (1.2-1.8x) and at K 64-128 while M < K (1.0-1.3x); it tied at M = K = 128 and
// lost at M >= 2K (K 64-128: 0.5-0.7x; M 1024-2048 at K 256-512: 0.86-0.89x).
inline bool nt_prefers(int64_t M, int64_t K) { return K >= 256 ? M < 2 * K : M < K; }

// The same choice for a product split over the team (linear_out, mm): below about 2^20 multiply-adds BLAS's threading
// costs more than its packing saves. A [64, 64] @ W [64 - 256, 64]^T (the cells at batch 64, hidden 64) ran 1.03-1.63x
// faster on the own kernel (two same-process runs of the interleaved timing at N = 64, 192, 256, and one of
// `python benchmarks/gemm_nt.py`: 1.44x / 1.02x at N = 64 / 256), while at M = K = 128 (2^21 and up) the two tied
// (0.92-1.10x). Not for short rows, whose dot products are mostly the horizontal reduction: a weight gradient of
// a batch-1 step (dW = dgates^T x, K = 1) ran 1.8x (H 64) to 8x (H 256) slower on the own kernel. Single-threaded
// calls (cm, inside a region) keep nt_prefers: there BLAS does not thread, and at K = 64 it matched or beat the own
// kernel (64x64x64 9.8 against 10.7 us, 128x128x64 27.4 against 38.9).
inline bool nt_prefers_team(int64_t M, int64_t N, int64_t K) {
  return (nt_prefers(M, K) || (K >= 64 && M * N * K <= (int64_t(1) << 20))) && !blas_rows(M);
}

// Whether an A [M, K] @ W^T product split over the team should run the outer-product kernel packing W as it goes
// (ntp_parallel) rather than the dot-product kernel or BLAS. Packing costs a transpose and a store per weight element
// and each packed element then serves M rows, so it pays from more rows the longer the rows of W (the more of it to
// pack). Measured on the Zen 3 EPYC (2 threads, N = 4K, `python benchmarks/gemm_nt.py`, GFLOP/s BLAS / dot / pack):
// K 64: M 32 66 / 81 / 98, M 2048 154 / 104 / 179; K 128: M 32 85 / 124 / 133, M 512 163 / 130 / 180; K 256: M 64
// 118 / 150 / 152, M 2048 178 / 156 / 190; K 1024: M 128 105 / 158 / 151, M 256 132 / 154 / 164. At K 512 dot and
// pack tied from M 128 (154-173 against 159-170).
// Measured from K 64; shorter rows (an outer product, K 1: a batch-1 weight gradient through mm) keep BLAS.
inline bool ntp_prefers(int64_t M, int64_t K) {
  return M >= 32 && K >= 64 && 4 * M >= K && cpu::config().avx2_pack && !blas_rows(M);
}

// Whether the own AVX2 outer-product kernel (sgemm_nn.h) should take an A [M, K] @ B [K, N] product. Measured as
// above: it won at M <= 32 (8x512x128 101 vs 56 GF/s, 16x256x1024 99 vs 73, 32x2048x512 139 vs 116: the backward's
// per-step dh = dgates W_hh and small cells), tied at M 64-1024 and lost from M 2048 (0.6-0.8x: the weight gradients
// over all steps, where BLAS's packing pays). A B past 8 MB streams from memory, where BLAS read it faster (LSTMCell
// B8 H1024 training: 18.5 ms own, 16.8 BLAS), so it stays there too.
// Where the CPU has AVX-512, a single row (a batch-1 step's dx = dg W) stays on BLAS, whose GEMV there read W at up to
// 2.4x the kernel's rate (Zen 5, mm_f32 against torch.mm, 15 rounds: 1x2048x512 99 / 48 us, 1x3072x1024 335 / 135 us,
// 1x1024x256 13.5 / 11.8 us), while from 2 rows the kernel ran 1.3-3.3x faster (2x1024x256 13 / 25 us, 4x2048x512
// 56 / 189 us, 16x2048x512 146 / 300 us, 64x2048x512 587 / 746 us).
inline bool blas_keeps_row(int64_t M) { return M == 1 && sgemm::available(); }
inline bool nn_prefers(int64_t M, int64_t K, int64_t N) {
  return M <= 32 && K * N <= (int64_t(1) << 21) && !blas_keeps_row(M) && !blas_native();
}

// The same choice for a product split over the team (matmul_out, mm), re-measured after the remainder tiles' fix
// (2 threads, Zen 3, GFLOP/s BLAS / in place / packing): dx = dgates @ W at 64 rows still won (K 512 N 128 107 / 144 /
// 120, K 2048 N 512 104 / 109 / 108, K 4096 N 1024 92 / 99 / 94), so did dW = dgates^T @ x over a batch of 2-8 (4H x
// B x H: 512x8x128 44 / 80 / 78, 4096x8x1024 40 / 80 / 86; back-to-back calls, BLAS / own us: 1024x2x256 46 / 28,
// 2048x4x512 167 / 129, 2048x8x512 205 / 158), and a B beyond 8 MB no longer lost (8x4096x1024 41 / 88 / 53). At a
// batch of 1 BLAS's outer-product path won (256x1x256 8 / 11 us, 2048x1x512 96 / 121); at 16 the two tied (2048x16x512
// 261 / 278 us, 4096x16x1024 1318 / 1221); at 32 too (2048x32x512 101 / 99 / 103 GFLOP/s), and the LSTMCell B32 H512
// training step read 0.93-0.98x with those on the own kernel (same-process A/B): BLAS keeps them, as it keeps 256+
// rows with a longer k (4096x256x1024 162 / 116 / 134). Module A/B (on / off, training step): RNNCell B64 H512
// 1.14-1.22x, LSTMCell B8 H512 1.09-1.25x, GRUCell B16 H512 1.08x, LSTMCell B64 H512 1.06x, GRUCell B64 H1024 1.06x.
inline bool nn_prefers_team(int64_t M, int64_t K, int64_t N) {
  return !blas_keeps_row(M) && !blas_native() &&
         (nn_prefers(M, K, N) || ((M <= 64 || (K >= 2 && K <= 8)) && cpu::config().avx2_pack));
}
// Among those, the packing form where many rows meet a wide B (its rows a long, often power-of-two stride apart):
// 4096x8x1024 80 / 86 GFLOP/s; with few rows the copy is not repaid (8x4096x1024 88 / 53 GFLOP/s).
inline bool nnp_prefers(int64_t M, int64_t N) { return M >= 64 && N >= 512 && cpu::config().avx2_pack; }

void cm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
        int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  // op(A) = A^T and op(B) = B with unit alpha: the row-major C^T [n, m] = B^T [n, k] @ A^T [m, k]^T, both operands
  // k-contiguous: the dot-product form of the own AVX2 kernel (single-threaded here, as BLAS is inside a region).
  if (ta && !tb && alpha == 1.f && (beta == 0.f || beta == 1.f) && nt_in_regions() && nt_prefers(n, k))
    return sgemm_nt::gemm(n, m, k, b, ldb, a, lda, beta, c, ldc);
  // op(A) = A: the row-major C^T [n, m] = op(B)^T [n, k] @ A^T [k, m], A^T row-major with row stride lda: the own
  // AVX2 outer-product kernel reads it in place.
  if (!ta && alpha == 1.f && (beta == 0.f || beta == 1.f) && nt_in_regions() && nn_prefers(n, k, m))
    return tb ? sgemm_nn::gemm(n, m, k, b, 1, ldb, a, lda, beta, c, ldc)
              : sgemm_nn::gemm(n, m, k, b, ldb, 1, a, lda, beta, c, ldc);
  if (sgemm_ == nullptr || k <= 0) return cm_aten<float, float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const BlasArgs x = blas_args(ta, tb, m, n, k, lda, ldb, ldc);
  sgemm_(&x.ta, &x.tb, &x.m, &x.n, &x.k, &alpha, a, &x.lda, b, &x.ldb, &beta, c, &x.ldc);
}

void cm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
        const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (dgemm_ == nullptr || k <= 0)
    return cm_aten<double, double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const BlasArgs x = blas_args(ta, tb, m, n, k, lda, ldb, ldc);
  dgemm_(&x.ta, &x.tb, &x.m, &x.n, &x.k, &alpha, a, &x.lda, b, &x.ldb, &beta, c, &x.ldc);
}

void cm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const at::BFloat16* a, int64_t lda,
        const at::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (cblas_gemm_bf16bf16f32 == nullptr || k <= 0)
    return cm_aten<at::BFloat16, float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const BlasArgs x = blas_args(ta, tb, m, n, k, lda, ldb, ldc);
  cblas_gemm_bf16bf16f32(102, ta ? 112 : 111, tb ? 112 : 111, x.m, x.n, x.k, alpha,
                         reinterpret_cast<const uint16_t*>(a), x.lda, reinterpret_cast<const uint16_t*>(b), x.ldb,
                         beta, c, x.ldc);
}

bool mkl_pack_available() {
  return cblas_sgemm_compute && cblas_sgemm_pack && cblas_sgemm_pack_get_size && cpu::config().mkl_pack;
}

void PackedWeight::init(bool trans, int64_t m, int64_t nmax, int64_t k, const float* a, int64_t lda, int64_t uses,
                        int64_t decide_m) {
  const int64_t dm = decide_m > 0 ? decide_m : m;
  if (sgemm::available() && m > 0) {
    // Row-major view: C[n, m] = B[n, k] @ op(A)^T, i.e. the own GEMM's packed operand is op(A)^T (k x m).
    m_ = m;
    k_ = k;
    if (trans) own_.pack(k, m, a, 1, lda);
    else own_.pack(k, m, a, lda, 1);
    if (own_.ok()) return;
  }
  // Narrow slices (< 128 units) gained nothing from MKL's packing when this was tuned; they keep the plain GEMM (cm).
  // Where the own AVX2 kernel takes the product (nt_prefers) it reads the weight in place, unpacked: MKL's packing
  // costs milliseconds per call on this path and its packed GEMM no longer beat the own kernel per step. Same-process
  // A/B on the Zen 3 (mkl_pack on / off, no grad), packed / in place: GRU B64 H512 T1 5.0 / 1.5 ms, T32 44.2 / 40.8;
  // GRU B64 H1024 T32 168.8 / 158.7 (this once read 233 / 287 ms against the own kernel's earlier loop order); GRU
  // B48 H512 T32 33.4 / 30.2; GRU B256 H256 T1 3.2 / 1.5, T32 57.8 / 57.3. MKL keeps the rows the own kernel does not
  // take (M >= K, or 2K from K 256), packed there from 128 units.
  if (trans && nt_in_regions() && nt_prefers(nmax, k)) {
    // Packed for the outer-product kernel when the slice serves 2+ products and fits a quarter of this core's L2.
    // Same-process A/B on the Zen 3 (avx2_pack on / off, no grad): GRU T32 B16 H256 1.09x, T32 B32 H64 1.12x, T32
    // B64 H128 1.14x, T2 B64 H128 1.10x, T4 B32 H256 1.03x; LSTM (GEMM loop) T32 B128 H256 1.09x. Larger slices
    // come from L3 and their packing is repaid only by enough rows over the steps (kBigPackRows): GRU H512 (512 KB
    // slices at 2 threads) read 0.94x at T2 B32; packed / in place, same process, 15 rounds, both orders, no grad:
    // GRU T32 B16 H1024 1.07-1.14x, B64 H1024 1.04-1.05x, B128 H512 1.03x, T8 B64 H1024 / B128 H512 1.04x, RNN T32
    // B16-64 H1024 1.02-1.09x, LSTM (GEMM loop) T32 B128-256 H256 0.99-1.02x, training 0.98-1.05x; below the bound,
    // T32 B8 H1024 0.97-1.03x, T4 B8 H1024 0.62x, T2 B32 H512 0.92x.
    const int64_t floats = sgemm_nn::packed_size(m, k);
    constexpr int64_t kBigPackRows = 512;  // rows x steps from which a slice above L2 / 4 is packed
    if (uses >= 2 && cpu::config().avx2_pack && m > 0 && k > 0 &&
        (int64_t(sizeof(float)) * sgemm_nn::packed_size(dm, k) <= cpu::l2_cache_bytes() / 4 ||
         uses * nmax >= kBigPackRows)) {
      nn_.reset(floats);
      if (nn_.ok()) {
        m_ = m;
        k_ = k;
        sgemm_nn::pack_rows(a, lda, m, k, nn_.get());
      }
    }
    return;
  }
  if (!mkl_pack_available() || m <= 0 || dm < 128 || k <= 0 || nmax <= 0) return;
  m_ = m;
  k_ = k;
  const size_t bytes = (cblas_sgemm_pack_get_size(161, int(m), int(nmax), int(k)) + 63) / 64 * 64;
  mkl_ = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (mkl_) cblas_sgemm_pack(102, 161, trans ? 112 : 111, int(m), int(nmax), int(k), 1.f, a, int(lda), mkl_);
}

void PackedWeight::mm(int64_t n, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) const {
  if (own_.ok()) return sgemm::gemm(n, m_, k_, b, ldb, 1, own_.p, beta, c, ldc);
  if (nn_.ok()) return sgemm_nn::gemm_packed(n, m_, k_, b, ldb, nn_.get(), beta, c, ldc);
  if (n > 0) cblas_sgemm_compute(102, 151, 111, int(m_), int(n), int(k_), mkl_, int(m_), b, int(ldb), beta, c, int(ldc));
}

PackedWeight::~PackedWeight() { std::free(mkl_); }

// Columns of the least piece of a shared team split (cpu::parallel_for_shared) whose output has over 64 rows: each
// piece writes every row of C in runs of its width, and 16-64-column pieces of a weight gradient (C [4H, K], 4096 rows
// at H1024) ran LSTMCell B8 H512-1024 training steps 7-22% slower than the fixed split's 512-column halves.
inline int64_t min_piece_cols(int64_t M) { return M > 64 ? 256 : 1; }

// c[M, N] = beta c + a @ w^T (+ bias) on the own AVX2 kernel, W rows split over the team in whole 4-row tiles.
void nt_parallel(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* w, int64_t ldw, float beta,
                 float* c, int64_t ldc, const float* bias) {
  const int64_t groups = (N + 3) / 4;
  const int64_t per_group = std::max<int64_t>(1, 4 * M * K);
  cpu::parallel_for_shared(groups, per_group, min_piece_cols(M) / 4, [&](int64_t g0, int64_t g1) {
    const int64_t j0 = 4 * g0, j1 = std::min(N, 4 * g1);
    sgemm_nt::gemm(M, j1 - j0, K, a, lda, w + j0 * ldw, ldw, beta, c + j0, ldc, bias ? bias + j0 : nullptr);
  });
}

// The broadcast form against the dot-product form and the packed GEMM (B packed per call), Zen 5 (AMD EPYC family 26),
// 2 threads, GFLOP/s wt / dot / packed, A [M, K] @ W [N, K]^T: M 8 (K 1024, N 1024) 192 / 250 / 241, M 12 (512, 1024)
// 299 / 324 / 319, M 16 (1024, 1024) 370 / 289 / 282, (128, 512) 302 / 244 / 227, M 32 (1024, 1024) 458 / 319 / 317,
// (64, 256) 255 / 187 / 179, M 64 (1024, 3072) 499 / 400 / 354, (256, 1024) 386 / 368 / 417, M 128 (512, 2048) 487 /
// 405 / 472, (2048, 2048) 485 / 380 / 423, (128, 512) 438 / 324 / 457; from 128 rows on the packed GEMM's packing pays
// where W fits the caches: M 256 (1024, 1024) 479 / 348 / 494, (512, 2048) 491 / 418 / 496, against (2048, 4096) 472 /
// 387 / 375, (2048, 1536) 465 / 383 / 435, M 192 (1024, 2048) 492 / 409 / 471. Below 16 rows a panel is mostly
// padding; there the narrow form (k pairs interleaved, sgemm_wt.h) against the dot-product form, same machine, 2
// threads, GFLOP/s (K, N): M 16 (1024, 1024) 421 / 308 (the panel form's 370 above), (512, 2048) 445 / 333, (128, 512)
// 295 / 247; M 13-15 (1024, 1024) 335-384 / 307-331, M 14 (256, 1024) 355 / 320; M 11-12 (1024, 1024) 284-315 /
// 275-299, (512, 1024) 311 / 321; M 9-10 (1024, 1024) 242-249 / 280-290 (half of the second vector padding); M 8
// (1024, 1024) 327 / 266, (512, 2048) 348 / 295, (256, 1024) 308 / 280, M 7 (1024, 1024) 289 / 247, (256, 1024) 269 /
// 275; M 5 (512, 2048) 217 / 242. From 129 rows the bound was W of 2^21 elements until 2026-12-07; from 2^20 the
// packing costs more than it saves once W is out of cache, as between the calls of a model: same process, times
// packed / broadcast form with a 64 MB write between calls, M 136-256 at (512, 2048), (1024, 1024), (256, 4096), (768,
// 1536), (1024, 1536) 1.09-1.23x; called back to back (W in the L3) 0.96-1.06x (M 136 (512, 2048) 0.96x, M 256 0.99x,
// (1024, 1536) 1.06x). The LSTM T32 B8 H512 layer's input projection: 1.13x / 1.08x; GRUCell B160-256 H512 1.00-1.06x.
bool wt_takes(int64_t M, int64_t N, int64_t K) {
  return sgemm_wt::available() && cpu::config().avx512_wt &&
         ((M >= 7 && M <= 8) ||
          (M >= 13 && (M <= 128 || (M <= 256 && K * N >= (int64_t(1) << 20) && !blas_native()))));
}

bool wt_parallel(int64_t M, int64_t N, const WtProduct& p1, const WtProduct& p2, float beta, float* c, int64_t ldc,
                 const float* bias) {
  const int64_t s1 = p1.K > 0 ? sgemm_wt::pack_size(M, p1.K) : 0, s2 = p2.K > 0 ? sgemm_wt::pack_size(M, p2.K) : 0;
  block_pool::Floats packed(s1 + s2);
  if (!packed.ok()) return false;
  float* pa = packed.get();
  if (s1 > 0) sgemm_wt::pack(M, p1.K, p1.a, p1.lda, pa);
  if (s2 > 0) sgemm_wt::pack(M, p2.K, p2.a, p2.lda, pa + s1);
  const bool stream = sgemm_wt::streams_weights(N * (p1.K + p2.K));
  const sgemm_wt::Operand o1{p1.K, pa, p1.w, p1.wr, p1.wk, stream}, o2{p2.K, pa + s1, p2.w, p2.wr, p2.wk, stream};
  const int64_t tiles = (N + sgemm_wt::kRows - 1) / sgemm_wt::kRows;
  const int64_t per_tile = std::max<int64_t>(1, sgemm_wt::kRows * M * (p1.K + p2.K));
  cpu::parallel_for_shared(tiles, per_tile, min_piece_cols(M) / sgemm_wt::kRows, [&](int64_t t0, int64_t t1) {
    sgemm_wt::gemm(M, t0 * sgemm_wt::kRows, std::min(N, t1 * sgemm_wt::kRows), o1, o2, beta, c, ldc, bias);
  });
  return true;
}

namespace {
// The team split of the packing forms: C's columns in whole 16-column panels, each thread with its own packing
// buffer; product(j0, nj, scratch) computes columns [j0, j0 + nj).
template <class F>
void packing_parallel(int64_t M, int64_t N, int64_t K, const F& product) {
  const int64_t panels = (N + 15) / 16;
  cpu::parallel_for_shared(panels, 16 * M * K, min_piece_cols(M) / 16, [&](int64_t p0, int64_t p1) {
    const int64_t j0 = 16 * p0, j1 = std::min(N, 16 * p1);
    block_pool::Floats scratch(sgemm_nn::nt_scratch_floats(j1 - j0));
    TORCH_CHECK(scratch.ok(), "seqfast: out of memory for a GEMM's packing buffer");
    product(j0, j1 - j0, scratch.get());
  });
}
}  // namespace

// c[M, N] = beta c + a @ w^T (+ bias) on the own AVX2 outer-product kernel with W's k-slices packed as it goes
// (sgemm_nn::gemm_nt), the columns split over the team in whole 16-column panels, each thread packing its own.
void ntp_parallel(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* w, int64_t ldw,
                  float beta, float* c, int64_t ldc, const float* bias) {
  packing_parallel(M, N, K, [&](int64_t j0, int64_t nj, float* scratch) {
    sgemm_nn::gemm_nt(M, nj, K, a, lda, w + j0 * ldw, ldw, beta, c + j0, ldc, bias ? bias + j0 : nullptr, scratch);
  });
}

// c[M, N] = beta c + A @ b on the own AVX2 outer-product kernel, A(r, k) = a[r * ar + k * ak], b row-major: the
// columns split over the team in whole 16-column tiles when b is wide enough, else the rows in whole 6-row tiles.
void nn_parallel(int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* b, int64_t ldb,
                 float beta, float* c, int64_t ldc) {
  const int nt = cpu::threads();
  if (N >= 32 * int64_t(nt)) {
    const int64_t tiles = (N + 15) / 16;
    // a fixed split: b is read in place, and narrower column pieces read each of its rows in shorter runs (weight
    // gradients and dg W of cell training steps ran 7-15% slower in 64-column pieces, LSTMCell B8 H512-1024)
    cpu::parallel_for(tiles, std::max<int64_t>(1, cpu::config().par_min_work / std::max<int64_t>(1, 16 * M * K)),
                      [&](int64_t t0, int64_t t1, int) {
                        const int64_t j0 = 16 * t0, j1 = std::min(N, 16 * t1);
                        sgemm_nn::gemm(M, j1 - j0, K, a, ar, ak, b + j0, ldb, beta, c + j0, ldc);
                      });
  } else {
    const int64_t tiles = (M + 5) / 6;
    cpu::parallel_for_shared(tiles, 6 * N * K, 1, [&](int64_t t0, int64_t t1) {
      const int64_t r0 = 6 * t0, r1 = std::min(M, 6 * t1);
      sgemm_nn::gemm(r1 - r0, N, K, a + r0 * ar, ar, ak, b, ldb, beta, c + r0 * ldc, ldc);
    });
  }
}

// c[M, N] = beta c + A @ b on the own AVX2 outer-product kernel with b's k-slices copied into panels as it goes
// (sgemm_nn::gemm_nn_packing), the columns split over the team in whole 16-column panels, each thread packing its own.
void nnp_parallel(int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* b,
                  int64_t ldb, float beta, float* c, int64_t ldc) {
  packing_parallel(M, N, K, [&](int64_t j0, int64_t nj, float* scratch) {
    sgemm_nn::gemm_nn_packing(M, nj, K, a, ar, ak, b + j0, ldb, beta, c + j0, ldc, scratch);
  });
}

namespace {
// A float32 CPU tensor.
inline bool f32_cpu(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.device().is_cpu(); }
// A 2-D tensor whose rows are contiguous (the element stride along dim 1 is 1, or there is at most one column).
inline bool rows_contiguous(const at::Tensor& t) { return t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1); }
// A 2-D tensor whose columns are contiguous (its transpose's rows are).
inline bool cols_contiguous(const at::Tensor& t) { return t.dim() == 2 && (t.stride(0) == 1 || t.size(0) <= 1); }
}  // namespace

void matmul_out(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const bool own = f32_cpu(c) && f32_cpu(a) && f32_cpu(b) && rows_contiguous(c) && a.dim() == 2 &&
                   rows_contiguous(b) && a.size(1) == b.size(0) && c.size(0) == a.size(0) && c.size(1) == b.size(1) &&
                   nt_available() && nn_prefers_team(a.size(0), a.size(1), b.size(1));
  if (!own) {
    if (accumulate) c.addmm_(a, b);
    else at::mm_out(c, a, b);
    return;
  }
  const auto product = nnp_prefers(a.size(0), b.size(1)) ? nnp_parallel : nn_parallel;
  product(a.size(0), b.size(1), a.size(1), a.const_data_ptr<float>(), a.stride(0), a.stride(1),
          b.const_data_ptr<float>(), b.stride(0), accumulate ? 1.f : 0.f, c.data_ptr<float>(), c.stride(0));
}

bool nt_takes(int64_t M, int64_t N, int64_t K) {
  return nt_available() && nt_prefers_team(M, N, K) && !ntp_prefers(M, K) && !own_rows(M, K);
}

// Whether c = a @ w^T has float32 CPU operands the own kernels read in place: rows of c, a and w contiguous, shapes
// matching. linear_out and linear2_out then choose by shape.
inline bool nt_operands(const at::Tensor& c, const at::Tensor& a, const at::Tensor& w) {
  return f32_cpu(c) && f32_cpu(a) && f32_cpu(w) && rows_contiguous(c) && rows_contiguous(a) && rows_contiguous(w) &&
         a.size(1) == w.size(1) && c.size(0) == a.size(0) && c.size(1) == w.size(0);
}

// The broadcast form's operand for a @ w^T (nt_operands: k-contiguous rows of a and w).
inline WtProduct wt_product(const at::Tensor& a, const at::Tensor& w) {
  return WtProduct{a.const_data_ptr<float>(), a.stride(0), a.size(1), w.const_data_ptr<float>(), w.stride(0), 1};
}

void linear_out(at::Tensor& c, const at::Tensor& a, const at::Tensor& w, bool accumulate) {
  if (nt_operands(c, a, w) && wt_takes(a.size(0), w.size(0), a.size(1)) &&
      wt_parallel(a.size(0), w.size(0), wt_product(a, w), WtProduct{}, accumulate ? 1.f : 0.f, c.data_ptr<float>(),
                  c.stride(0), nullptr))
    return;
  const bool own = nt_operands(c, a, w) && nt_available() &&
                   (nt_prefers_team(a.size(0), w.size(0), a.size(1)) || ntp_prefers(a.size(0), a.size(1)));
  if (!own) {
    if (accumulate) c.addmm_(a, w.t());
    else at::mm_out(c, a, w.t());
    return;
  }
  if (ntp_prefers(a.size(0), a.size(1)))
    return ntp_parallel(a.size(0), w.size(0), a.size(1), a.const_data_ptr<float>(), a.stride(0),
                        w.const_data_ptr<float>(), w.stride(0), accumulate ? 1.f : 0.f, c.data_ptr<float>(),
                        c.stride(0), nullptr);
  nt_parallel(a.size(0), w.size(0), a.size(1), a.const_data_ptr<float>(), a.stride(0), w.const_data_ptr<float>(),
              w.stride(0), accumulate ? 1.f : 0.f, c.data_ptr<float>(), c.stride(0), nullptr);
}

namespace {
// C[M, N] (row stride ldc) = beta C + A @ B (+ bias) on the own AVX-512 GEMM, A(r, k) = a[r * ar + k * ak] and
// B(k, j) = b[k * bsk + j * bsj], B packed for it (from the block pool) and the product split over the team. false
// (nothing written) where the packing found no memory.
bool packed_product(int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* b,
                    int64_t bsk, int64_t bsj, float beta, float* c, int64_t ldc, const float* bias) {
  const int nt = cpu::threads();
  sgemm::PackedB pb;
  pb.pack(K, N, b, bsk, bsj, nt);
  if (!pb.ok()) return false;
  sgemm::gemm_parallel(nt, M, N, K, a, ar, ak, pb.p, beta, c, ldc, bias);
  return true;
}

// c (+)= a @ w^T on it (w^T: B(k, j) = w[j, k]); rows of a, w and c contiguous (nt_operands).
bool own_linear(at::Tensor& c, const at::Tensor& a, const at::Tensor& w, bool accumulate) {
  return packed_product(a.size(0), w.size(0), a.size(1), a.const_data_ptr<float>(), a.stride(0), 1,
                        w.const_data_ptr<float>(), 1, w.stride(0), accumulate ? 1.f : 0.f, c.data_ptr<float>(),
                        c.stride(0), nullptr);
}
}  // namespace

void linear2_out(at::Tensor& c1, const at::Tensor& a1, const at::Tensor& w1, at::Tensor& c2, const at::Tensor& a2,
                 const at::Tensor& w2, bool accumulate2) {
  const auto own = [](const at::Tensor& c, const at::Tensor& a, const at::Tensor& w) {
    return nt_operands(c, a, w) && ntp_prefers(a.size(0), a.size(1));
  };
  const int64_t M = a1.size(0), N = w1.size(0), K1 = a1.size(1), K2 = a2.size(1);
  // a cell step's products on the broadcast form: into one output, summed in the same accumulators
  if (nt_operands(c1, a1, w1) && nt_operands(c2, a2, w2) && a2.size(0) == M && w2.size(0) == N &&
      wt_takes(M, N, K1 + K2)) {
    if (c1.is_same(c2) && accumulate2) {
      if (wt_parallel(M, N, wt_product(a1, w1), wt_product(a2, w2), 0.f, c1.data_ptr<float>(), c1.stride(0), nullptr))
        return;
    } else if (wt_parallel(M, N, wt_product(a1, w1), WtProduct{}, 0.f, c1.data_ptr<float>(), c1.stride(0), nullptr) &&
               wt_parallel(M, N, wt_product(a2, w2), WtProduct{}, accumulate2 ? 1.f : 0.f, c2.data_ptr<float>(),
                           c2.stride(0), nullptr)) {
      return;
    }
  }
  // a cell step's products from kMinOwnRows rows on a CPU with the AVX-512 GEMM: each weight packed once per call
  if ((own_rows(M, K1) || own_rows(M, K2)) && nt_operands(c1, a1, w1) && nt_operands(c2, a2, w2) &&
      own_linear(c1, a1, w1, false) &&
      own_linear(c2, a2, w2, accumulate2))
    return;
  if (!(nt_available() && own(c1, a1, w1) && own(c2, a2, w2) && a2.size(0) == M && w2.size(0) == N)) {
    linear_out(c1, a1, w1, false);
    linear_out(c2, a2, w2, accumulate2);
    return;
  }
  const float *a1p = a1.const_data_ptr<float>(), *w1p = w1.const_data_ptr<float>();
  const float *a2p = a2.const_data_ptr<float>(), *w2p = w2.const_data_ptr<float>();
  float *c1p = c1.data_ptr<float>(), *c2p = c2.data_ptr<float>();
  const int64_t lda1 = a1.stride(0), ldw1 = w1.stride(0), ldc1 = c1.stride(0);
  const int64_t lda2 = a2.stride(0), ldw2 = w2.stride(0), ldc2 = c2.stride(0);
  packing_parallel(M, N, K1 + K2, [&](int64_t j0, int64_t nj, float* scratch) {
    sgemm_nn::gemm_nt(M, nj, K1, a1p, lda1, w1p + j0 * ldw1, ldw1, 0.f, c1p + j0, ldc1, nullptr, scratch);
    sgemm_nn::gemm_nt(M, nj, K2, a2p, lda2, w2p + j0 * ldw2, ldw2, accumulate2 ? 1.f : 0.f, c2p + j0, ldc2, nullptr,
                      scratch);
  });
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "mm_f32: a [M,K] and b [K,N] expected, got ",
              a.sizes(), " and ", b.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  const bool f32 = f32_cpu(a) && f32_cpu(b) && (!has_bias || bias->scalar_type() == at::kFloat);
  // b = W^T of a k-contiguous W (a torch weight's .t()): the dot-product kernel reads W's rows
  const bool nt_shape = nt_prefers_team(a.size(0), b.size(1), a.size(1)) || ntp_prefers(a.size(0), a.size(1));
  // from kMinOwnRows rows the AVX-512 GEMM takes it where the CPU has one (own_rows; below: the AVX2 kernels' or MKL's)
  const bool avx2_rows = !own_rows(a.size(0));
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  // the own kernels read a bias [N] (at::addmm would broadcast others): checked where one of them takes the product
  const auto own_bias = [&]() -> at::Tensor {
    TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == N), "mm_f32: bias must be [", N, "], got ",
                bias->sizes());
    return has_bias ? bias->contiguous() : at::Tensor();
  };
  const auto bias_ptr = [](const at::Tensor& bc) { return bc.defined() ? bc.const_data_ptr<float>() : nullptr; };
  // b = W^T of a k-contiguous W: b[k, j] = b_ptr[j * b.stride(1) + k], rows j of W at stride b.stride(1)
  if (f32 && rows_contiguous(a) && cols_contiguous(b) && wt_takes(M, N, K)) {
    const at::Tensor bc = own_bias();
    at::Tensor c = at::empty({M, N}, a.options());
    const WtProduct p{a.const_data_ptr<float>(), a.stride(0), K, b.const_data_ptr<float>(), b.stride(1), 1};
    if (wt_parallel(M, N, p, WtProduct{}, 0.f, c.data_ptr<float>(), N, bias_ptr(bc))) return c;
  }
  if (f32 && nt_available() && !own_rows(M, K) && nt_shape && rows_contiguous(a) && cols_contiguous(b)) {
    const at::Tensor bc = own_bias();
    at::Tensor c = at::empty({M, N}, a.options());
    const auto product = ntp_prefers(M, K) ? ntp_parallel : nt_parallel;
    product(M, N, K, a.const_data_ptr<float>(), a.stride(0), b.const_data_ptr<float>(), b.stride(1), 0.f,
            c.data_ptr<float>(), N, bias_ptr(bc));
    return c;
  }
  if (f32 && !has_bias && nt_available() && avx2_rows && rows_contiguous(b) && nn_prefers_team(M, K, N)) {
    at::Tensor c = at::empty({M, N}, a.options());
    const auto product = nnp_prefers(M, N) ? nnp_parallel : nn_parallel;
    product(M, N, K, a.const_data_ptr<float>(), a.stride(0), a.stride(1), b.const_data_ptr<float>(), b.stride(0), 0.f,
            c.data_ptr<float>(), N);
    return c;
  }
  // a b that is not a weight's W^T view (row-major: the backward's products) goes to the BLAS where it runs natively
  const bool w_view = b.stride(0) == 1 && K > 1;
  const bool own = f32 && own_rows(M) && (w_view || !blas_native());
  if (!own) return has_bias ? at::addmm(*bias, a, b) : at::mm(a, b);
  const at::Tensor bc = own_bias();
  at::Tensor c = at::empty({M, N}, a.options());
  TORCH_CHECK(packed_product(M, N, K, a.const_data_ptr<float>(), a.stride(0), a.stride(1), b.const_data_ptr<float>(),
                             b.stride(0), b.stride(1), 0.f, c.data_ptr<float>(), N, bias_ptr(bc)),
              "mm_f32: out of memory packing a [", K, ", ", N, "] operand");
  return c;
}

}  // namespace gemm

at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  return gemm::mm(a, b, bias);
}
bool own_gemm_available() { return sgemm::available(); }

namespace {
// a [M, K] @ w [N, K]^T (+ bias) on one of the own AVX2 kernels (nt_parallel or ntp_parallel), checked for `name`.
at::Tensor own_nt(const char* name, bool packing, const at::Tensor& a, const at::Tensor& w,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(gemm::nt_available(), name, ": the own AVX2 GEMM does not run on this CPU or is switched off");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.size(1) == w.size(1), name, ": a [M,K] and w [N,K] expected, got ",
              a.sizes(), " and ", w.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && a.device().is_cpu() &&
                  w.device().is_cpu() && (!has_bias || (bias->scalar_type() == at::kFloat && bias->device().is_cpu())),
              name, ": float32 CPU tensors expected");
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == w.size(0)), name, ": bias must be [", w.size(0),
              "], got ", bias->sizes());
  const at::Tensor ac = a.stride(1) == 1 ? a : a.contiguous(), wc = w.stride(1) == 1 ? w : w.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor c = at::empty({a.size(0), w.size(0)}, a.options());
  (packing ? gemm::ntp_parallel : gemm::nt_parallel)(a.size(0), w.size(0), a.size(1), ac.const_data_ptr<float>(),
                                                      ac.stride(0), wc.const_data_ptr<float>(), wc.stride(0), 0.f,
                                                      c.data_ptr<float>(), c.size(1),
                                                      has_bias ? bc.const_data_ptr<float>() : nullptr);
  return c;
}
}  // namespace

at::Tensor gemm_nt_f32(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return own_nt("gemm_nt_f32", false, a, w, bias);
}
at::Tensor gemm_ntp_f32(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return own_nt("gemm_ntp_f32", true, a, w, bias);
}
bool nt_gemm_available() { return gemm::nt_available(); }

at::Tensor gemm_wt_f32(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(sgemm_wt::available(), "gemm_wt_f32: the own AVX-512 GEMM does not run on this CPU or is switched off");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.size(1) == w.size(1), "gemm_wt_f32: a [M,K] and w [N,K] expected, got ",
              a.sizes(), " and ", w.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && a.device().is_cpu() &&
                  w.device().is_cpu() && (!has_bias || (bias->scalar_type() == at::kFloat && bias->device().is_cpu())),
              "gemm_wt_f32: float32 CPU tensors expected");
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == w.size(0)), "gemm_wt_f32: bias must be [", w.size(0),
              "], got ", bias->sizes());
  const at::Tensor ac = a.stride(1) == 1 ? a : a.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor c = at::empty({a.size(0), w.size(0)}, a.options());
  const gemm::WtProduct p{ac.const_data_ptr<float>(), ac.stride(0), a.size(1), w.const_data_ptr<float>(), w.stride(0),
                          w.stride(1)};
  TORCH_CHECK(gemm::wt_parallel(a.size(0), w.size(0), p, gemm::WtProduct{}, 0.f, c.data_ptr<float>(), c.size(1),
                                has_bias ? bc.const_data_ptr<float>() : nullptr),
              "gemm_wt_f32: out of memory for the packing buffer");
  return c;
}

at::Tensor gemv_f32(const at::Tensor& x1, const at::Tensor& w1, const std::optional<at::Tensor>& x2,
                    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& y) {
  TORCH_CHECK(gemv512::available(), "gemv_f32: the AVX-512 GEMV does not run on this CPU or is switched off");
  const bool two = x2.has_value() && x2->defined();
  TORCH_CHECK(two == (w2.has_value() && w2->defined()), "gemv_f32: x2 and w2 go together");
  const auto f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.device().is_cpu(); };
  TORCH_CHECK(x1.dim() == 2 && w1.dim() == 2 && x1.size(1) == w1.size(1),
              "gemv_f32: x1 [B,K1] and w1 [N,K1] expected, got ", x1.sizes(), " and ", w1.sizes());
  TORCH_CHECK(!two || (x2->dim() == 2 && w2->dim() == 2 && x2->size(0) == x1.size(0) && x2->size(1) == w2->size(1) &&
                       w2->size(0) == w1.size(0)),
              "gemv_f32: x2 [B,K2] and w2 [N,K2] expected");
  TORCH_CHECK(f32(x1) && f32(w1) && (!two || (f32(*x2) && f32(*w2))), "gemv_f32: float32 CPU tensors expected");
  const int64_t B = x1.size(0), N = w1.size(0);
  const bool acc = y.has_value() && y->defined();
  TORCH_CHECK(!acc || (f32(*y) && y->dim() == 2 && y->size(0) == B && y->size(1) == N && y->is_contiguous()),
              "gemv_f32: y must be a contiguous float32 [", B, ",", N, "]");
  const at::Tensor a = x1.contiguous(), wa = w1.contiguous();
  const at::Tensor b = two ? x2->contiguous() : at::Tensor(), wb = two ? w2->contiguous() : at::Tensor();
  at::Tensor out = acc ? *y : at::empty({B, N}, x1.options());
  std::vector<const float*> ra(static_cast<size_t>(B)), rb(static_cast<size_t>(B));
  std::vector<float*> ry(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) {
    ra[size_t(i)] = a.const_data_ptr<float>() + i * a.size(1);
    rb[size_t(i)] = two ? b.const_data_ptr<float>() + i * b.size(1) : nullptr;
    ry[size_t(i)] = out.data_ptr<float>() + i * N;
  }
  gemv512::gemv(B, ra.data(), wa.const_data_ptr<float>(), a.size(1), rb.data(),
                two ? wb.const_data_ptr<float>() : nullptr, two ? b.size(1) : 0, ry.data(), 0, N, acc);
  return out;
}

namespace {
// a [M, K] @ b [K, N] on one of the own AVX2 outer-product forms (nn_parallel or nnp_parallel), checked for `name`.
at::Tensor own_nn(const char* name, bool packing, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(gemm::nt_available(), name, ": the own AVX2 GEMM does not run on this CPU or is switched off");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), name, ": a [M,K] and b [K,N] expected, got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.device().is_cpu() &&
                  b.device().is_cpu(), name, ": float32 CPU tensors expected");
  const at::Tensor bc = b.stride(1) == 1 ? b : b.contiguous();
  at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
  (packing ? gemm::nnp_parallel : gemm::nn_parallel)(a.size(0), b.size(1), a.size(1), a.const_data_ptr<float>(),
                                                      a.stride(0), a.stride(1), bc.const_data_ptr<float>(),
                                                      bc.stride(0), 0.f, c.data_ptr<float>(), c.size(1));
  return c;
}
}  // namespace

at::Tensor gemm_nn_f32(const at::Tensor& a, const at::Tensor& b) { return own_nn("gemm_nn_f32", false, a, b); }
at::Tensor gemm_nnp_f32(const at::Tensor& a, const at::Tensor& b) { return own_nn("gemm_nnp_f32", true, a, b); }

}  // namespace seqfast
