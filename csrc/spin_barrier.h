// Barrier for the fused RNN time loops (seqfast._C internal): one per step and thread, so its cost is paid T times
// per sequence. libgomp's barrier costs ~0.5 us per crossing on the 2-core VM used here, about as much as a whole
// 1-row LSTM step's share of work at hidden 64; this one is a counter plus a generation word, each on its own cache
// line, with spinning (pause) that falls back to yielding the CPU when the other threads are late (oversubscribed
// machine), so it never burns a core for long.
#pragma once

#include <atomic>
#include <sched.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SEQFAST_CPU_RELAX() _mm_pause()
#else
#define SEQFAST_CPU_RELAX() ((void)0)
#endif

namespace seqfast {

class SpinBarrier {
 public:
  explicit SpinBarrier(int n = 1) : n_(n) {}
  // Only while no thread is in wait().
  void set_threads(int n) { n_ = n; }
  SpinBarrier(const SpinBarrier&) = delete;
  SpinBarrier& operator=(const SpinBarrier&) = delete;

  // Every write made by any thread before its wait() is visible to every thread after it returns: arrivals are
  // acq_rel read-modify-writes on one counter (a release sequence the last arriver acquires), and the last arriver
  // publishes the new generation with release, which the waiters acquire.
  void wait() {
    if (n_ <= 1) return;
    const unsigned g = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.store(g + 1, std::memory_order_release);
      return;
    }
    for (unsigned spins = 0; gen_.load(std::memory_order_acquire) == g; ++spins) {
      if (spins < (1u << 14)) SEQFAST_CPU_RELAX();
      else sched_yield();
    }
  }

 private:
  int n_;
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<unsigned> gen_{0};
};

}  // namespace seqfast
