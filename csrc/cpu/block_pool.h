// A bounded pool of 64-byte aligned memory blocks shared by the C++ kernels (implementation in pool.cpp; no ATen
// here, so the AVX-512 translation units can use it). See pool.h for why and for the bounds.
#pragma once

#include <cstddef>
#include <cstdint>

namespace seqfast {
namespace block_pool {

// A block of at least `bytes` (an idle one within 1.25x of the size when there is one); `got` receives its
// capacity, to be passed back to give(). nullptr when out of memory.
void* take(size_t bytes, size_t& got);
// Returns a block from take() (with its `got`); it stays idle for reuse while the pool's bounds allow.
void give(void* p, size_t got);
// Builds the pool and registers its fork handlers (seqfast._C calls it at import; take() would on first use).
void init();

// An owned float buffer from the pool (64-byte aligned), released when it goes out of scope, also when the code
// holding it throws. ok() is false when the allocation failed: the holder must check it.
class Floats {
 public:
  Floats() = default;
  explicit Floats(int64_t n) { reset(n); }
  Floats(const Floats&) = delete;
  Floats& operator=(const Floats&) = delete;
  ~Floats() { release(); }
  void reset(int64_t n) {
    release();
    p_ = static_cast<float*>(take(size_t(n > 16 ? n : 16) * sizeof(float), got_));
  }
  void release() {
    if (p_) give(p_, got_);
    p_ = nullptr;
  }
  bool ok() const { return p_ != nullptr; }
  float* get() const { return p_; }

 private:
  float* p_ = nullptr;
  size_t got_ = 0;
};

}  // namespace block_pool
}  // namespace seqfast
