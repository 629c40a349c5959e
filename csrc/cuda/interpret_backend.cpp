// Interpret mode's backend: host_launch.h's planning and launches, exactly as
// the CUDA backend runs them, with the kernels of kernels_interpret.cpp and
// host memory as "device" memory. CPU tensors take this backend instead of the
// CPU one while cuda_interpret_enabled() is set on the calling thread
// (pygan_optim.cuda_interpret does that around each op call).
#define PYGAN_CUDA_INTERPRET 1
#include "host_launch.h"

namespace pygan_optim {
namespace {

// set_cuda_interpret_capturing: calls on this thread behave as under a capture.
thread_local bool interpret_capturing = false;

bool interpret_capturing_on(const at::Device&) { return interpret_capturing; }

struct HostRuntime {
  struct Guard {
    explicit Guard(const at::Device&) {}
  };

  static cudaStream_t stream(const at::Device&) { return nullptr; }

  // The copy the CUDA backend enqueues, made at once (memcpy into a CPU tensor).
  static at::Tensor upload(const std::vector<char>& bytes, const at::Device& device) {
    TORCH_CHECK(device.is_cpu(), "pygan_optim: interpret mode runs on CPU tensors, not ", device);
    at::Tensor out = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
    if (!bytes.empty()) std::memcpy(out.data_ptr(), bytes.data(), bytes.size());
    return out;
  }

  // Host memory is not reused behind a stream's back.
  static void used_on(const at::Tensor&, cudaStream_t) {}

  static bool capturing(cudaStream_t) { return interpret_capturing; }

  // Copies are made at once: nothing to wait for.
  static std::shared_ptr<void> record(cudaStream_t) { return nullptr; }
  static void wait_for(const std::shared_ptr<void>&, cudaStream_t) {}

  static void check(cudaError_t error) {
    TORCH_CHECK(error != cudaErrorLaunchFailure, "pygan_optim (CUDA interpret mode): the "
                "threads of a block met at different barriers (a __syncthreads that not all "
                "of them reach, which a GPU leaves undefined)");
    TORCH_CHECK(error == cudaSuccess, "pygan_optim (CUDA interpret mode): launch failed with "
                "error ", static_cast<int>(error));
  }
};

using cuda_interpret::host::run_adam;
using cuda_interpret::host::run_ema;
using cuda_interpret::host::run_l2_norm;
using cuda_interpret::host::run_scale;

thread_local bool interpret_enabled = false;

}  // namespace

const Backend& cuda_interpret_backend() {
  static const Backend backend{run_adam<HostRuntime>, run_scale<HostRuntime>,
                               run_l2_norm<HostRuntime>, run_ema<HostRuntime>,
                               /*grad_as_exp_avg=*/true,
                               /*exp_avg_written_over_grad=*/false, interpret_capturing_on};
  return backend;
}

bool cuda_interpret_enabled() { return interpret_enabled; }

bool set_cuda_interpret(bool enabled) {
  const bool previous = interpret_enabled;
  interpret_enabled = enabled;
  return previous;
}

bool set_cuda_interpret_capturing(bool capturing) {
  const bool previous = interpret_capturing;
  interpret_capturing = capturing;
  return previous;
}

std::vector<int64_t> cuda_interpret_barrier_check() {
  using pygan_cuda_emulation::launch;
  launch(2, 4, [] {
    if (threadIdx.x != 0) __syncthreads();  // thread 0 skips the barrier
  });
  const int64_t divergent = cudaGetLastError();
  launch(2, 4, [] {
    __syncthreads();
    (void)__syncthreads_or(threadIdx.x == 1);
  });
  const int64_t uniform = cudaGetLastError();
  return {divergent, uniform};
}

}  // namespace pygan_optim
