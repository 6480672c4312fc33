// The one GEMM entry point of the C++ kernels (seqfast._C internal; gemm.cpp). Every GEMM a kernel runs goes
// through here, and this is the only place that knows which implementation runs it:
//   * the own AVX-512 float32 kernel (cpu/sgemm.h) where the CPU has AVX-512 and config().own_gemm;
//   * its broadcast form (cpu/sgemm_wt.h) for A @ W^T products of 7-8 and 13-256 rows with the weight read in place
//     (wt_takes);
//   * the own AVX2 dot-product-form float32 kernel (cpu/sgemm_nt.h) for A @ W^T products with k-contiguous rows on
//     CPUs with AVX2 + FMA (where the wheel's MKL runs at best its AVX2 path; on AMD its generic one), with
//     config().own_gemm, and its outer-product twin (cpu/sgemm_nn.h) for A @ B with row-major B (the backward's
//     products); on CPUs with AVX-512 the loops' per-step products and products of 32+ rows stay on the first;
//   * the BLAS that the torch wheel links (MKL on x86: sgemm_, dgemm_, its packed GEMM and
//     cblas_gemm_bf16bf16f32), bound as weak symbols in gemm.cpp only: called on raw pointers with no per-call ATen
//     overhead (attention runs hundreds of block GEMMs per head; the fused RNN loops one per step and thread);
//   * ATen (at::addmm) when that BLAS symbol is absent (other torch builds) or for whole-tensor products.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "cpu/block_pool.h"
#include "cpu/sgemm.h"
#include "cpu/sgemm_nt.h"

namespace seqfast {
namespace gemm {

// The BLAS routine for this operand type is linked (float: sgemm_, double: dgemm_, BFloat16: MKL's bf16 GEMM).
template <typename T>
bool blas_available();

// Column-major C(m x n, ldc) = alpha op(A) op(B) + beta C, op(A) m x k, op(B) k x n. BLAS when available, else
// ATen on views of the buffers. A = BFloat16 accumulates into float C.
void cm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
        int64_t ldb, float beta, float* c, int64_t ldc);
void cm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
        const double* b, int64_t ldb, double beta, double* c, int64_t ldc);
void cm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const at::BFloat16* a, int64_t lda,
        const at::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Row-major forms on top of cm (a row-major X is the column-major X^T).
