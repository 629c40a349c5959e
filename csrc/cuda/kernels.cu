// CUDA kernels and their launchers. Deliberately free of torch headers (they
// would make this file take minutes to compile): storage types are CUDA's
// __nv_bfloat16 / __half, layout-identical to c10::BFloat16 / c10::Half.
//
// One thread block per chunk; the element math is pygan_optim/math.h's, in
// float (double for double tensors), as on the CPU. Elements move in 16-byte
// packs where a chunk's pointers allow it (see for_each_element).
//
// The same source runs on the host in interpret mode (see emulation.h): launches
// go through PYGAN_LAUNCH instead of <<<...>>>, nothing else differs.
#ifndef PYGAN_CUDA_INTERPRET
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <climits>
#include <cstdint>

#include <pygan_optim/chunks.h>
#include <pygan_optim/math.h>

#include "kernels.cuh"

#ifdef PYGAN_CUDA_INTERPRET
#define PYGAN_LAUNCH(kernel, grid, block, stream, ...) \
  ::pygan_cuda_emulation::launch(grid, block, [&] { kernel(__VA_ARGS__); })
#else
#define PYGAN_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

namespace pygan_optim {
namespace PYGAN_CUDA_NS {
namespace {

// Threads per block (a power of two: the block reductions below halve it).
constexpr int kThreads = 512;

// Op-math type of a storage type.
template <typename scalar_t> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };
template <typename scalar_t>
using opmath_t = typename OpMath<scalar_t>::type;

// Loads and stores between storage and op-math types (round to nearest even).
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(double* p, double x) { *p = x; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }

// ---- 16-byte packs ----------------------------------------------------------
//
// A thread moves W = 16 / sizeof(scalar_t) consecutive elements of a stream in
// one access when every stream of the chunk starts 16-byte aligned (torch's
// allocations do; a view at an odd offset may not), and one element at a time
// otherwise and in the chunk's tail. Each element gets the same math either
// way, so a tensor's results do not depend on its alignment.

template <typename scalar_t, int W>
struct alignas(sizeof(scalar_t) * W) Pack {
  scalar_t v[W];
};

template <typename scalar_t>
constexpr int kPack = 16 / static_cast<int>(sizeof(scalar_t));

template <int W>
struct Width {
  static constexpr int value = W;
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// W elements from p, as op-math values.
template <int W, typename scalar_t>
__device__ __forceinline__ void load_n(const scalar_t* p, opmath_t<scalar_t> (&out)[W]) {
  const Pack<scalar_t, W> pack = *reinterpret_cast<const Pack<scalar_t, W>*>(p);
  for (int j = 0; j < W; ++j) out[j] = load(&pack.v[j]);
}

// W op-math values to p, rounded to the storage type.
template <int W, typename scalar_t>
__device__ __forceinline__ void store_n(scalar_t* p, const opmath_t<scalar_t> (&in)[W]) {
  Pack<scalar_t, W> pack;
  for (int j = 0; j < W; ++j) store(&pack.v[j], in[j]);
  *reinterpret_cast<Pack<scalar_t, W>*>(p) = pack;
}

// Calls body(Width<W>{}, i) for runs [i, i + W) of the chunk's n elements,
// threads taking runs in turn: runs of W = kPack when `packed`, then runs of 1
// for what is left. Elements of one run belong to one thread.
template <typename scalar_t, typename Body>
__device__ __forceinline__ void for_each_element(int n, bool packed, const Body& body) {
  constexpr int W = kPack<scalar_t>;
  const int packed_end = packed ? n / W * W : 0;
  for (int i = threadIdx.x * W; i < packed_end; i += kThreads * W) body(Width<W>{}, i);
  for (int i = packed_end + static_cast<int>(threadIdx.x); i < n; i += kThreads) {
    body(Width<1>{}, i);
  }
}

// x rounded to the storage type and back, as a load after a store would give.
template <typename scalar_t>
__device__ __forceinline__ opmath_t<scalar_t> rounded(opmath_t<scalar_t> x) {
  scalar_t stored;
  store(&stored, x);
  return load(&stored);
}

// The value of a one-element tensor of dtype `dtype`.
__device__ __forceinline__ double load_value(const void* p, DType dtype) {
  switch (dtype) {
    case DType::Double: return *static_cast<const double*>(p);
    case DType::BFloat16: return double(load(static_cast<const __nv_bfloat16*>(p)));
    case DType::Half: return double(load(static_cast<const __half*>(p)));
    case DType::Float:
    default: return double(*static_cast<const float*>(p));
  }
}

// The scalar's value, or `fallback` when it was not given.
__device__ __forceinline__ double load_scalar(const ScalarArg& s, double fallback) {
  return s.ptr != nullptr ? load_value(s.ptr, s.dtype) : fallback;
}

// ema = ema_update(ema, param) over a chunk's n elements (ema_kernel, and the
// EMA of a skipped Adam step).
template <typename scalar_t>
__device__ __forceinline__ void blend_ema(scalar_t* __restrict__ ema,
                                          const scalar_t* __restrict__ param, int n,
                                          const EmaCoeffs<opmath_t<scalar_t>>& c) {
  using T = opmath_t<scalar_t>;
  for_each_element<scalar_t>(n, aligned16(ema) && aligned16(param), [&](auto width, int i) {
    constexpr int W = decltype(width)::value;
    T average[W], value[W];
    load_n(ema + i, average);
    load_n(param + i, value);
    for (int j = 0; j < W; ++j) average[j] = ema_update(average[j], value[j], c);
    store_n(ema + i, average);
  });
}

// ---- Adam -------------------------------------------------------------------

// Coefficients of the step after this one, for tensor t (one thread calls it).
__device__ __forceinline__ AdamCoeffs<double> adam_coeffs_of(const AdamTensor& t,
                                                             const AdamArgs& args) {
  const double grad_mult =
      grad_multiplier(args.grad_scale.ptr != nullptr, load_scalar(args.grad_scale, 1.0),
                      args.grad_mult.ptr != nullptr, load_scalar(args.grad_mult, 1.0));
  const double lr = load_scalar(args.lr_tensor, args.lr);
  const double step = next_step(load_value(t.step, t.step_dtype), t.step_dtype == DType::Double);
  return make_adam_coeffs(lr, args.beta1, args.beta2, args.eps, args.weight_decay,
                          args.decoupled, args.maximize, grad_mult, step);
}

// The tensor's step goes up by one once all its chunks' blocks have read it:
// each block counts itself after its read (fence first), and the last one to
// count writes the step and resets the counter for the next launch. No block
// waits for another, so one launch does the whole step.
__device__ __forceinline__ void count_step_reader(const AdamTensor& t, int32_t* readers,
                                                  int64_t tensor) {
  __threadfence();  // release: this block's read of the step comes before its count
  if (atomicAdd(readers + tensor, 1) != t.chunks - 1) return;
  // Acquire: the other blocks' counts (and their reads of the step) come
  // before this block's write of it; a control dependency on the atomic's
  // result alone is not an ordering the PTX memory model promises. Once per
  // tensor.
  __threadfence();
  readers[tensor] = 0;
  const double step = next_step(load_value(t.step, t.step_dtype), t.step_dtype == DType::Double);
  if (t.step_dtype == DType::Double) *static_cast<double*>(t.step) = step;
  else *static_cast<float*>(t.step) = static_cast<float>(step);
}

template <typename scalar_t, bool AMSGRAD, bool BETA1_ZERO>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const AdamTensor* __restrict__ tensors, const Chunk* __restrict__ chunks,
                int32_t* __restrict__ step_readers, const AdamArgs args) {
  using T = opmath_t<scalar_t>;
  const Chunk chunk = chunks[blockIdx.x];
  const AdamTensor t = tensors[chunk.tensor];
  const int n = static_cast<int>(chunk.end - chunk.begin);
  scalar_t* __restrict__ g = static_cast<scalar_t*>(t.grad) + chunk.begin;

  // The EMA, when the tensor has one, is blended toward the param's new value
  // (the stored one, rounded to scalar_t) in the same pass: the bits of an
  // ema_ call after the step.
  scalar_t* __restrict__ p = static_cast<scalar_t*>(t.param) + chunk.begin;
  scalar_t* __restrict__ e =
      t.ema != nullptr ? static_cast<scalar_t*>(t.ema) + chunk.begin : nullptr;
  const EmaCoeffs<T> ec = args.ema.template cast<T>();

  if (load_scalar(args.found_inf, 0.0) != 0.0) {
    // Skipped step: parameters and state stay; grads may still be zeroed and
    // the EMA still moves toward the (unchanged) parameter.
    if (args.zero_grads) {
      for_each_element<scalar_t>(n, aligned16(g), [&](auto width, int i) {
        const T zeros[decltype(width)::value] = {};
        store_n(g + i, zeros);
      });
    }
    if (e != nullptr) blend_ema(e, p, n, ec);
    return;
  }

  __shared__ AdamCoeffs<double> block_coeffs;
  if (threadIdx.x == 0) {
    block_coeffs = adam_coeffs_of(t, args);
    count_step_reader(t, step_readers, chunk.tensor);
  }
  __syncthreads();
  const AdamCoeffs<T> c = block_coeffs.template cast<T>();
  // exp_avg is null when beta1 == 0 and the grad itself is kept as exp_avg.
  // (Only with BETA1_ZERO, where it is not read either.)
  const bool store_exp_avg = t.exp_avg != nullptr;
  scalar_t* __restrict__ m =
      store_exp_avg ? static_cast<scalar_t*>(t.exp_avg) + chunk.begin : nullptr;
  scalar_t* __restrict__ v = static_cast<scalar_t*>(t.exp_avg_sq) + chunk.begin;
  scalar_t* __restrict__ vmax =
      AMSGRAD ? static_cast<scalar_t*>(t.max_exp_avg_sq) + chunk.begin : nullptr;
  const bool packed = aligned16(p) && aligned16(g) && aligned16(v) &&
                      (!store_exp_avg || aligned16(m)) && (!AMSGRAD || aligned16(vmax)) &&
                      (e == nullptr || aligned16(e));
  for_each_element<scalar_t>(n, packed, [&](auto width, int i) {
    constexpr int W = decltype(width)::value;
    T param[W], grad[W], exp_avg[W] = {}, exp_avg_sq[W], max_sq[W] = {};
    load_n(p + i, param);
    load_n(g + i, grad);
    if (!BETA1_ZERO) load_n(m + i, exp_avg);
    load_n(v + i, exp_avg_sq);
    if (AMSGRAD) load_n(vmax + i, max_sq);
    for (int j = 0; j < W; ++j) {
      adam_update<T, AMSGRAD, BETA1_ZERO>(param[j], grad[j], exp_avg[j], exp_avg_sq[j],
                                          max_sq[j], c);
    }
    store_n(p + i, param);
    if (store_exp_avg) store_n(m + i, exp_avg);
    store_n(v + i, exp_avg_sq);
    if (AMSGRAD) store_n(vmax + i, max_sq);
    if (e != nullptr) {
      T average[W];
      load_n(e + i, average);
      for (int j = 0; j < W; ++j) {
        average[j] = ema_update(average[j], rounded<scalar_t>(param[j]), ec);
      }
      store_n(e + i, average);
    }
    if (args.zero_grads) {
      const T zeros[W] = {};
      store_n(g + i, zeros);
    }
  });
}

// ---- scale ------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(const ScaleTensor* __restrict__ tensors, const Chunk* __restrict__ chunks,
                 const double factor64, const ScalarArg factor_tensor, float* found_inf) {
  using T = opmath_t<scalar_t>;
  const Chunk chunk = chunks[blockIdx.x];
  const ScaleTensor t = tensors[chunk.tensor];
  const int n = static_cast<int>(chunk.end - chunk.begin);
  // No __restrict__: `out` is `in` for scale_.
  const scalar_t* in = static_cast<const scalar_t*>(t.in) + chunk.begin;
  scalar_t* out = static_cast<scalar_t*>(t.out) + chunk.begin;
  const T factor = T(factor64 * load_scalar(factor_tensor, 1.0));
  int bad = 0;
  for_each_element<scalar_t>(n, aligned16(in) && aligned16(out), [&](auto width, int i) {
    constexpr int W = decltype(width)::value;
    T x[W];
    load_n(in + i, x);
    for (int j = 0; j < W; ++j) {
      bad |= not_finite(x[j]);
      x[j] = x[j] * factor;
    }
    store_n(out + i, x);
  });
  // Every block that saw inf/NaN writes the same 1.0f: no accumulation, no race.
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
}

// ---- L2 norm ----------------------------------------------------------------

// Sum of `value` over the block in double, in a fixed order; the result is
// valid in thread 0. Every thread of the block must call it.
__device__ double block_sum(double value) {
  __shared__ double shared[kThreads];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  return shared[0];
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sum_squares_kernel(const void* const* __restrict__ tensors, const Chunk* __restrict__ chunks,
                       const double scale64, const ScalarArg scale_tensor,
                       double* __restrict__ partial, float* found_inf) {
  using T = opmath_t<scalar_t>;
  const Chunk chunk = chunks[blockIdx.x];
  const int n = static_cast<int>(chunk.end - chunk.begin);
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(tensors[chunk.tensor]) + chunk.begin;
  // A scale past T's range (see past_range): the squares are summed at
  // 2^-shift of it and the block's sum scaled back in double.
  const ShiftedFactor shifted = into_range<T>(scale64 * load_scalar(scale_tensor, 1.0));
  const T scale = T(shifted.factor);
  // Each thread sums at most chunk_size / kThreads squares in T (as the CPU
  // sums blocks of 1024 in fp32), the block combines them in double.
  T sum = T(0);
  int bad = 0;
  for_each_element<scalar_t>(n, aligned16(x), [&](auto width, int i) {
    constexpr int W = decltype(width)::value;
    T values[W];
    load_n(x + i, values);
    for (int j = 0; j < W; ++j) {
      bad |= not_finite(values[j]);
      const T scaled = values[j] * scale;
      sum = mul_add(scaled, scaled, sum);
    }
  });
  const double total = block_sum(double(sum)) * ldexp(1.0, 2 * shifted.shift);
  const bool any_bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = total;
    if (any_bad && found_inf != nullptr) *found_inf = 1.0f;
  }
}

__global__ void __launch_bounds__(kThreads)
    norm_reduce_kernel(const double* __restrict__ partial, const ChunkRange* __restrict__ ranges,
                       int64_t num_tensors, float* __restrict__ per_tensor,
                       float* __restrict__ total) {
  double sum = 0.0;
  for (int64_t t = threadIdx.x; t < num_tensors; t += kThreads) {
    const ChunkRange r = ranges[t];
    double s = 0.0;
    for (int64_t k = r.first; k < r.first + r.count; ++k) s += partial[k];
    per_tensor[t] = static_cast<float>(sqrt(s));
    sum += s;
  }
  const double all = block_sum(sum);
  if (threadIdx.x == 0) *total = static_cast<float>(sqrt(all));
}

// ---- EMA --------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ema_kernel(const EmaTensor* __restrict__ tensors, const Chunk* __restrict__ chunks,
               const EmaCoeffs<double> weights64) {
  using T = opmath_t<scalar_t>;
  const Chunk chunk = chunks[blockIdx.x];
  const EmaTensor t = tensors[chunk.tensor];
  const int n = static_cast<int>(chunk.end - chunk.begin);
  blend_ema(static_cast<scalar_t*>(t.ema) + chunk.begin,
            static_cast<const scalar_t*>(t.param) + chunk.begin, n,
            weights64.template cast<T>());
}

