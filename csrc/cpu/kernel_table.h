// The CPU kernels' interface: plain pointers and element ranges, so the
// per-instruction-set translation units need no ATen headers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pygan_optim/math.h"

namespace pygan_optim {
namespace cpu {

enum class DType : int { Float, Double, BFloat16, Half };

inline size_t element_size(DType t) {
  return t == DType::Double ? 8 : t == DType::Float ? 4 : 2;
}

// The tensors of one parameter in an Adam step. max_exp_avg_sq may be null
// (no AMSGrad); so may exp_avg when beta1 == 0 and the caller keeps the grad
// as exp_avg: then it is neither read nor written. With beta1 == 0 exp_avg may
// also be grad: the kept grad gets the effective grad written over it. ema,
// when not null, is blended toward the new parameter value in the same pass.
struct AdamTensors {
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* ema;
  DType dtype;
};

struct KernelTable {
  const char* name;
  // Adam over elements [begin, end) of one parameter; zero_grad also writes 0
  // into the grad range once it has been read. t.ema (if any) is blended with
  // `ema` toward each new parameter value, as `ema` below would do after it.
  // `ahead`: how far past each element the loop prefetches the tensors it
  // reads, in bytes (0: not at all); stream_prefetch_bytes() below.
  void (*adam)(const AdamTensors& t, int64_t begin, int64_t end, const AdamCoeffs<double>& c,
               const EmaCoeffs<double>& ema, bool amsgrad, bool beta1_zero, bool zero_grad,
               int64_t ahead);
  // out = in * factor over [begin, end); returns true if an input element is
  // not finite.
  bool (*scale)(const void* in, void* out, DType dtype, int64_t begin, int64_t end, double factor);
  // Sum of (x * scale)^2 over [begin, end), in fp32 blocks added up in double;
  // *not_finite is set when an input element is inf or NaN.
  double (*sum_squares)(const void* x, DType dtype, int64_t begin, int64_t end, double scale,
                        bool* not_finite);
  // ema = ema * weights.keep + param * weights.take over [begin, end);
  // `ahead` as in adam.
  void (*ema)(void* ema, const void* param, DType dtype, int64_t begin, int64_t end,
              const EmaCoeffs<double>& weights, int64_t ahead);
  // The roof probe: out[j][i] = sum of in[k][i] over [begin, end), 1-4 inputs
  // and 1-4 outputs (float32); out[n_back..] are not inputs (write-only).
  // `ahead` as in adam.
  void (*stream)(const float* const* in, int n_in, float* const* out, int n_out, int n_back,
                 int64_t begin, int64_t end, int64_t ahead);
};

const KernelTable& kernels_default();
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();

// The table for this machine, chosen once at run time. ATEN_CPU_CAPABILITY
// (default / avx2 / avx512) lowers the choice, as it does for ATen's kernels.
const KernelTable& active_kernels();

// The farthest a loop may be asked to prefetch ahead, in bytes.
constexpr int64_t kMaxStreamPrefetchBytes = 65536;

// How far ahead of the element being updated the Adam and EMA loops prefetch
// each tensor they read, in bytes; 0: they leave it to the hardware
// prefetchers. Chosen once per process: PYGAN_OPTIM_STREAM_PREFETCH (bytes, 0
// to kMaxStreamPrefetchBytes) when set, else by the CPU's vendor
// (kernel_select.cpp). Throws std::invalid_argument for a value it cannot
// take, on every call; the module reads it at import, so a step never gets
// that far.
int64_t stream_prefetch_bytes();

}  // namespace cpu
}  // namespace pygan_optim
