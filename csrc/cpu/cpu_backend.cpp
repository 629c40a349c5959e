// The CPU backend: plans chunks over the tensor lists and runs the element
// loops of the instruction set chosen at run time, in one parallel region per
// op call (Adam: one more to advance the step counts).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../ops.h"
#include "../work_sharing.h"
#include "kernel_table.h"
#include "pygan_optim/chunks.h"

namespace pygan_optim {
namespace {

// Below this many elements per thread, fork/join costs more than it saves.
constexpr int64_t kMinElementsPerTask = 32768;

cpu::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return cpu::DType::Double;
    case at::kBFloat16: return cpu::DType::BFloat16;
    case at::kHalf: return cpu::DType::Half;
    default: return cpu::DType::Float;
  }
}

std::vector<Chunk> plan(at::TensorList tensors) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const auto& t : tensors) numels.push_back(t.numel());
  return plan_chunks(numels);
}

int64_t tasks_for(const std::vector<Chunk>& chunks) {
  int64_t total = 0;
  for (const Chunk& c : chunks) total += c.end - c.begin;
  return std::max<int64_t>(1,
                           std::min<int64_t>(at::get_num_threads(), total / kMinElementsPerTask));
}

// The chunks of each task's run (partition_chunks: about equal element
// counts) in batches of at least kMinElementsPerTask elements.
Batches chunk_batches(const std::vector<Chunk>& chunks, int64_t tasks) {
  const std::vector<size_t> offsets = partition_chunks(chunks, tasks);
  Batches b;
  for (int64_t t = 0; t < tasks; ++t) {
    b.first_of_run.push_back(b.starts.size());
    int64_t filled = kMinElementsPerTask;  // the run's first chunk opens a batch
    for (size_t c = offsets[t]; c < offsets[t + 1]; ++c) {
      if (filled >= kMinElementsPerTask) {
        b.starts.push_back(c);
        filled = 0;
      }
      filled += chunks[c].end - chunks[c].begin;
    }
  }
  b.first_of_run.push_back(b.starts.size());
  b.starts.push_back(chunks.size());
  return b;
}

// Calls fn(chunk_index, task) for every chunk, after `first()` on task 0,
// the chunks shared between the threads as work_sharing.h says.
template <typename First, typename Fn>
void for_each_chunk_after(const std::vector<Chunk>& chunks, const First& first, const Fn& fn) {
  const int64_t tasks = tasks_for(chunks);
  if (tasks == 1) {
    first();
    for (size_t c = 0; c < chunks.size(); ++c) fn(c, 0);
    return;
  }
  for_each_batch(chunk_batches(chunks, tasks), first, [&](size_t begin, size_t end, int64_t task) {
    for (size_t c = begin; c < end; ++c) fn(c, task);
  });
}

template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, const Fn& fn) {
  for_each_chunk_after(chunks, [] {}, fn);
}

// Reads a one-element float32/float64 CPU tensor (scalar_on converts other
// dtypes) directly: item() would go through the dispatcher, a microsecond per
// call, paid per tensor for the step counts.
double read_scalar(const void* data, at::ScalarType dtype) {
  return dtype == at::kDouble ? *static_cast<const double*>(data)
                              : static_cast<double>(*static_cast<const float*>(data));
}
double read_scalar(const at::Tensor& t) { return read_scalar(t.const_data_ptr(), t.scalar_type()); }

void zero_all(at::TensorList tensors) {
  const auto chunks = plan(tensors);
  for_each_chunk(chunks, [&](size_t c, int64_t) {
    const Chunk& ch = chunks[c];
    const at::Tensor& t = tensors[ch.tensor];
    const size_t item = t.element_size();
    std::memset(static_cast<char*>(t.data_ptr()) + ch.begin * item, 0,
                (ch.end - ch.begin) * item);
  });
}

void ema(const EmaWork& w);

// The EMA pairs of an Adam step, for a pass of their own.
EmaWork ema_pairs(const AdamWork& w) {
  EmaWork pairs;
  pairs.weights = w.ema_weights;
  for (size_t i = 0; i < w.emas.size(); ++i) {
    if (!w.emas[i].defined()) continue;
    pairs.ema.push_back(w.emas[i]);
    pairs.params.push_back(w.params[i]);
  }
  return pairs;
}

