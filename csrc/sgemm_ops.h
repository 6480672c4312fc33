// ATen-level entry to the own AVX-512 GEMM (sgemm.h), shared by the kernel files and bound for the tests.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace seqfast {

// a [M, K] @ b [K, N] (+ bias [N]) for 2-D CPU tensors with any strides. float32 on a CPU with AVX-512 and
// M >= 256 runs the own GEMM (B packed once, split over the ATen threads by column panels); anything else runs
// at::mm / at::addmm.
at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias = std::nullopt);

// True when mm_f32 and the RNN layers use the own GEMM on this CPU (AVX-512F; SEQFAST_CPU_NO_OWN_GEMM unset).
bool own_gemm_available();

}  // namespace seqfast
