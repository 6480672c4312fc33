// Thread teams of the C++ kernels (seqfast._C internal): how many threads a parallel region gets, the barrier of
// the fused RNN time loops, and exception-safe parallel regions.
//
// Sizing: torch.set_num_threads counts the host's cores, not what this process may use (an affinity mask, a cgroup
// CPU quota). A team larger than the usable CPUs has threads waiting at every step barrier for a teammate that is
// not running, so every region is capped by usable_cpus() (affinity and cgroup v2 cpu.max, read at load and on
// reload_config) and by the configured SEQFAST_CPU_THREADS.
//
// Waiting: TeamBarrier spins briefly (a step of a small RNN is microseconds) and then sleeps on a futex, so a
// late teammate (another process or Python thread running on its core) costs a short spin, not a busy core. The
// spin budget adapts: it shrinks while waits end asleep and grows back while they end spinning.
//
// Contention: a team's threads may still not all run when they should (other processes or Python threads on the
// same cores; a loaded machine). Barrier waits that sleep through a quarter of the teammates' time in a region, or a
// parallel_for chunk that starts late, are evidence of it (a teammate descheduled for a time slice makes the others
// sleep that long, step after step; a VM's occasional stall or an uneven step costs a few percent and is not: when
// the test was "a quarter of the waits ended asleep", LSTM T32 B64 H512 on a quiet 2-vCPU EPYC backed off to one
// thread in some calls and ran at 1.78 CPUs, 65 against 53 ms); after two regions in a row with such evidence the next regions run on the calling thread alone (a
// step barrier then costs nothing), a number of regions that doubles while the evidence repeats and resets after a
// clean multi-threaded region. So an oversubscribed process degrades to one thread per caller, never to waiting a
// scheduler time slice per step. A region that opens after a pause (no region of the process ended in the last
// kPauseUs) is no evidence either way: its teammates were asleep, and waking an idle vCPU can take milliseconds.
// Counted, those wake-ups had kept a benchmark that pauses before every timed share (and a server between requests)
// on one thread: LSTM T32 B32 H256 inference read 0.82x of torch in full sweeps, 1.43x with the back-off off. config().contention_backoff (SEQFAST_CPU_NO_BACKOFF) switches this off.
//
// Errors: an exception thrown by one thread of a region (a failed check, a failed allocation) is captured, the
// team's barrier is aborted so no teammate waits forever, and the first exception is rethrown on the calling thread
// after the region: it reaches Python as an exception, never std::terminate.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>

#include "cpu/block_share.h"
#include "cpu/config.h"

namespace seqfast {
namespace cpu {

// CPUs this process may run on: min(affinity mask, ceil(cgroup v2 cpu.max quota / period)), at least 1.
int usable_cpus();
void refresh_usable_cpus();

// Threads for a region that would like `want`: capped by torch's thread count (torch.set_num_threads),
// usable_cpus() and config().max_threads; 1 inside another parallel region.
inline int threads(int64_t want) {
  if (omp_in_parallel()) return 1;
  int64_t n = std::min<int64_t>({want, int64_t(at::get_num_threads()), int64_t(usable_cpus())});
  const int64_t cap = config().max_threads;
  if (cap > 0) n = std::min(n, cap);
  return int(std::max<int64_t>(n, 1));
}
// Threads for a region of the process's default size.
inline int threads() { return threads(INT64_MAX); }

// True when the next region should run on the calling thread alone (recent contention); consumes one skipped region.
// Always false with config().contention_backoff off.
bool backing_off();
// Reports how a multi-threaded region that opened at start_us went (late = contention seen); ignored with
// config().contention_backoff off.
void report_region(bool late, int64_t start_us);
// Microseconds on a steady clock (parallel_for's late-start check).
int64_t now_us();
// A parallel_for chunk starting this many microseconds after its region opened counts as late.
constexpr int64_t kLateStartUs = 2000;
// Microseconds without a region ending after which the next region's lateness is not counted (see Contention above).
constexpr int64_t kPauseUs = 5000;

// Thrown inside a team by a barrier whose team was aborted (a teammate failed); run_team swallows it.
struct TeamAborted {};

class TeamBarrier {
 public:
  explicit TeamBarrier(int n = 1) : n_(n) {}
  TeamBarrier(const TeamBarrier&) = delete;
  TeamBarrier& operator=(const TeamBarrier&) = delete;
  void set_threads(int n) { n_ = n; }  // only while no thread is in wait()

