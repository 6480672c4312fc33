// Reusable memory for the large workspaces of the C++ kernels (seqfast._C internal; pool.cpp).
//
// Why: a training step allocates the same multi-megabyte workspaces every time (LSTM gates [T*B, 4H], cell states,
// gate gradients). glibc serves such blocks with mmap and unmaps them on free, so every step page-faults them in
// afresh. These tensors come from a small pool instead: a freed block goes back to the pool and the next request of
// a similar size takes it. Bounded: at most 16 idle blocks and config().pool_mb (SEQFAST_CPU_POOL_MB, default 256)
// MB idle in total; 0 disables it. The same pool (block_pool.h) holds the kernels' packed-weight and attention
// scratch. Fork-safe: the pool's lock is held across fork() and released in both processes (pthread_atfork).
// Only kernel-internal workspaces use it (tensors saved for backward, temporaries), never tensors handed to users
// as outputs or gradients (pooled storage cannot be resized).
#pragma once

#include <ATen/ATen.h>

#include "cpu/block_pool.h"

namespace seqfast {

// Like at::empty(sizes, options) for CPU float tensors; small requests and other dtypes/devices go to at::empty.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);
// The same from min_bytes on (0: any non-empty request), for temporaries of a few hundred KB made and dropped on
// every call: glibc returns such blocks at the top of its heap to the system on free (its trim threshold), and the
// next call faults their pages in afresh.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options, size_t min_bytes);

}  // namespace seqfast