// C[m,n] = alpha A[m,k] B[n,k]^T + beta C
template <typename T, typename A>
inline void mm_nt(int64_t m, int64_t n, int64_t k, A alpha, const T* a, int64_t lda, const T* b, int64_t ldb, A beta,
                  A* c, int64_t ldc) {
  cm(true, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}
// C[m,n] = alpha A[m,k] B[k,n] + beta C
template <typename T, typename A>
inline void mm_nn(int64_t m, int64_t n, int64_t k, A alpha, const T* a, int64_t lda, const T* b, int64_t ldb, A beta,
                  A* c, int64_t ldc) {
  cm(false, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}
// C[m,n] = alpha A[k,m]^T B[k,n] + beta C
template <typename T, typename A>
inline void mm_tn(int64_t m, int64_t n, int64_t k, A alpha, const T* a, int64_t lda, const T* b, int64_t ldb, A beta,
                  A* c, int64_t ldc) {
  cm(false, true, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// The own AVX2 kernel takes float32 A @ W^T products here (sgemm_nt::available(): AVX2 + FMA), for the shapes where
// it beat BLAS (gemm.cpp: nt_prefers).
bool nt_available();
// Whether the BLAS runs its own AVX-512 kernels on this CPU (MKL on Intel CPUs; config().blas_native forces it): there
// it takes the products it computed faster than the own kernels (gemm.cpp says which), and the LSTM layer's fused
// step yields to the GEMM loop where it would stream its weights from the L3 (rnn_sequence.cpp).
bool blas_native();
// ... and in the single-threaded entry (cm) and the sequence loops' choices: on CPUs without the AVX-512 GEMM only.
bool nt_in_regions();

// c[M, N] = (accumulate ? c : 0) + a[M, K] @ w[N, K]^T for 2-D CPU tensors of one floating dtype (c written in place;
// a row of c must be contiguous). float32 with k-contiguous rows of a and w runs the own AVX2 kernel where
// nt_available(), split over the team by rows of w; anything else runs at::mm_out / addmm_.
void linear_out(at::Tensor& c, const at::Tensor& a, const at::Tensor& w, bool accumulate);
// c1 = a1 @ w1^T, then c2 = (accumulate2 ? c2 : 0) + a2 @ w2^T (c2 may be c1 itself: with accumulate2, the sum of the
// two products), as two linear_out calls, except that where both products take the packing form (ntp_prefers), one
// region runs both: each thread's panels of C get both products while they are in its cache. Why: a cell step's two
// gate products at 256 rows ran as two regions 4-12% slower than one product over the concatenated k (RNNCell B256
// H512 / H1024, same process). As cell steps on the Zen 3 EPYC (no grad, one region / two, same-process runs of 25-41
// rounds): GRUCell B64-256 H256-1024 1.02-1.20x, LSTMCell B128-256 H512-1024 1.01-1.04x, RNNCell B128-256 H512-1024
// 0.90-1.09x (no consistent side).
void linear2_out(at::Tensor& c1, const at::Tensor& a1, const at::Tensor& w1, at::Tensor& c2, const at::Tensor& a2,
                 const at::Tensor& w2, bool accumulate2);
// Whether linear_out runs a float32 A [M, K] @ W [N, K]^T product on the own dot-product kernel (nt_parallel): the
// range where a caller may run sgemm_nt itself (e.g. both products of a cell step in one region).
bool nt_takes(int64_t M, int64_t N, int64_t K);

// c[M, N] = (accumulate ? c : 0) + a[M, K] @ b[K, N] for 2-D CPU tensors of one floating dtype. float32 with
// n-contiguous rows of b runs the own AVX2 outer-product kernel (sgemm_nn.h, any strides of a) where nt_available();
// anything else runs at::mm_out / addmm_.
void matmul_out(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// c[M, N] (row stride ldc) = beta c + A @ b on the own AVX2 outer-product kernel, A(r, k) = a[r * ar + k * ak], b
// row-major (row stride ldb), split over the team. Requires nt_available().
void nn_parallel(int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* b, int64_t ldb,
                 float beta, float* c, int64_t ldc);

// c[M, N] (row stride ldc) = beta c + a @ w^T (+ bias) on the own AVX2 kernel, rows of w split over the team in whole
// 4-row tiles (one thread below config().par_min_work). Requires nt_available().
void nt_parallel(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* w, int64_t ldw, float beta,
                 float* c, int64_t ldc, const float* bias);

// The same on the own AVX2 outer-product kernel with W packed k-slice by k-slice as it goes (sgemm_nn::gemm_nt), the
// columns split over the team in whole 16-column panels. Requires nt_available().
void ntp_parallel(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* w, int64_t ldw,
                  float beta, float* c, int64_t ldc, const float* bias);

// The same on the own AVX2 outer-product kernel with b's k-slices copied into panels as it goes
// (sgemm_nn::gemm_nn_packing), the columns split over the team in whole 16-column panels. Requires nt_available().
void nnp_parallel(int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* b,
                  int64_t ldb, float beta, float* c, int64_t ldc);

// One product of wt_parallel: A(r, k) = a[r * lda + k] (k-contiguous rows; K = 0: no product) and the weight
// W(n, k) = w[n * wr + k * wk] read in place (a torch weight [N, K]: wr = K, wk = 1).
struct WtProduct {
  const float* a = nullptr;
  int64_t lda = 0, K = 0;
  const float* w = nullptr;
  int64_t wr = 0, wk = 0;
};
// Whether the broadcast form (sgemm_wt.h) takes a float32 product A [M, K] @ W [N, K]^T (K: both products' k where
// two are summed): on CPUs with AVX-512 and config().avx512_wt, at 7-8 rows and from 13 to 128 (the narrow form up to
// 16), and to 256 where W is large (see gemm.cpp).
bool wt_takes(int64_t M, int64_t N, int64_t K);
// c[M, N] (row stride ldc) = beta c + A1 W1^T + A2 W2^T (+ bias) on the broadcast form: A packed once on the calling
// thread, the W rows split over the team in whole 8-row tiles. false (nothing written) where the packing found no
// memory. Requires sgemm_wt::available().
bool wt_parallel(int64_t M, int64_t N, const WtProduct& p1, const WtProduct& p2, float beta, float* c, int64_t ldc,
                 const float* bias);

// MKL's packed GEMM is linked and config().mkl_pack.
bool mkl_pack_available();

// A weight slice packed once and reused by every step of a time loop: column-major C(m x n) = beta C + op(A)(m x k)
// @ B(k x n), with A the packed weight. float only: the own AVX-512 packing where available; on AVX2 CPUs, where
// the own kernel takes the product (nt_prefers) and the slice serves 2+ products, the panels of the own
// outer-product kernel (sgemm_nn.h gemm_packed; config().avx2_pack); else MKL's packed GEMM (slices of at least 128
// rows). ok() is false otherwise (callers then use cm on the unpacked weight).
class PackedWeight {
 public:
  PackedWeight() = default;
  PackedWeight(const PackedWeight&) = delete;
  PackedWeight& operator=(const PackedWeight&) = delete;
  ~PackedWeight();
  // A(i, kk) = a[kk * lda + i] when trans, else a[i * lda + kk] (row-major views of the torch weight); nmax bounds
  // the n of later mm calls (MKL sizes its packing by it); uses: how many mm calls will read it (a time loop's
  // steps), which decides whether packing for the AVX2 kernel pays. decide_m (0: m): the rows whose size decides
  // whether to pack, where a team's slice is cut into pieces (each piece packed as the whole slice would be).
  void init(bool trans, int64_t m, int64_t nmax, int64_t k, const float* a, int64_t lda, int64_t uses,
            int64_t decide_m = 0);
  bool ok() const { return mkl_ != nullptr || own_.ok() || nn_.ok(); }
  void mm(int64_t n, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) const;

 private:
  float* mkl_ = nullptr;
  block_pool::Floats nn_;  // sgemm_nn::pack_rows panels (pooled: a fresh mapping page-faulted every call)
  int64_t m_ = 0, k_ = 0;
  sgemm::PackedB own_;
};

// a [M, K] @ b [K, N] (+ bias [N]) for 2-D CPU tensors with any strides. float32 on a CPU with AVX-512 and
// M >= 256 runs the own GEMM (B packed once, split over the team by column panels); float32 with k-contiguous rows of
// a and of b^T (a torch weight's .t()) runs the own AVX2 kernel where nt_available(), and without bias, a row-major b
// its outer-product twin; anything else runs at::mm / at::addmm.
at::Tensor mm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace gemm

// Bound for the tests: gemm::mm, and whether it (and the RNN layers) use the own GEMM on this CPU.
at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias);
bool own_gemm_available();
// Bound for the tests and benchmarks/gemm_nt.py: a [M, K] @ w [N, K]^T (+ bias) on the own AVX2 kernel whatever the
// shape rule says (float32 CPU tensors with k-contiguous rows; requires nt_gemm_available()).
at::Tensor gemm_nt_f32(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias);
bool nt_gemm_available();
// The same on the packing outer-product form (gemm::ntp_parallel).
at::Tensor gemm_ntp_f32(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// The same on the broadcast form (gemm::wt_parallel; requires own_gemm_available()).
at::Tensor gemm_wt_f32(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// Bound for the tests: x1 [B, K1] @ w1 [N, K1]^T (+ x2 [B, K2] @ w2 [N, K2]^T) on the AVX-512 small-batch GEMV
// (cpu/gemv_avx512.h; requires its available()), added onto y [B, N] when given (and returned), else into a new
// tensor.
at::Tensor gemv_f32(const at::Tensor& x1, const at::Tensor& w1, const std::optional<at::Tensor>& x2,
                    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& y);

// The same for a [M, K] @ b [K, N] on the own AVX2 outer-product kernel (sgemm_nn.h).
at::Tensor gemm_nn_f32(const at::Tensor& a, const at::Tensor& b);
// The same on the packing form (gemm::nnp_parallel).
at::Tensor gemm_nnp_f32(const at::Tensor& a, const at::Tensor& b);

}  // namespace seqfast
