// CPU feature detection; see isa.h. Compiled for the baseline ISA (this is what guards the wider code).
#include "cpu/isa.h"

#include <unistd.h>

namespace seqfast {
namespace cpu {

#if defined(__x86_64__) && defined(__GNUC__)
bool has_avx2_fma() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}
bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && has_avx2_fma();
  return ok;
}
bool has_avx512_bf16() {
  static const bool ok =
      has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  return ok;
}
bool has_amx() {
  static const bool ok = __builtin_cpu_supports("amx-tile");
  return ok;
}
#else
bool has_avx2_fma() { return false; }
bool has_avx512() { return false; }
bool has_avx512_bf16() { return false; }
bool has_amx() { return false; }
#endif

namespace {
// sysconf(name) where it reports a size in [lo, hi], else fallback.
long cache_bytes(int name, long lo, long hi, long fallback) {
  const long b = sysconf(name);
  return b >= lo && b <= hi ? b : fallback;
}
}  // namespace

long l2_cache_bytes() {
#ifdef _SC_LEVEL2_CACHE_SIZE
  static const long bytes = cache_bytes(_SC_LEVEL2_CACHE_SIZE, 64L << 10, 64L << 20, 256L << 10);
  return bytes;
#else
  return 256L << 10;
#endif
}

long l3_cache_bytes() {
#ifdef _SC_LEVEL3_CACHE_SIZE
  static const long bytes = cache_bytes(_SC_LEVEL3_CACHE_SIZE, 1L << 20, 1L << 30, 8L << 20);
  return bytes;
#else
  return 8L << 20;
#endif
}

}  // namespace cpu
}  // namespace seqfast
