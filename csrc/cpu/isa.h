// CPU features and the one way seqfast selects ISA-specific code (seqfast._C internal).
//
// The extension is compiled for the baseline x86-64 ISA, so the wheel loads on any x86-64 CPU. Code that needs a
// wider ISA lives in a `#pragma GCC target` region opened by SEQFAST_TARGET_AVX2_BEGIN / SEQFAST_TARGET_AVX512_BEGIN
// and closed by SEQFAST_TARGET_END, and is entered only after a run-time check of the functions below (CPU features
// detected once, at load). That is the one mechanism; no target_clones, no -m flags, no per-function attributes.
// The regions:
//   * whole translation units for the AVX-512 kernels (cpu/sgemm.cpp, rnn/rnn_sequence_lstm_step.cpp,
//     attention/attention_avx512*.cpp), guarded by sgemm::available(). These include no ATen header, so no AVX-512
//     instantiation of a shared inline function can be merged with the default-ISA copy other files use.
//   * the AVX2 region of rnn/rnn_pointwise.h (ATen's Vectorized, put into a private inline namespace through
//     CPU_CAPABILITY for the same no-merging reason), guarded by rnn_kernels_supported() / kern::check_cpu().
//   * rnn/rnn_sequence_step_bf16.cpp, the native bfloat16 LSTM / GRU steps, compiled for AVX-512 + AVX512_BF16 and
//     guarded by has_avx512_bf16(): it includes cpu/avx512_math.h inside its own anonymous namespace, so its copies
//     of those inline functions (compiled with more features) are never merged with the AVX-512 units' copies.
//   * attention/attention_vec.h: the attention row loops compiled in a baseline, an AVX2 and an AVX-512 region
//     (three namespaces); the kernels are templates on the chosen one, picked per call by attn_vec::with_rows().
#pragma once

namespace seqfast {
namespace cpu {

bool has_avx2_fma();  // AVX2 + FMA (+ F16C): the rnn/ and attention/ AVX2 regions
bool has_avx512();    // AVX-512 F + DQ + VL (+ FMA): the AVX-512 translation units
bool has_avx512_bf16();  // has_avx512() + BW + AVX512_BF16 (vdpbf16ps): the native bfloat16 translation units
bool has_amx();          // AMX tiles (torch's bfloat16 GEMMs run on them)
// The CPU's vendor is Intel: MKL, the BLAS of torch's x86 wheels, chooses its code path by vendor as well as by
// features, and runs its AVX-512 kernels on Intel CPUs only (on AMD ones a generic AVX2 path; gemm.cpp:
// blas_native says what that changes).
bool is_intel();
// Bytes of one core's L2 cache as the OS reports it (sysfs, else sysconf), or 256 KB where it reports none: the own
// AVX2 GEMMs size their cache blocks from it (Zen 2/3: 512 KB; many Intel client cores: 256 KB).
long l2_cache_bytes();
// Bytes of the one L3 cache a core shares (sysfs, else sysconf), or 8 MB where neither reports it.
long l3_cache_bytes();

}  // namespace cpu
}  // namespace seqfast

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEQFAST_X86_TARGETS 1
#define SEQFAST_TARGET_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define SEQFAST_TARGET_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512vl,avx512dq,avx2,fma,f16c\")")
#define SEQFAST_TARGET_AVX512_BF16_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma,f16c\")")
#define SEQFAST_TARGET_END _Pragma("GCC pop_options")
#else
#define SEQFAST_TARGET_AVX2_BEGIN
#define SEQFAST_TARGET_AVX512_BEGIN
#define SEQFAST_TARGET_AVX512_BF16_BEGIN
#define SEQFAST_TARGET_END
#endif
