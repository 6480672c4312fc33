// CPU feature detection; see isa.h. Compiled for the baseline ISA (this is what guards the wider code).
#include "cpu/isa.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

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
bool is_intel() {
  static const bool ok = __builtin_cpu_is("intel");
  return ok;
}
#else
bool has_avx2_fma() { return false; }
bool has_avx512() { return false; }
bool has_avx512_bf16() { return false; }
bool has_amx() { return false; }
bool is_intel() { return false; }
#endif

namespace {
// Bytes of one instance of the level-`level` data or unified cache of CPU 0, from Linux's sysfs
// (/sys/devices/system/cpu/cpu0/cache/index*/: level, type, size as "<n>K" or "<n>M"), or 0 where it is not there.
// Why sysfs first: glibc's sysconf may report the whole package. On a Zen 5 EPYC guest (family 26, glibc 2.36)
// sysconf(_SC_LEVEL3_CACHE_SIZE) read 384 MB, every CCD's L3 together, where a core shares one 32 MB L3 (sysfs and
// lscpu: 32768K), so the "outgrows the L3" rules never fired.
long sysfs_cache_bytes(int level) {
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream lf(dir + "level"), tf(dir + "type"), sf(dir + "size");
    int l = 0;
    std::string type, size;
    if (!(lf >> l) || !(tf >> type) || !(sf >> size)) break;
    if (l != level || type == "Instruction") continue;
    char* end = nullptr;
    const long n = std::strtol(size.c_str(), &end, 10);
    if (end == size.c_str() || n <= 0) return 0;
    const char unit = *end;
    return unit == 'K' ? n << 10 : unit == 'M' ? n << 20 : unit == 'G' ? n << 30 : n;
  }
  return 0;
}

// The level's size from sysfs, else sysconf(name), where it lies in [lo, hi]; else fallback.
long cache_bytes(int level, int name, long lo, long hi, long fallback) {
  long b = sysfs_cache_bytes(level);
  if (!(b >= lo && b <= hi)) b = name >= 0 ? sysconf(name) : 0;
  return b >= lo && b <= hi ? b : fallback;
}

#ifdef _SC_LEVEL2_CACHE_SIZE
constexpr int kL2Name = _SC_LEVEL2_CACHE_SIZE;
#else
constexpr int kL2Name = -1;
#endif
#ifdef _SC_LEVEL3_CACHE_SIZE
constexpr int kL3Name = _SC_LEVEL3_CACHE_SIZE;
#else
constexpr int kL3Name = -1;
#endif
}  // namespace

long l2_cache_bytes() {
  static const long bytes = cache_bytes(2, kL2Name, 64L << 10, 64L << 20, 256L << 10);
  return bytes;
}

long l3_cache_bytes() {
  static const long bytes = cache_bytes(3, kL3Name, 1L << 20, 1L << 30, 8L << 20);
  return bytes;
}

}  // namespace cpu
}  // namespace seqfast