// ---- launch helpers ---------------------------------------------------------

// Calls fn(scalar_t{}) with the storage type of `dtype`.
template <typename Fn>
void dispatch(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::Double: fn(double{}); break;
    case DType::BFloat16: fn(__nv_bfloat16{}); break;
    case DType::Half: fn(__half{}); break;
    case DType::Float:
    default: fn(float{}); break;
  }
}

// A grid of one block per chunk. The chunk counts here are far below the limit
// (2^31 - 1 chunks of 64K elements); refuse rather than truncate.
bool chunk_grid_ok(int64_t num_chunks) { return num_chunks >= 0 && num_chunks <= INT_MAX; }

template <typename scalar_t, bool AMSGRAD, bool BETA1_ZERO>
void launch_adam_typed(const AdamTensor* tensors, const Chunk* chunks, int64_t num_chunks,
                       int32_t* step_readers, const AdamArgs& args, cudaStream_t stream) {
  const auto kernel = adam_kernel<scalar_t, AMSGRAD, BETA1_ZERO>;
  PYGAN_LAUNCH(kernel, static_cast<unsigned>(num_chunks), kThreads, stream, tensors, chunks,
               step_readers, args);
}

}  // namespace

cudaError_t launch_adam(DType dtype, const AdamTensor* tensors, const Chunk* chunks,
                        int64_t num_chunks, int32_t* step_readers, const AdamArgs& args,
                        cudaStream_t stream) {
  if (!chunk_grid_ok(num_chunks)) return cudaErrorInvalidValue;
  if (num_chunks == 0) return cudaSuccess;
  const bool beta1_zero = args.beta1 == 0.0;
  dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (args.amsgrad) {
      if (beta1_zero) launch_adam_typed<scalar_t, true, true>(tensors, chunks, num_chunks, step_readers, args, stream);
      else launch_adam_typed<scalar_t, true, false>(tensors, chunks, num_chunks, step_readers, args, stream);
    } else {
      if (beta1_zero) launch_adam_typed<scalar_t, false, true>(tensors, chunks, num_chunks, step_readers, args, stream);
      else launch_adam_typed<scalar_t, false, false>(tensors, chunks, num_chunks, step_readers, args, stream);
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_scale(DType dtype, const ScaleTensor* tensors, const Chunk* chunks,
                         int64_t num_chunks, double factor, ScalarArg factor_tensor,
                         float* found_inf, cudaStream_t stream) {
  if (!chunk_grid_ok(num_chunks)) return cudaErrorInvalidValue;
  if (num_chunks == 0) return cudaSuccess;
  dispatch(dtype, [&](auto tag) {
    const auto kernel = scale_kernel<decltype(tag)>;
    PYGAN_LAUNCH(kernel, static_cast<unsigned>(num_chunks), kThreads, stream, tensors, chunks,
                 factor, factor_tensor, found_inf);
  });
  return cudaGetLastError();
}

cudaError_t launch_sum_squares(DType dtype, const void* const* tensors, const Chunk* chunks,
                               int64_t num_chunks, double scale, ScalarArg scale_tensor,
                               double* partial, float* found_inf, cudaStream_t stream) {
  if (!chunk_grid_ok(num_chunks)) return cudaErrorInvalidValue;
  if (num_chunks == 0) return cudaSuccess;
  dispatch(dtype, [&](auto tag) {
    const auto kernel = sum_squares_kernel<decltype(tag)>;
    PYGAN_LAUNCH(kernel, static_cast<unsigned>(num_chunks), kThreads, stream, tensors, chunks,
                 scale, scale_tensor, partial, found_inf);
  });
  return cudaGetLastError();
}

cudaError_t launch_norm_reduce(const double* partial, const ChunkRange* ranges,
                               int64_t num_tensors, float* per_tensor, float* total,
                               cudaStream_t stream) {
  PYGAN_LAUNCH(norm_reduce_kernel, 1, kThreads, stream, partial, ranges, num_tensors, per_tensor,
               total);
  return cudaGetLastError();
}

cudaError_t launch_ema(DType dtype, const EmaTensor* tensors, const Chunk* chunks,
                       int64_t num_chunks, const EmaCoeffs<double>& weights,
                       cudaStream_t stream) {
  if (!chunk_grid_ok(num_chunks)) return cudaErrorInvalidValue;
  if (num_chunks == 0) return cudaSuccess;
  dispatch(dtype, [&](auto tag) {
    const auto kernel = ema_kernel<decltype(tag)>;
    PYGAN_LAUNCH(kernel, static_cast<unsigned>(num_chunks), kThreads, stream, tensors, chunks,
                 weights);
  });
  return cudaGetLastError();
}

}  // namespace PYGAN_CUDA_NS
}  // namespace pygan_optim