void adam(AdamWork& w) {
  if (w.found_inf && read_scalar(*w.found_inf) != 0.0) {
    // Skipped update (inf/NaN gradients): parameters, state and steps stay;
    // the EMAs still move toward the parameters, as after a skipped step.
    if (w.zero_grads) zero_all(w.grads);
    const EmaWork pairs = ema_pairs(w);
    if (!pairs.ema.empty()) ema(pairs);
    return;
  }
  const double lr = w.lr_tensor ? read_scalar(*w.lr_tensor) : w.lr;
  const double grad_mult =
      grad_multiplier(w.grad_scale.has_value(), w.grad_scale ? read_scalar(*w.grad_scale) : 1.0,
                      w.grad_mult.has_value(), w.grad_mult ? read_scalar(*w.grad_mult) : 1.0);
  const bool beta1_zero = w.beta1 == 0.0;
  const cpu::KernelTable& k = cpu::active_kernels();
  const int64_t ahead = cpu::stream_prefetch_bytes();
  const EmaCoeffs<double>& ema_coeffs = w.ema_weights;
  std::vector<int64_t> numels(w.slots.size());
  for (size_t i = 0; i < numels.size(); ++i) numels[i] = w.slots[i].numel;
  const std::vector<Chunk> chunks = plan_chunks(numels);
  // Per task: the tensor it is in and that tensor's coefficients, from its
  // step count as it was before this call (the counts are advanced after).
  struct Current {
    int64_t tensor = -1;
    double step = -1.0;
    AdamCoeffs<double> coeffs;
  };
  std::vector<Current> current(static_cast<size_t>(std::max(1, at::get_num_threads())));
  auto update = [&](size_t c, int64_t task) {
    const Chunk& ch = chunks[c];
    const AdamSlot& slot = w.slots[ch.tensor];
    Current& now = current[task];
    if (now.tensor != ch.tensor) {
      now.tensor = ch.tensor;
      const double step =
          next_step(read_scalar(slot.step, slot.step_dtype), slot.step_dtype == at::kDouble);
      if (step != now.step) {  // tensors usually share their step: computed once
        now.step = step;
        now.coeffs = make_adam_coeffs(lr, w.beta1, w.beta2, w.eps, w.weight_decay, w.decoupled,
                                      w.maximize, grad_mult, step);
      }
    }
    const cpu::AdamTensors t{slot.param,          slot.grad, slot.exp_avg, slot.exp_avg_sq,
                             slot.max_exp_avg_sq, slot.ema,  to_dtype(slot.dtype)};
    k.adam(t, ch.begin, ch.end, now.coeffs, ema_coeffs, w.amsgrad, beta1_zero, w.zero_grads,
           ahead);
  };
  // The replaced exp_avgs are freed by one thread while the others stream:
  // unmapping pages takes time, not bandwidth (a tenth of an update on 2 MB
  // pages, a third on 4 KB ones; NOTES).
  for_each_chunk_after(chunks, [&w] { w.to_free.clear(); }, update);
  // Every chunk has read its step count; now they advance (an empty tensor's too).
  at::parallel_for(0, static_cast<int64_t>(w.slots.size()), 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const AdamSlot& slot = w.slots[i];
      if (slot.step_dtype == at::kDouble) *static_cast<double*>(slot.step) += 1.0;
      else *static_cast<float*>(slot.step) += 1.0f;
    }
  });
}

double factor_of(double factor, const OptTensor& factor_tensor) {
  return factor_tensor ? factor * read_scalar(*factor_tensor) : factor;
}

void mark_found_inf(const at::Tensor& found_inf) { *found_inf.data_ptr<float>() = 1.0f; }

// Inputs are read through const_data_ptr(): a copy-on-write one (torch._lazy_clone)
// is read where it is; data_ptr() would copy it, which torch forbids inside
// a parallel region. Written tensors were copied by the op's checks.
void scale(const ScaleWork& w) {
  const double factor = factor_of(w.factor, w.factor_tensor);
  const cpu::KernelTable& k = cpu::active_kernels();
  const auto chunks = plan(w.inputs);
  std::vector<char> bad(static_cast<size_t>(std::max(1, at::get_num_threads())), 0);
  for_each_chunk(chunks, [&](size_t c, int64_t task) {
    const Chunk& ch = chunks[c];
    const at::Tensor& in = w.inputs[ch.tensor];
    if (k.scale(in.const_data_ptr(), w.outputs[ch.tensor].data_ptr(),
                to_dtype(in.scalar_type()), ch.begin, ch.end, factor)) {
      bad[task] = 1;
    }
  });
  if (std::any_of(bad.begin(), bad.end(), [](char b) { return b != 0; })) {
    mark_found_inf(w.found_inf);
  }
}

