// Interpret mode: just enough of CUDA, on the host, to run kernels.cu unchanged
// (built with PYGAN_CUDA_INTERPRET, see kernels_interpret.cpp).
//
// A launch runs its blocks one after another; the threads of a block are real
// concurrent threads that meet at every __syncthreads, so a missing barrier or
// a race on __shared__ memory is a real race (ThreadSanitizer sees it), and an
// out-of-bounds access is a real one (AddressSanitizer sees it). Blocks never
// run at the same time, so __shared__ can be a static: one copy serves the
// running block. "Device" memory is host memory.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,  // here: a block's threads met at different barriers
};
using cudaStream_t = void*;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// Storage types: layout-identical to CUDA's, rounding to nearest even as the
// __float2*_rn intrinsics do.
using __nv_bfloat16 = c10::BFloat16;
using __half = c10::Half;
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline float __half2float(__half x) { return static_cast<float>(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }
inline __half __float2half_rn(float x) { return __half(x); }

namespace pygan_cuda_emulation {

// What the threads of the running block share. Each thread says which barrier
// it arrives at (its block, and the count of its barriers there); when a phase
// is complete, all must have said the same. On a GPU a barrier that not every
// thread of the block reaches is undefined; here a thread that returned early
// would otherwise count as arriving at the others' __syncthreads. Once that is
// seen, barriers stop waiting (the launch ends, with cudaErrorLaunchFailure).
struct Block {
  struct CheckArrivals {
    Block* block;
    void operator()() noexcept {
      for (uint64_t tag : block->tags) {
        if (tag != block->tags[0]) block->diverged.store(true);
      }
    }
  };
  explicit Block(unsigned threads) : tags(threads), barrier(threads, CheckArrivals{this}) {}
  std::vector<uint64_t> tags;
  std::atomic<bool> diverged{false};
  std::barrier<CheckArrivals> barrier;
  std::atomic<int> any[2] = {0, 0};  // __syncthreads_or, alternating between calls
};

inline thread_local Block* current_block = nullptr;
inline thread_local unsigned or_calls = 0;  // this thread's __syncthreads_or calls in the block
inline thread_local uint32_t barrier_calls = 0;  // this thread's barriers in the block

inline thread_local cudaError_t last_error = cudaSuccess;

// One launch at a time: __shared__ statics serve a single running block.
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace pygan_cuda_emulation

inline thread_local dim3 gridDim, blockDim, blockIdx, threadIdx;

namespace pygan_cuda_emulation {

// Waits at the running block's barrier, saying which one: this thread's next
// in the block, or (at_end) the block's end.
inline void wait_at_barrier(bool at_end = false) {
  Block& block = *current_block;
  if (block.diverged.load()) return;
  const uint32_t which = at_end ? 0xFFFFFFFFu : barrier_calls++;
  block.tags[threadIdx.x] = (uint64_t{blockIdx.x} << 32) | which;
  block.barrier.arrive_and_wait();
}

}  // namespace pygan_cuda_emulation

// Real atomics and fences, although blocks run one after another here: the
// kernels' cross-block protocols read as they do on the GPU.
inline int atomicAdd(int* address, int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline void __syncthreads() { pygan_cuda_emulation::wait_at_barrier(); }

// Non-zero on every thread when `predicate` was non-zero on any thread.
inline int __syncthreads_or(int predicate) {
  using namespace pygan_cuda_emulation;
  Block& block = *current_block;
  std::atomic<int>& any = block.any[or_calls++ & 1];
  if (predicate) any.fetch_or(1);
  wait_at_barrier();
  const int result = any.load();
  wait_at_barrier();  // everyone has read it
  // The other slot serves the next call, so this reset cannot race with it;
  // this slot's next use comes after a barrier thread 0 reaches after here.
  if (threadIdx.x == 0) any.store(0);
  return result;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = pygan_cuda_emulation::last_error;
  pygan_cuda_emulation::last_error = cudaSuccess;
  return e;
}

namespace pygan_cuda_emulation {

// Runs kernel() as `grid` blocks of `block` threads (1-D, as our kernels are).
inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
  if (grid == 0 || block == 0 || block > 1024) {
    last_error = cudaErrorInvalidConfiguration;  // as the CUDA runtime refuses it
    return;
  }
  std::lock_guard<std::mutex> lock(launch_mutex());
  Block shared(block);
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      current_block = &shared;
      gridDim = dim3{grid};
      blockDim = dim3{block};
      threadIdx = dim3{t};
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx = dim3{b};
        or_calls = 0;
        barrier_calls = 0;
        kernel();
        wait_at_barrier(/*at_end=*/true);  // the block is done before the next one starts
      }
      current_block = nullptr;
    });
  }
  for (std::thread& th : threads) th.join();
  if (shared.diverged.load()) last_error = cudaErrorLaunchFailure;
}

}  // namespace pygan_cuda_emulation
