// The CUDA backend: host_launch.h's planning and launches on the CUDA runtime
// (streams, device guard, pinned-memory table copies). Also registers the ops
// for the CUDA key.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "host_launch.h"

namespace pygan_optim {
namespace {

struct CudaRuntime {
  using Guard = c10::cuda::CUDAGuard;

  static cudaStream_t stream(const at::Device& device) {
    return c10::cuda::getCurrentCUDAStream(device.index()).stream();
  }

  // One non-blocking copy from pinned memory on the current stream; torch's
  // caching host allocator keeps the pinned buffer alive until it has run.
  static at::Tensor upload(const std::vector<char>& bytes, const at::Device& device) {
    const auto size = static_cast<int64_t>(bytes.size());
    at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    if (size > 0) std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
    at::Tensor on_device = at::empty({size}, at::TensorOptions().dtype(at::kByte).device(device));
    on_device.copy_(host, /*non_blocking=*/true);
    return on_device;
  }

  // Tables cached by one stream may serve a call on another: the caching
  // allocator then waits for that stream too before it reuses their memory.
  // (Not under capture: the capture stream may be gone by the time they are
  // freed, and what a graph uses is held until then anyway.)
  static void used_on(const at::Tensor& t, cudaStream_t stream) {
    if (capturing(stream)) return;
    c10::cuda::CUDACachingAllocator::recordStream(
        t.storage().data_ptr(), c10::cuda::getStreamFromExternal(stream, t.device().index()));
  }

  static bool capturing(cudaStream_t stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    return status != cudaStreamCaptureStatusNone;
  }

  static void check(cudaError_t error) { C10_CUDA_CHECK(error); }

  // An event after the work enqueued on `stream` so far (the tables' copy),
  // destroyed with the cache that keeps it.
  static std::shared_ptr<void> record(cudaStream_t stream) {
    cudaEvent_t event = nullptr;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    const cudaError_t recorded = cudaEventRecord(event, stream);
    if (recorded != cudaSuccess) {
      (void)cudaEventDestroy(event);
      C10_CUDA_CHECK(recorded);
    }
    // At exit the context may be gone before a cache: nothing to report then.
    return std::shared_ptr<void>(event, [](void* e) {
      (void)cudaEventDestroy(static_cast<cudaEvent_t>(e));
    });
  }

  static void wait_for(const std::shared_ptr<void>& event, cudaStream_t stream) {
    if (event != nullptr) {
      C10_CUDA_CHECK(cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(event.get()), 0));
    }
  }
};

bool capturing_on(const at::Device& device) {
  return CudaRuntime::capturing(CudaRuntime::stream(device));
}

using cuda::host::run_adam;
using cuda::host::run_ema;
using cuda::host::run_l2_norm;
using cuda::host::run_scale;

}  // namespace

const Backend& cuda_backend() {
  static const Backend backend{run_adam<CudaRuntime>, run_scale<CudaRuntime>,
                               run_l2_norm<CudaRuntime>, run_ema<CudaRuntime>,
                               /*grad_as_exp_avg=*/true,
                               /*exp_avg_written_over_grad=*/false, capturing_on};
  return backend;
}

TORCH_LIBRARY_IMPL(pygan_optim, CUDA, m) { register_entry_points(m); }

}  // namespace pygan_optim
