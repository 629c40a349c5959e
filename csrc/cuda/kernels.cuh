// Launch interface of the CUDA kernels (kernels.cu), in plain pointers: no ATen
// types, so kernels.cu compiles without torch's headers.
//
// Every launcher takes device pointers to tables the host built and copied over
// (cuda_backend.cpp): a per-tensor table in the order of the op's tensor list,
// and a chunk table made by pygan_optim::plan_chunks whose Chunk::tensor indexes
// the per-tensor table. One thread block handles one chunk. All chunks handed to
// one launch belong to tensors of the launch's dtype. A launcher enqueues on
// `stream` and returns cudaGetLastError() (cudaSuccess when there is nothing to do).
//
// Interpret mode (PYGAN_CUDA_INTERPRET, kernels_interpret.cpp) compiles the same
// kernels with the host compiler against emulation.h, in namespace
// cuda_interpret, so both builds can sit in one module.
#pragma once

#ifdef PYGAN_CUDA_INTERPRET
#include "emulation.h"
#define PYGAN_CUDA_NS cuda_interpret
#else
#include <cuda_runtime_api.h>
#define PYGAN_CUDA_NS cuda
#endif

#include <cstdint>

#include <pygan_optim/chunks.h>
#include <pygan_optim/math.h>

namespace pygan_optim {
namespace PYGAN_CUDA_NS {

// Storage dtype of a tensor (or of a one-element scalar tensor).
enum class DType : int32_t { Float = 0, Double = 1, BFloat16 = 2, Half = 3 };

// A one-element tensor on the device, read by the kernels; ptr == nullptr: not given.
struct ScalarArg {
  const void* ptr;
  DType dtype;
};

// ---- Adam / AdamW -----------------------------------------------------------

struct AdamTensor {
  void* param;
  void* grad;
  void* exp_avg;  // nullptr: beta1 == 0 and the grad is kept as exp_avg (not written)
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr unless amsgrad
  void* ema;             // nullptr, or blended toward the new param in the same pass
  void* step;            // one element, float32 or float64: steps taken so far
  DType step_dtype;      // Float or Double
  int32_t chunks;        // this tensor's chunks (an empty tensor has one of 0 elements)
};

struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled, zero_grads;
  ScalarArg lr_tensor;   // replaces lr when given
  ScalarArg grad_scale;  // grads are multiplied by 1 / *grad_scale when given
  ScalarArg grad_mult;   // ... and by *grad_mult when given
  ScalarArg found_inf;   // non-zero: no update (grads still zeroed if zero_grads)
  EmaCoeffs<double> ema;  // ema = ema * ema.keep + param * ema.take
};

// One launch per dtype group does the whole step: every chunk's block computes
// its tensor's coefficients from the step count, updates params and state in
// place and zeroes the grads when args.zero_grads; the last block of each
// tensor to read its step advances it (`step_readers`: one int32 per tensor,
// zero before the launch and after it). A tensor's EMA (when its table entry
// has one) is blended toward the new param values. When *found_inf is non-zero
// only the grads are zeroed (if args.zero_grads), the EMAs blended toward the
// unchanged params, and the steps stay.
cudaError_t launch_adam(DType dtype, const AdamTensor* tensors, const Chunk* chunks,
                        int64_t num_chunks, int32_t* step_readers, const AdamArgs& args,
                        cudaStream_t stream);

// ---- scale ------------------------------------------------------------------

struct ScaleTensor {
  const void* in;
  void* out;  // may equal in
};

// out = in * factor * (*factor_tensor if given); *found_inf = 1.0f if an input
// element is inf or NaN (left as is otherwise).
cudaError_t launch_scale(DType dtype, const ScaleTensor* tensors, const Chunk* chunks,
                         int64_t num_chunks, double factor, ScalarArg factor_tensor,
                         float* found_inf, cudaStream_t stream);

// ---- L2 norm ----------------------------------------------------------------

// partial[c] = sum over chunk c of (x * scale)^2 in double, scale = scale *
// (*scale_tensor if given); *found_inf = 1.0f (when found_inf is not null) if
// an element is inf or NaN. `tensors` holds one data pointer per tensor.
cudaError_t launch_sum_squares(DType dtype, const void* const* tensors, const Chunk* chunks,
                               int64_t num_chunks, double scale, ScalarArg scale_tensor,
                               double* partial, float* found_inf, cudaStream_t stream);

// Tensor t's chunk sums are partial[first, first + count).
struct ChunkRange {
  int64_t first;
  int64_t count;
};

// per_tensor[t] = sqrt(sum of t's partials), *total = sqrt(sum over all tensors):
// one block, a fixed summation order, no atomics.
cudaError_t launch_norm_reduce(const double* partial, const ChunkRange* ranges,
                               int64_t num_tensors, float* per_tensor, float* total,
                               cudaStream_t stream);

// ---- EMA --------------------------------------------------------------------

struct EmaTensor {
  void* ema;
  const void* param;
};

// ema = ema * weights.keep + param * weights.take.
cudaError_t launch_ema(DType dtype, const EmaTensor* tensors, const Chunk* chunks,
                       int64_t num_chunks, const EmaCoeffs<double>& weights,
                       cudaStream_t stream);

}  // namespace PYGAN_CUDA_NS
}  // namespace pygan_optim