void l2_norm(const NormWork& w) {
  // A scale past float's range (see past_range): the squares are summed at
  // 2^-shift of it and the sums scaled back in double.
  const ShiftedFactor scale = into_range<float>(factor_of(w.scale, w.scale_tensor));
  const double sum_factor = std::ldexp(1.0, 2 * scale.shift);
  const cpu::KernelTable& k = cpu::active_kernels();
  const auto chunks = plan(w.tensors);
  // One partial sum per chunk, combined below in a fixed order: the result
  // does not depend on the number of threads.
  std::vector<double> partial(chunks.size(), 0.0);
  std::vector<char> bad(static_cast<size_t>(std::max(1, at::get_num_threads())), 0);
  for_each_chunk(chunks, [&](size_t c, int64_t task) {
    const Chunk& ch = chunks[c];
    const at::Tensor& t = w.tensors[ch.tensor];
    bool not_finite = false;
    partial[c] = k.sum_squares(t.const_data_ptr(), to_dtype(t.scalar_type()), ch.begin, ch.end,
                               scale.factor, &not_finite);
    if (not_finite) bad[task] = 1;
  });
  std::vector<double> per_tensor(w.tensors.size(), 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) per_tensor[chunks[c].tensor] += partial[c];
  for (double& sum : per_tensor) sum *= sum_factor;
  double total = 0.0;
  float* out = w.per_tensor.data_ptr<float>();
  for (size_t i = 0; i < per_tensor.size(); ++i) {
    total += per_tensor[i];
    out[i] = static_cast<float>(std::sqrt(per_tensor[i]));
  }
  *w.total.data_ptr<float>() = static_cast<float>(std::sqrt(total));
  const bool any_bad = std::any_of(bad.begin(), bad.end(), [](char b) { return b != 0; });
  if (any_bad && w.found_inf) mark_found_inf(*w.found_inf);
}

void ema(const EmaWork& w) {
  const cpu::KernelTable& k = cpu::active_kernels();
  const int64_t ahead = cpu::stream_prefetch_bytes();
  const auto chunks = plan(w.ema);
  for_each_chunk(chunks, [&](size_t c, int64_t) {
    const Chunk& ch = chunks[c];
    const at::Tensor& e = w.ema[ch.tensor];
    k.ema(e.data_ptr(), w.params[ch.tensor].const_data_ptr(), to_dtype(e.scalar_type()),
          ch.begin, ch.end, w.weights, ahead);
  });
}

}  // namespace

void stream_pass(const TensorList& inputs, const TensorList& outputs,
                 std::optional<int64_t> ahead_bytes) {
  constexpr const char* op = "pygan_optim.stream_pass";
  TORCH_CHECK(inputs.size() >= 1 && inputs.size() <= 4 && outputs.size() >= 1 &&
                  outputs.size() <= 4,
              op, ": takes 1 to 4 inputs and 1 to 4 outputs, got ", inputs.size(), " and ",
              outputs.size());
  const int64_t n = inputs[0].numel();
  std::vector<const float*> in;
  std::vector<float*> out;
  for (const TensorList* list : {&inputs, &outputs}) {
    for (const at::Tensor& t : *list) {
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                      t.numel() == n,
                  op, ": every tensor must be a contiguous float32 CPU tensor of ", n,
                  " elements");
    }
  }
  for (const at::Tensor& t : inputs) in.push_back(t.const_data_ptr<float>());
  // Outputs that are also inputs (written back) first, then the write-only ones.
  std::vector<float*> fresh;
  for (const at::Tensor& t : outputs) {
    const bool is_input = std::find(in.begin(), in.end(), t.const_data_ptr<float>()) != in.end();
    (is_input ? out : fresh).push_back(t.data_ptr<float>());
  }
  const int n_back = static_cast<int>(out.size());
  out.insert(out.end(), fresh.begin(), fresh.end());
  const cpu::KernelTable& k = cpu::active_kernels();
  const bool in_range = !ahead_bytes ||
                        (*ahead_bytes >= 0 && *ahead_bytes <= cpu::kMaxStreamPrefetchBytes);
  TORCH_CHECK(in_range, op, ": ahead must be a byte count from 0 to ", cpu::kMaxStreamPrefetchBytes,
              ", got ", ahead_bytes.value_or(0));
  const int64_t ahead = ahead_bytes ? *ahead_bytes : cpu::stream_prefetch_bytes();
  // Contiguous ranges per thread, as the kernels' chunk partition gives them.
  at::parallel_for(0, n, kMinElementsPerTask, [&](int64_t begin, int64_t end) {
    k.stream(in.data(), static_cast<int>(in.size()), out.data(), static_cast<int>(out.size()),
             n_back, begin, end, ahead);
  });
}

const Backend& cpu_backend() {
  static const Backend backend{adam, scale, l2_norm, ema, /*grad_as_exp_avg=*/true,
                               /*exp_avg_written_over_grad=*/true};
  return backend;
}

}  // namespace pygan_optim