  // Every write made by any thread before its wait() is visible to every thread after it returns: arrivals are
  // acq_rel read-modify-writes on one counter, and the last arriver publishes the new generation with a seq_cst
  // store the waiters acquire. Throws TeamAborted once abort() was called.
  void wait();
  // Wakes every waiter and makes every later wait() throw TeamAborted.
  void abort();
  // Contention seen in a region of region_us microseconds: its waits slept through a quarter of the teammates' time.
  bool late(int64_t region_us) const {
    const int64_t s = slept_us_.load(std::memory_order_relaxed);
    return s > 0 && 4 * s >= region_us * (n_ - 1);
  }

 private:
  int n_;
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<uint32_t> gen_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> spin_{kMaxSpin};
  std::atomic<bool> aborted_{false};
  std::atomic<int64_t> slept_us_{0};
  static constexpr int kMaxSpin = 4096, kMinSpin = 64;
};

// The first exception of a parallel region, rethrown after it.
class ErrorSlot {
 public:
  template <class F>
  bool run(const F& f) noexcept {
    try {
      f();
      return true;
    } catch (const TeamAborted&) {
      return false;
    } catch (...) {
      std::lock_guard<std::mutex> g(mu_);
      if (!e_) e_ = std::current_exception();
      return false;
    }
  }
  void rethrow() {
    if (e_) std::rethrow_exception(e_);
  }

