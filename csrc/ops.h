// The op entry points and the work each backend receives.
//
// An entry (ops.cpp, adam_step.cpp) checks its inputs (checks.h), stages
// tensors whose layout differs from their parameter's, hands a Work struct to
// the backend of the tensors' device and copies staged results back. Checks
// and staging are therefore the same for CPU and CUDA; a backend only runs
// kernels.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <tuple>
#include <unordered_set>
#include <vector>

#include "pygan_optim/math.h"

namespace pygan_optim {

using TensorList = std::vector<at::Tensor>;
using OptTensor = std::optional<at::Tensor>;
using OptTensorList = c10::List<std::optional<at::Tensor>>;

// What a CUDA-like backend uploaded for the last call through one AdamPlan: the
// per-tensor and chunk tables (their host bytes and the device copy) and the
// step-reader counters. A call whose tables come out byte for byte the same (same
// tensors, same grad addresses) reuses the device copy: no host-to-device copy
// in the step, so it can be captured in a CUDA graph. Scalars that change
// between steps (lr, steps, scale) are read on the device, never put in tables.
//
// A CUDA graph captured around a call keeps the device addresses of its tables
// and counters, so those are `held` here for as long as the cache lives (the
// AdamPlan, which FusedAdam keeps once a step of it was captured).
struct DeviceTableCache {
  std::vector<char> bytes;
  at::Tensor tables, counters;
  // The stream whose copy filled `tables`, and a device event recorded after
  // that copy (a cudaEvent_t on CUDA; null in interpret mode): a call on
  // another stream makes its stream wait for the copy before its kernels
  // read the tables (Runtime::wait_for).
  const void* tables_stream = nullptr;
  std::shared_ptr<void> tables_ready;
  const void* counters_stream = nullptr;  // counters are reused only on the stream that used them
  int64_t uploads = 0;                  // for tests and diagnostics
  std::vector<at::Tensor> held;         // used under capture: never freed before the cache

