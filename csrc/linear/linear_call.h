// seqfast._C.linear (linear_call.cpp): torch.nn.functional.linear on the own GEMM (cpu/gemm.h: gemm::mm), forward and
// backward, for the projections inside seqfast's attention modules (MultiheadAttention's in / out projections, the
// Luong and Bahdanau score layers). Why: the torch wheel's BLAS runs its AVX2 code on AMD CPUs, where the own AVX-512
// GEMM computed the same products 2.1-2.4x faster (Zen 5, same process, float32, 32-16384 rows, K and N 256-1024:
// forward, dX and dW alike), and these projections were most of those modules' time.
#pragma once

#include <pybind11/pybind11.h>

namespace seqfast {

// Adds linear(input, weight, bias) -> the output, or None where torch.nn.functional.linear must run (see the .cpp).
void bind_linear(pybind11::module_& m);

}  // namespace seqfast
