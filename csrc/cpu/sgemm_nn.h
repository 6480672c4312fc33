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

}  // namespace sgemm_nn
}  // namespace seqfast
