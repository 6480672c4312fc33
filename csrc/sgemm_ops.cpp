// ATen wrapper of the own AVX-512 GEMM; see sgemm_ops.h.
#include "sgemm_ops.h"

#include <ATen/Parallel.h>

#include "sgemm.h"

namespace seqfast {

bool own_gemm_available() { return sgemm::available(); }

namespace {
constexpr int64_t kMinOwnRows = 256;
}  // namespace

at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "mm_f32: a [M,K] and b [K,N] expected, got ",
              a.sizes(), " and ", b.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  // Packing B costs about as much per element as ~50 multiply-adds of the kernel, and each packed element is used
  // by M rows: below ~256 rows the packing eats the kernel's advantage over MKL (measured: 64x2048x512 own 1.06 ms
  // vs MKL 0.98 ms; 512x2048x512 own 5.9 ms vs MKL 7.0 ms), so short A operands stay on MKL.
  const bool own = a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.device().is_cpu() &&
                   b.device().is_cpu() && (!has_bias || bias->scalar_type() == at::kFloat) &&
                   a.size(0) >= kMinOwnRows && sgemm::available();
  if (!own) return has_bias ? at::addmm(*bias, a, b) : at::mm(a, b);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == N), "mm_f32: bias must be [", N, "]");
  const int nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  sgemm::PackedB pb;
  pb.pack(K, N, b.const_data_ptr<float>(), b.stride(0), b.stride(1), nt);
  TORCH_CHECK(pb.ok(), "mm_f32: out of memory packing a [", K, ", ", N, "] operand");
  at::Tensor c = at::empty({M, N}, a.options());
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  sgemm::gemm_parallel(nt, M, N, K, a.const_data_ptr<float>(), a.stride(0), a.stride(1), pb.p, 0.f,
                       c.data_ptr<float>(), N, has_bias ? bc.const_data_ptr<float>() : nullptr);
  return c;
}

}  // namespace seqfast