 private:
  std::mutex mu_;
  std::exception_ptr e_;
};

namespace detail {
inline thread_local TeamBarrier* tl_barrier = nullptr;
}

// The step barrier of the running team (no-op for a team of one).
inline void team_barrier(int nth) {
  if (nth > 1) detail::tl_barrier->wait();
}

// Runs body(tid, nth) on a team of up to nt threads (the team may be smaller), or inline when nt <= 1. Inside,
// team_barrier(nth) synchronises the team.
template <class F>
void run_team(int nt, const F& body) {
  if (nt <= 1 || backing_off()) {
    body(0, 1);
    return;
  }
  TeamBarrier bar;
  ErrorSlot err;
  const int64_t t0 = now_us();
#pragma omp parallel num_threads(nt)
  {
#pragma omp single
    bar.set_threads(omp_get_num_threads());  // single ends in a barrier
    detail::tl_barrier = &bar;
    if (!err.run([&] { body(omp_get_thread_num(), omp_get_num_threads()); })) bar.abort();
    detail::tl_barrier = nullptr;
  }
  report_region(bar.late(now_us() - t0), t0);
  err.rethrow();
}

// Chunks parallel_for(n, grain, ...) runs in: ceil(n / grain) capped by threads().
inline int parallel_chunks(int64_t n, int64_t grain) {
  if (n <= 0) return 0;
  const int64_t g = std::max<int64_t>(grain, 1);
  return int(std::max<int64_t>(1, std::min<int64_t>(threads(), (n + g - 1) / g)));
}

// f(begin, end, chunk) over [0, n) in parallel_chunks(n, grain) contiguous chunks (chunk < that count), on a team
// sized as above; exceptions are rethrown here.
template <class F>
void parallel_for(int64_t n, int64_t grain, const F& f) {
  const int nc = parallel_chunks(n, grain);
  if (nc == 0) return;
  if (nc == 1 || backing_off()) {
    for (int c = 0; c < nc; ++c) f(n * c / nc, n * (c + 1) / nc, c);  // same chunks, in order
    return;
  }
  ErrorSlot err;
  const int64_t t0 = now_us();
  std::atomic<bool> late{false};
#pragma omp parallel num_threads(nc)
  {
    // a thread starting this long after the region opened was not running: another task had its core (a time slice
    // is milliseconds; an idle vCPU waking for the region takes less)
    if (omp_get_thread_num() > 0 && now_us() - t0 > kLateStartUs) late.store(true, std::memory_order_relaxed);
    const int nth = omp_get_num_threads();
    // a smaller team than asked: each thread takes several chunks
    for (int c = omp_get_thread_num(); c < nc; c += nth) {
      const int64_t b = n * c / nc, e = n * (c + 1) / nc;
      if (b < e) err.run([&] { f(b, e, c); });
    }
  }
  report_region(late.load(std::memory_order_relaxed), t0);
  err.rethrow();
}

// f(begin, end) over [0, n), each unit costing unit_work multiply-adds, on the team parallel_for would use (grain:
// par_min_work of them per chunk), each thread's contiguous chunk split into pieces and shared as in block_share.h: a
// thread takes its own pieces front to back, then a slower teammate's from the back. For products whose team split
// would otherwise end with its slowest thread (a GEMM's columns, a cell step's units). A piece holds at least
// kPieceWork multiply-adds: smaller ones cost more than they balance (GRUCell B8 H256 and LSTMCell B8 H128 steps,
// 35-65 us, ran 3-5% slower in pieces of one 16-unit block; larger products gained, e.g. LSTMCell B64 H512 1.04-1.18x,
// LSTMCell B256 H1024 1.14-1.20x, same-process A/B on a 2-vCPU Zen 3).
constexpr int64_t kPieceWork = int64_t(1) << 19;
constexpr int64_t kMaxPieces = 8;  // per thread
// min_units: a lower bound of the caller's on a piece's units (see gemm.cpp: columns of a tall output).
template <class F>
void parallel_for_shared(int64_t n, int64_t unit_work, int64_t min_units, const F& f) {
  const int64_t work = std::max<int64_t>(1, unit_work);
  const int64_t grain = std::max<int64_t>(1, config().par_min_work / work);
  const int64_t min_piece = std::max({grain, kPieceWork / work, min_units});
  const int nc = parallel_chunks(n, grain);
  if (nc == 0) return;
  if (nc == 1 || !config().block_share) {
    parallel_for(n, grain, [&](int64_t b, int64_t e, int) { f(b, e); });
    return;
  }
  if (backing_off()) {  // parallel_for's chunks, inline (parallel_for itself would consume a second skip)
    for (int c = 0; c < nc; ++c) f(n * c / nc, n * (c + 1) / nc);
    return;
  }
  ErrorSlot err;
  const int64_t t0 = now_us();
  std::atomic<bool> late{false};
  BlockShare share(nc);
#pragma omp parallel num_threads(nc)
  {
    if (omp_get_thread_num() > 0 && now_us() - t0 > kLateStartUs) late.store(true, std::memory_order_relaxed);
    // chunk c of the team's (a smaller team than asked: fewer, longer chunks), in pieces [piece(c, i), piece(c, i + 1))
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const auto first = [&](int c) { return n * c / nth; };
    const auto count = [&](int c) {
      return std::max<int64_t>(1, std::min(kMaxPieces, (first(c + 1) - first(c)) / min_piece));
    };
    const auto piece = [&](int c, int64_t i) { return first(c) + (first(c + 1) - first(c)) * i / count(c); };
    err.run([&] { share.run(tid, nth, count(tid), [&](int c, int64_t i) { f(piece(c, i), piece(c, i + 1)); }); });
  }
  report_region(late.load(std::memory_order_relaxed), t0);
  err.rethrow();
}

// Test hook (bound as _C._raise_in_parallel_region): throws from one thread of a parallel_for (team = false) or of
// a run_team whose other threads wait at a barrier (team = true); the exception must reach the caller.
void raise_in_parallel_region(bool team);

}  // namespace cpu
}  // namespace seqfast