  // Adds those of `tensors` not held yet (a plan's parameters: thousands).
  void hold(at::TensorList tensors) {
    std::unordered_set<const c10::TensorImpl*> have;
    for (const at::Tensor& h : held) have.insert(h.unsafeGetTensorImpl());
    for (const at::Tensor& t : tensors) {
      if (have.insert(t.unsafeGetTensorImpl()).second) held.push_back(t);
    }
  }
};

// Where one parameter's tensors of an Adam step are, gathered by the entry
// while it checks them: a backend then reads no tensor metadata again. With
// thousands of small tensors each touch of a tensor's metadata (spread over
// the heap between the tensors' data) is a cache and TLB miss.
struct AdamSlot {
  void* param = nullptr;
  void* grad = nullptr;
  void* exp_avg = nullptr;         // null where the grad is kept as exp_avg instead
  void* exp_avg_sq = nullptr;
  void* max_exp_avg_sq = nullptr;  // amsgrad only
  void* ema = nullptr;             // null: no EMA blended
  void* step = nullptr;            // one float32 or float64 element
  int64_t numel = 0;
  at::ScalarType dtype = at::kFloat, step_dtype = at::kFloat;
};

// Tensors here are non-overlapping and dense, and the tensors of one
// parameter share their strides, so a kernel may treat each as a flat array.
// Scalar tensors (lr_tensor, grad_scale, found_inf, grad_mult, steps) live on
// the parameters' device. The lists are views: of the caller's lists when
// they can be used as they are, else of copies the entry owns.
// The tensors of an Adam step, one entry per parameter in each list
// (max_exp_avg_sqs only with amsgrad).
struct AdamLists {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  // Empty, or one per parameter: where defined, blended toward the parameter
  // after its update (or toward the unchanged parameter when found_inf is set)
  // with ema = ema * keep + param * take, as ema_ would (see EmaCoeffs: keep is
  // ema_momentum, take the new parameters' weight, given or 1 - ema_momentum).
  at::TensorList emas;
};

struct AdamWork : AdamLists {
  AdamLists& lists() { return *this; }
  EmaCoeffs<double> ema_weights{0.0, 1.0};
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled, zero_grads;
  OptTensor lr_tensor, grad_scale, found_inf, grad_mult;
  DeviceTableCache* table_cache = nullptr;  // AdamPlan's; none for a plain op call
  std::vector<AdamSlot> slots;              // one per entry of the lists above
  // The storages of exp_avgs replaced by their grads (grad_as_exp_avg), which
  // no kernel reads and no tensor uses: a backend may free them while its
  // kernels run (the CPU's: one thread frees while the others start the
  // loops); what is left is freed when the work is destroyed.
  std::vector<c10::Storage> to_free;
};

struct ScaleWork {
  TensorList inputs, outputs;  // outputs[i] may be inputs[i]
  double factor;
  OptTensor factor_tensor;
  at::Tensor found_inf;
};

struct NormWork {
  TensorList tensors;
  double scale;
  OptTensor scale_tensor, found_inf;
  at::Tensor total;       // 0-dim float32, written by the backend
  at::Tensor per_tensor;  // [n] float32, written by the backend
};

struct EmaWork {
  TensorList ema, params;
  EmaCoeffs<double> weights;  // ema = ema * weights.keep + param * weights.take
};

struct Backend {
  void (*adam)(AdamWork&);  // may free work.to_free early
  void (*scale)(const ScaleWork&);
  void (*l2_norm)(const NormWork&);
  void (*ema)(const EmaWork&);
  // Whether `adam` accepts an undefined exp_avgs[i] (beta1 == 0): the caller
  // keeps that parameter's grad as its exp_avg and nothing is written for it.
  bool grad_as_exp_avg = false;
  // Whether `adam` also accepts a slot whose exp_avg is its grad (beta1 == 0,
  // an effective grad that differs from the raw one): each element of the grad
  // is read, then overwritten with the effective grad. (The CPU's: the grads
  // of an AMP or clipped update are then not freed after it; the old exp_avgs
  // are, beside its loops. CUDA frees cheaply and reads found_inf on the device.)
  bool exp_avg_written_over_grad = false;
  // Whether the current stream of `device` is being captured into a CUDA graph
  // (null: never, as on the CPU).
  bool (*capturing)(const at::Device&) = nullptr;
};

bool cuda_built();
// Whether an EMA average can be blended in its parameter's update pass: both
// addressable, the average laid out as the parameter (dtype, device, sizes,
// strides) and not the parameter's own memory (EmaBlend.average_for).
bool ema_walks_with(const at::Tensor& param, const at::Tensor& average);

// An Adam plan's state tensors must not share memory with one another nor with
// the parameters (an edit such as state['exp_avg'] = p.detach()): one pass
// would write them twice. Parameters may share with each other (they are
// refused as written only by the plain op). Checked once per plan, not per step.
void check_plan_state_disjoint(at::TensorList params, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                               at::TensorList steps, const char* op);
// The kernels for a device's tensors; refuses a device without any.
const Backend& backend_for(const at::Device& device);
const Backend& cpu_backend();
// Interpret mode (cuda/interpret_backend.cpp): the CUDA backend's host code and
// kernels run on the CPU; CPU tensors go there while it is enabled on the thread.
const Backend& cuda_interpret_backend();
bool cuda_interpret_enabled();
bool set_cuda_interpret(bool enabled);  // returns the previous setting
// Interpret mode's stand-in for a CUDA graph capture on this thread (tests of
// what a capture allows); returns the previous setting.
bool set_cuda_interpret_capturing(bool capturing);
// Interpret mode's own check, for its tests: the errors of a launch whose
// threads meet at different barriers (cudaErrorLaunchFailure, 719) and of one
// whose threads all meet (0).
std::vector<int64_t> cuda_interpret_barrier_check();
#ifdef PYGAN_OPTIM_WITH_CUDA
const Backend& cuda_backend();
#endif

// adam_step_ with grads as plain tensors (an undefined one means None): what
// the op entry and AdamPlan both call.
// grad_as_exp_avg (AdamPlan only): per parameter, a request to keep its grad
// as the new exp_avg instead of writing the grad's values into exp_avgs[i]:
// exp_avgs[i] (the same tensor object) takes the grad's storage and its old
// storage is freed. Honoured only where that is exact: beta1 == 0, no zeroing,
// the grad and the old exp_avg share their storage with no other tensor, the
// grad is used by no other parameter, both lie at the start of their storage,
// and no staging. Where the effective grad is the raw one (no scale,
// multiplier, L2 decay, maximize or found_inf), nothing is stored for exp_avg;
// otherwise, on a backend with exp_avg_written_over_grad and when found_inf is
// unset or zero, the kernel writes the effective grad over the grad.
// The flags of requests not honoured are cleared. The caller must not use the
// kept grads after the call (FusedAdam releases them).
// emas: empty, or one per parameter (undefined: none); see AdamWork::emas.
// ema_momentum is the old averages' weight, ema_new_weight the new parameters'
// (1 - ema_momentum in double when not given); see ema_.
// Each must have its parameter's dtype, device, shape and strides. Blended in
// the update pass where the parameter is updated there, else (no grad, staged)
// in an ema_ pass after it: the results are the same bits either way.
// grads_of_params (AdamPlan): `grads` is empty and each parameter's current
// .grad is used, read in the same pass that checks it.
void adam_step_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList state_steps, double lr, double beta1, double beta2,
                    double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                    const OptTensor& lr_tensor, const OptTensor& grad_scale,
                    const OptTensor& found_inf, const OptTensor& grad_mult, bool zero_grads,
                    bool validate_only, at::TensorList emas = {}, double ema_momentum = 0.0,
                    std::optional<double> ema_new_weight = std::nullopt,
                    DeviceTableCache* table_cache = nullptr,
                    std::vector<char>* grad_as_exp_avg = nullptr, bool grads_of_params = false);

