// Workspace pool; see pool.h.
#include "cpu/pool.h"

#include <pthread.h>

#include <cstdlib>
#include <mutex>
#include <vector>

#include "cpu/config.h"

namespace seqfast {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;  // tensors below this: malloc does not mmap them; nothing to gain
constexpr int kSlots = 16;

size_t cap_bytes() { return size_t(std::max<int64_t>(cpu::config().pool_mb, 0)) << 20; }

struct Pool {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> idle;  // (block, capacity in bytes)
  size_t idle_bytes = 0;

  void* take(size_t bytes, size_t& got) {
    {
      std::lock_guard<std::mutex> g(mu);
      int best = -1;
      for (int i = 0; i < int(idle.size()); ++i)  // smallest idle block that fits within 1.25x
        if (idle[i].second >= bytes && idle[i].second <= bytes + bytes / 4 &&
            (best < 0 || idle[i].second < idle[best].second))
          best = i;
      if (best >= 0) {
        void* p = idle[best].first;
        got = idle[best].second;
        idle_bytes -= got;
        idle.erase(idle.begin() + best);
        return p;
      }
    }
    got = (bytes + 63) / 64 * 64;
    return std::aligned_alloc(64, got);
  }

  void give(void* p, size_t bytes) {
    const size_t cap = cap_bytes();
    std::lock_guard<std::mutex> g(mu);
    if (bytes > cap) {
      std::free(p);
      return;
    }
    idle.emplace_back(p, bytes);
    idle_bytes += bytes;
    // over budget: drop the oldest idle blocks
    while (idle.size() > size_t(kSlots) || idle_bytes > cap) {
      std::free(idle.front().first);
      idle_bytes -= idle.front().second;
      idle.erase(idle.begin());
    }
  }
};

Pool* g_pool = nullptr;

// fork() while another thread holds the lock would leave the child's copy locked forever: hold it across the fork
// (no thread is then inside the pool) and release it in both processes.
void before_fork() { g_pool->mu.lock(); }
void after_fork() { g_pool->mu.unlock(); }

Pool& pool() {
  static Pool* p = [] {
    g_pool = new Pool();  // never destroyed: blocks may be returned during interpreter shutdown
    pthread_atfork(before_fork, after_fork, after_fork);
    return g_pool;
  }();
  return *p;
}

}  // namespace

namespace block_pool {
void* take(size_t bytes, size_t& got) { return pool().take(bytes, got); }
void give(void* p, size_t got) { pool().give(p, got); }
void init() { pool(); }
}  // namespace block_pool

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return pooled_empty(sizes, options, kMinBytes);
}

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options, size_t min_bytes) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  const size_t bytes = size_t(std::max<int64_t>(n, 0)) * options.dtype().itemsize();
  if (!options.device().is_cpu() || bytes < std::max<size_t>(min_bytes, 1) || cap_bytes() == 0)
    return at::empty(sizes, options);
  size_t got = 0;
  void* p = block_pool::take(bytes, got);
  TORCH_CHECK(p != nullptr, "seqfast: out of memory allocating a ", bytes, "-byte workspace");
  return at::from_blob(
      p, sizes, [got](void* q) { block_pool::give(q, got); }, options);
}

}  // namespace seqfast
