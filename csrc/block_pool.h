// A bounded pool of 64-byte aligned memory blocks shared by the C++ kernels (implementation in workspace_pool.cpp;
// no ATen here, so the AVX-512 translation units can use it). See workspace_pool.h for why and for the bounds.
#pragma once

#include <cstddef>

namespace seqfast {
namespace block_pool {

// A block of at least `bytes` (an idle one within 1.25x of the size when there is one); `got` receives its
// capacity, to be passed back to give(). nullptr when out of memory.
void* take(size_t bytes, size_t& got);
// Returns a block from take() (with its `got`); it stays idle for reuse while the pool's bounds allow.
void give(void* p, size_t got);

}  // namespace block_pool
}  // namespace seqfast
