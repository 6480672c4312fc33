// Sharing a team's blocks of work within one step of a time loop (seqfast._C internal).
//
// The fused RNN loops give each thread of a team a fixed slice of the hidden units (its packed weights), and every
// step ends at a team barrier. With a fixed split the step lasts as long as the slowest thread's slice, and threads
// do not run at one speed: a vCPU whose host core is shared runs ~10% slower for seconds at a time (LSTM T32 B8
// H512 on a 2-vCPU Zen 3 EPYC: one thread busy 4.9 ms, the other 5.5, so the first waited 11% of every call), and a
// thread preempted for a time slice stalls its whole team. Here each thread takes its own blocks front to back,
// then the other threads' blocks that are still open, from the back: the slow thread's last blocks go to whoever is
// free, and a thread that runs at the same speed as the others only pays one uncontended compare-and-swap per block.
//
// Use, per step: every thread of the team calls run(tid, nth, n, f) after the previous step's barrier (n: its own
// blocks), then waits at the barrier. Between two barriers every range is emptied by its owner, so a teammate that
// looks at a range before its owner reopened it for the next step finds it empty, never a stale block. open()
// releases what the owner wrote before it (its packed weights) to a thief that takes one of its blocks.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "cpu/config.h"

namespace seqfast {
namespace cpu {

class BlockShare {
 public:
  explicit BlockShare(int threads) : ranges_(size_t(threads)) {}
  BlockShare(const BlockShare&) = delete;
  BlockShare& operator=(const BlockShare&) = delete;

  int threads() const { return int(ranges_.size()); }

  // One step of thread tid of a team of nth (<= threads()) owning n blocks: opens them, runs them front to back, then
  // any block a teammate still has open, from the back; f(owner, block). Under the test hook
  // config().share_test_delay_us every thread but the first waits that long after opening, so the first runs their
  // blocks.
  template <class F>
  void run(int tid, int nth, int64_t n, const F& f) {
    open(tid, n);
    const int64_t delay_us = config().share_test_delay_us;
    if (delay_us > 0 && tid > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    for (int64_t i; (i = take_front(tid)) >= 0;) f(tid, i);
    for (int j = 1; j < nth; ++j) {
      const int other = (tid + j) % nth;
      for (int64_t i; (i = take_back(other)) >= 0;) f(other, i);
    }
  }

  // Owner tid's blocks [0, n) are open for this step.
  void open(int tid, int64_t n) { ranges_[size_t(tid)].v.store(pack(0, uint32_t(n)), std::memory_order_release); }

  // The next open block of owner tid from the front (its owner) or from the back (a teammate); -1 when none is open.
  int64_t take_front(int tid) { return take(tid, true); }
  int64_t take_back(int tid) { return take(tid, false); }

 private:
  // [front, back) of the open blocks in one word, so that the owner and a thief never take the same block
  static uint64_t pack(uint32_t front, uint32_t back) { return uint64_t(front) << 32 | back; }

  int64_t take(int tid, bool front) {
    std::atomic<uint64_t>& v = ranges_[size_t(tid)].v;
    uint64_t old = v.load(std::memory_order_acquire);
    for (;;) {
      const uint32_t f = uint32_t(old >> 32), b = uint32_t(old);
      if (f >= b) return -1;
      const uint64_t next = front ? pack(f + 1, b) : pack(f, b - 1);
      if (v.compare_exchange_weak(old, next, std::memory_order_acq_rel, std::memory_order_acquire))
        return front ? f : b - 1;
    }
  }

  struct alignas(64) Range {
    std::atomic<uint64_t> v{0};  // empty until opened
  };
  std::vector<Range> ranges_;
};

}  // namespace cpu
}  // namespace seqfast
