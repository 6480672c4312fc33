// Own float32 GEMM in outer-product form for x86-64 CPUs with AVX2 + FMA, B read in place (seqfast._C internal;
// sgemm_nn.cpp).
//
// C = beta C + A @ B with B [K, N] row-major (n contiguous, any row stride) and A of any strides: the shape of an RNN
// backward's products (dx = dgates @ W_ih, dh = dgates @ W_hh with torch's weight layout; dW = dgates^T @ x, where A
// is a transposed view). Register tile 6 rows x 16 columns (12 ymm accumulators, 2 B loads + 6 broadcasts per k);
// a 256-deep slice of a 16-column B panel (16 KB) stays in L1 while the row tiles of a block of A sized from the L2
// (192 rows at 512 KB) pass over it, so neither operand is copied.
//
// Why: the MKL inside the torch CPU wheel runs its generic path on AMD CPUs (see sgemm_nt.h). Callers check
// sgemm_nt::available() first (the same requirement). Single-threaded, no allocation.
#pragma once

#include <cstdint>

namespace seqfast {
namespace sgemm_nn {

// C[M, N] (row stride ldc) = beta C + A @ B, A(r, k) = a[r * ar + k * ak], B(k, j) = b[k * ldb + j]. beta is 0 or 1.
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* b, int64_t ldb,
          float beta, float* c, int64_t ldc);

// The same kernel on W^T for a torch weight W [N, K] (k-contiguous rows) packed once by pack_rows: 16-row panels of
// W transposed to [K][16] (zeros past N), so every k's 16 columns are one contiguous 64-byte line. For products that
// reuse one weight many times (a time loop's recurrent slice: one product per step) it beat the dot-product kernel
// (sgemm_nt.h) on the same W in place by 1.07-1.66x at 3-64 rows x 32-512 units x 64-1024 k (three gate slices, 32
// steps, standalone, one thread, Zen 3); packing reads and writes W once.
inline int64_t packed_size(int64_t N, int64_t K) { return (N + 15) / 16 * 16 * K; }  // floats pack_rows writes
void pack_rows(const float* w, int64_t ldw, int64_t N, int64_t K, float* dst);
// C[M, N] (row stride ldc) = beta C + A[M, K] (row stride lda) @ W^T, W as pack_rows left it. beta is 0 or 1.
void gemm_packed(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* packed, float beta,
                 float* c, int64_t ldc);

// C[M, N] (row stride ldc) = beta C + A[M, K] (row stride lda) @ W^T (+ bias[N] when not null) for a torch weight
// W [N, K] (row stride ldw) read in place: each 256-deep k-slice of W is packed into scratch (pack_rows' layout,
// nt_scratch_floats(N) floats, 64-byte aligned) and every row block of A then runs the outer-product tiles over it.
// For many rows (an input projection over all steps, a cell at batch 64+) the packing is repaid many times over: the
// dot-product kernel (sgemm_nt.h) pays a horizontal reduction per output, and the in-place outer-product form reads W^T
// columns a row stride apart (a power-of-two stride maps a panel onto a few L1 sets). beta is 0 or 1.
int64_t nt_scratch_floats(int64_t N);
void gemm_nt(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* w, int64_t ldw, float beta,
             float* c, int64_t ldc, const float* bias, float* scratch);

// C[M, N] = beta C + A @ B, A(r, k) = a[r * ar + k * ak], B [K, N] row-major (row stride ldb) read in place: each
// 256-deep k-slice of B is copied into 16-column panels in scratch (nt_scratch_floats(N) floats) before the row blocks
// run over it. For many rows (the backward's dx = dgates @ W and dW = dgates^T @ x) the copy is repaid: in place, a
// panel's rows lie a row stride apart, and a power-of-two stride maps them onto a few L1 sets. beta is 0 or 1.
void gemm_nn_packing(int64_t M, int64_t N, int64_t K, const float* a, int64_t ar, int64_t ak, const float* b,
                     int64_t ldb, float beta, float* c, int64_t ldc, float* scratch);

}  // namespace sgemm_nn
}  // namespace seqfast