// Registers the op entry points below for one dispatch key: the CPU key in
// ops.cpp, the CUDA key in cuda/cuda_backend.cpp. The entry checks the inputs
// and picks the backend of the tensors' device.
void register_entry_points(torch::Library& m);

// Op entry points.
// grads[i] may be None: that parameter is skipped (its step count stays).
// validate_only runs every check and returns without touching a tensor.
// emas[k] is blended toward params[ema_index[k]] (see AdamWork::emas).
void adam_step_(at::TensorList params, const OptTensorList& grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
                double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                const OptTensor& lr_tensor, const OptTensor& grad_scale,
                const OptTensor& found_inf, const OptTensor& grad_mult, bool zero_grads,
                bool validate_only, at::TensorList emas, at::IntArrayRef ema_index,
                double ema_momentum, std::optional<double> ema_new_weight);
void scale_(at::TensorList tensors, double factor, const OptTensor& factor_tensor,
            const at::Tensor& found_inf);
TensorList scale(at::TensorList inputs, double factor, const OptTensor& factor_tensor,
                 const at::Tensor& found_inf);
std::tuple<at::Tensor, at::Tensor> l2_norm(at::TensorList tensors, double scale,
                                           const OptTensor& scale_tensor,
                                           const OptTensor& found_inf);
// ema = ema * momentum + param * new_weight, in each tensor's op-math type
// (float, double for fp64) with both weights rounded to it. momentum is the old
// average's weight; new_weight, when not given, is 1 - momentum in double. A
// caller that knows MMagic's m passes momentum = 1 - m and new_weight = m: the
// weights of its mul_(1 - m).add_(param, alpha=m). Both must be in [0, 1] and
// add up to 1 (within kEmaWeightSumSlack).
void ema_(at::TensorList ema, at::TensorList params, double momentum,
          std::optional<double> new_weight = std::nullopt);
// How far from 1 an EMA's two weights may add up: rounding (1 - m in double,
// weights rounded to float by their caller), not a mistaken pair (m and m).
constexpr double kEmaWeightSumSlack = 1e-6;

// The memory-roof probe (benchmarks): one pass reading `inputs` and writing
// `outputs` (float32 CPU tensors of one size), on all threads, prefetching the
// inputs `ahead` bytes ahead (cpu::stream_prefetch_bytes() when not given).
void stream_pass(const TensorList& inputs, const TensorList& outputs,
                 std::optional<int64_t> ahead);

}  // namespace pygan_optim
