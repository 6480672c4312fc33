// Team sizing and the futex barrier; see team.h.
#include "cpu/team.h"

#include <chrono>
#include <climits>
#include <fstream>
#include <sched.h>
#include <string>
#include <unistd.h>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SEQFAST_CPU_RELAX() _mm_pause()
#else
#define SEQFAST_CPU_RELAX() ((void)0)
#endif

namespace seqfast {
namespace cpu {
namespace {

constexpr int kMinBackoff = 4, kMaxBackoff = 1024;
// Late regions in a row that count as contention. One alone is not evidence: on a VM an idle vCPU can take longer
// than the late-start threshold to wake for a region that follows a pause (measured on a quiet 2-vCPU EPYC: cell
// steps ran up to 25% slower when every late region triggered a back-off); a contended process is late every region.
constexpr int kLateStreak = 2;

int affinity_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? int(n) : 1;
}

// ceil(quota / period) of the tightest cpu.max on the way from this process's cgroup (v2) to the root; 0 = none.
int cgroup_cpus() {
  std::ifstream cg("/proc/self/cgroup");
  std::string line, path;
  while (std::getline(cg, line))
    if (line.rfind("0::", 0) == 0) path = line.substr(3);
  if (path.empty()) path = "/";
  int best = 0;
  for (;;) {
    std::ifstream f("/sys/fs/cgroup" + (path == "/" ? std::string() : path) + "/cpu.max");
    std::string quota;
    long long period = 0;
    if (f >> quota >> period && quota != "max" && period > 0) {
      const long long q = std::atoll(quota.c_str());
      const int n = int(std::max<long long>(1, (q + period - 1) / period));
      best = best == 0 ? n : std::min(best, n);
    }
    if (path == "/" || path.empty()) break;
    const size_t cut = path.find_last_of('/');
    path = cut == 0 || cut == std::string::npos ? "/" : path.substr(0, cut);
  }
  return best;
}

int detect() {
  const int a = affinity_cpus(), c = cgroup_cpus();
  return c > 0 ? std::min(a, c) : a;
}

std::atomic<int>& usable() {
  static std::atomic<int> n{detect()};
  return n;
}

#if defined(__linux__)
void futex_wait(std::atomic<uint32_t>* addr, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}
#else
void futex_wait(std::atomic<uint32_t>*, uint32_t) { sched_yield(); }
void futex_wake_all(std::atomic<uint32_t>*) {}
#endif

// Regions left to run on one thread, and how many the next contended region sets it to.
std::atomic<int> g_skip{0};
std::atomic<int> g_backoff{kMinBackoff};
std::atomic<int> g_late_streak{0};
std::atomic<int64_t> g_last_end_us{0};  // when the process's last multi-threaded region ended

}  // namespace

int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool backing_off() {
  if (!config().contention_backoff) return false;
  int s = g_skip.load(std::memory_order_relaxed);
  while (s > 0)
    if (g_skip.compare_exchange_weak(s, s - 1, std::memory_order_relaxed)) return true;
  return false;
}

void report_region(bool late, int64_t start_us) {
  const int64_t previous_end = g_last_end_us.exchange(now_us(), std::memory_order_relaxed);
  if (!config().contention_backoff) {  // switched off: no skips pending when it is switched back on
    g_skip.store(0, std::memory_order_relaxed);
    g_backoff.store(kMinBackoff, std::memory_order_relaxed);
    return;
  }
  if (late && start_us - previous_end > kPauseUs) return;  // after a pause: teammates waking, not contention
  if (late) {
    if (g_late_streak.fetch_add(1, std::memory_order_relaxed) + 1 < kLateStreak) return;
    g_late_streak.store(0, std::memory_order_relaxed);
    const int b = g_backoff.load(std::memory_order_relaxed);
    g_skip.store(b, std::memory_order_relaxed);
    g_backoff.store(std::min(kMaxBackoff, 2 * b), std::memory_order_relaxed);
  } else {
    g_late_streak.store(0, std::memory_order_relaxed);
    g_backoff.store(kMinBackoff, std::memory_order_relaxed);
  }
}

int usable_cpus() { return usable().load(std::memory_order_relaxed); }
void refresh_usable_cpus() { usable().store(detect(), std::memory_order_relaxed); }

void TeamBarrier::wait() {
  if (n_ <= 1) return;
  if (aborted_.load(std::memory_order_acquire)) throw TeamAborted();
  const uint32_t g = gen_.load(std::memory_order_acquire);
  if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
    count_.store(0, std::memory_order_relaxed);
    gen_.store(g + 1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(&gen_);
    return;
  }
  const int spin = spin_.load(std::memory_order_relaxed);
  for (int i = 0; i < spin; ++i) {
    if (gen_.load(std::memory_order_acquire) != g) {
      if (spin < kMaxSpin) spin_.store(std::min(kMaxSpin, spin * 2), std::memory_order_relaxed);
      if (aborted_.load(std::memory_order_acquire)) throw TeamAborted();
      return;
    }
    SEQFAST_CPU_RELAX();
  }
  // Late teammate: sleep until the generation changes (futex_wait returns at once if it already has).
  spin_.store(std::max(kMinSpin, spin / 2), std::memory_order_relaxed);
  const int64_t t0 = now_us();
  sleepers_.fetch_add(1, std::memory_order_seq_cst);
  while (gen_.load(std::memory_order_seq_cst) == g) futex_wait(&gen_, g);
  sleepers_.fetch_sub(1, std::memory_order_relaxed);
  slept_us_.fetch_add(now_us() - t0, std::memory_order_relaxed);
  if (aborted_.load(std::memory_order_acquire)) throw TeamAborted();
}

void TeamBarrier::abort() {
  aborted_.store(true, std::memory_order_seq_cst);
  gen_.fetch_add(1, std::memory_order_seq_cst);
  futex_wake_all(&gen_);
}

void raise_in_parallel_region(bool team) {
  if (team) {
    run_team(std::max(2, threads()), [](int tid, int nth) {
      for (int step = 0; step < 3; ++step) {
        TORCH_CHECK(!(tid == nth - 1 && step == 1), "seqfast: test error from team thread ", tid);
        team_barrier(nth);
      }
    });
  } else {
    parallel_for(64, 1, [](int64_t b, int64_t, int) {
      TORCH_CHECK(b == 0, "seqfast: test error from a parallel_for chunk");
    });
  }
}

}  // namespace cpu
}  // namespace seqfast
