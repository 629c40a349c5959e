// Op schemas, the backend for a device, and the plain ops (scale, L2 norm,
// EMA). The Adam step is in adam_step.cpp.
#include "ops.h"

#include "checks.h"
#include "memory_spans.h"
#include "version_marks.h"

#include <torch/library.h>

#include <utility>

namespace pygan_optim {

const Backend& backend_for(const at::Device& device) {
  if (device.is_cpu()) return cuda_interpret_enabled() ? cuda_interpret_backend() : cpu_backend();
#ifdef PYGAN_OPTIM_WITH_CUDA
  if (device.is_cuda()) return cuda_backend();
#endif
  TORCH_CHECK(false, "pygan_optim: no kernels for device ", device,
              " (this build has CPU", cuda_built() ? " and CUDA" : "", " kernels)");
}

bool cuda_built() {
#ifdef PYGAN_OPTIM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace {

// Checks shared by scale and scale_: inputs/outputs pairwise alike; found_inf a
// writable one-element float tensor on their device.
ScaleWork make_scale_work(at::TensorList inputs, TensorList outputs, double factor,
                          const OptTensor& factor_tensor, const at::Tensor& found_inf,
                          const char* op) {
  const at::Device device = common_device(inputs, op);
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_tensor(inputs[i], Name{"tensors", i}, device, op);
  }
  ScaleWork work;
  work.factor = factor;
  work.factor_tensor = scalar_on(factor_tensor, "factor", device, false, op);
  TORCH_CHECK(found_inf.defined(), op, ": found_inf is required");
  work.found_inf = *scalar_on(found_inf, "found_inf", device, true, op);
  check_writable(work.found_inf, "found_inf", c10::InferenceMode::is_enabled(), op);
  TORCH_CHECK(work.found_inf.scalar_type() == at::kFloat, op,
              ": found_inf must be float32 (as torch.amp.GradScaler's), not ",
              work.found_inf.scalar_type());
  work.inputs.assign(inputs.begin(), inputs.end());
  work.outputs = std::move(outputs);
  return work;
}

}  // namespace

void scale_(at::TensorList tensors, double factor, const OptTensor& factor_tensor,
            const at::Tensor& found_inf) {
  constexpr const char* op = "pygan_optim.scale_";
  if (tensors.empty()) return;
  ScaleWork work = make_scale_work(tensors, {}, factor, factor_tensor, found_inf, op);
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_writable(tensors[i], Name{"tensors", i}, c10::InferenceMode::is_enabled(), op);
    check_no_internal_overlap(tensors[i], Name{"tensors", i}, op);
  }
  check_disjoint({{"tensors", tensors}, scalar_arg("found_inf", work.found_inf)},
                 {scalar_arg("factor", work.factor_tensor)}, op);
  // In place: a tensor with gaps or overlaps is scaled through a gapless copy.
  std::vector<size_t> staged;
  for (size_t i = 0; i < work.inputs.size(); ++i) {
    if (!work.inputs[i].is_non_overlapping_and_dense()) {
      work.inputs[i] = work.inputs[i].contiguous();
      staged.push_back(i);
    }
  }
  work.outputs = work.inputs;
  backend_for(work.inputs[0].device()).scale(work);
  mark_written(work.outputs);
  mark_written(OptTensor(work.found_inf));
  for (size_t i : staged) tensors[i].copy_(work.outputs[i]);
}

TensorList scale(at::TensorList inputs, double factor, const OptTensor& factor_tensor,
                 const at::Tensor& found_inf) {
  constexpr const char* op = "pygan_optim.scale";
  if (inputs.empty()) return {};
  ScaleWork work = make_scale_work(inputs, {}, factor, factor_tensor, found_inf, op);
  for (auto& t : work.inputs) {
    if (!t.is_non_overlapping_and_dense()) t = t.contiguous();
    work.outputs.push_back(at::empty_like(t));  // empty_like keeps a dense layout
  }
  backend_for(work.inputs[0].device()).scale(work);
  mark_written(OptTensor(work.found_inf));
  return work.outputs;
}

std::tuple<at::Tensor, at::Tensor> l2_norm(at::TensorList tensors, double scale,
                                           const OptTensor& scale_tensor,
                                           const OptTensor& found_inf) {
  constexpr const char* op = "pygan_optim.l2_norm";
  const at::Device device = common_device(tensors, op);
  NormWork work;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_tensor(tensors[i], Name{"tensors", i}, device, op);
    // The norm does not depend on element order, only on reading each once.
    work.tensors.push_back(tensors[i].is_non_overlapping_and_dense() ? tensors[i]
                                                                     : tensors[i].contiguous());
  }
  work.scale = scale;
  work.scale_tensor = scalar_on(scale_tensor, "scale", device, false, op);
  work.found_inf = scalar_on(found_inf, "found_inf", device, true, op);
  if (work.found_inf) {
    check_writable(*work.found_inf, "found_inf", c10::InferenceMode::is_enabled(), op);
    TORCH_CHECK(work.found_inf->scalar_type() == at::kFloat, op,
                ": found_inf must be float32, not ", work.found_inf->scalar_type());
  }
  check_disjoint({scalar_arg("found_inf", work.found_inf)},
                 {{"tensors", tensors}, scalar_arg("scale", work.scale_tensor)}, op);
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
  work.total = at::empty({}, opts);
  work.per_tensor = at::empty({static_cast<int64_t>(tensors.size())}, opts);
  backend_for(device).l2_norm(work);
  mark_written(work.found_inf);
  return {work.total, work.per_tensor};
}

void ema_(at::TensorList ema, at::TensorList params, double momentum,
          std::optional<double> new_weight) {
  constexpr const char* op = "pygan_optim.ema_";
  if (ema.empty() && params.empty()) return;
  const EmaCoeffs<double> weights =
      ema_weights_of(momentum, new_weight, "momentum", "new_weight", op);
  check_lengths(ema.size(), params.size(), "params", op);
  const at::Device device = common_device(ema, op);
  EmaWork work;
  work.weights = weights;
  std::vector<size_t> staged;
  for (size_t i = 0; i < ema.size(); ++i) {
    check_tensor(ema[i], Name{"ema", i}, device, op);
    check_writable(ema[i], Name{"ema", i}, c10::InferenceMode::is_enabled(), op);
    check_no_internal_overlap(ema[i], Name{"ema", i}, op);
    check_companion(params[i], Name{"params", i}, ema[i], Name{"ema", i}, device, op);
    const bool direct = same_layout(ema[i], params[i]);
    work.ema.push_back(direct ? ema[i] : ema[i].contiguous());
    work.params.push_back(direct ? params[i] : params[i].contiguous());
    if (!direct) staged.push_back(i);
  }
  check_disjoint({{"ema", ema}}, {{"params", params}}, op);
  backend_for(device).ema(work);
  mark_written(work.ema);
  for (size_t i : staged) {
    if (!work.ema[i].is_same(ema[i])) ema[i].copy_(work.ema[i]);
  }
}

TORCH_LIBRARY(pygan_optim, m) {
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!)?[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
      "bool maximize, bool decoupled, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? grad_mult=None, bool zero_grads=False, "
      "bool validate_only=False, Tensor(g!)[] emas, int[] ema_index, float ema_momentum, "
      "float? ema_new_weight=None) -> ()");
  m.def("scale_(Tensor(a!)[] tensors, float factor, Tensor? factor_tensor, Tensor(b!) found_inf) -> ()");
  m.def("scale(Tensor[] inputs, float factor, Tensor? factor_tensor, Tensor(a!) found_inf) -> Tensor[]");
  m.def("l2_norm(Tensor[] tensors, float scale=1.0, Tensor? scale_tensor=None, Tensor(a!)? found_inf=None) -> (Tensor, Tensor)");
  m.def("ema_(Tensor(a!)[] ema, Tensor[] params, float momentum, float? new_weight=None) -> ()");
}

void register_entry_points(torch::Library& m) {
  m.impl("adam_step_", &adam_step_);
  m.impl("scale_", &scale_);
  m.impl("scale", &scale);
  m.impl("l2_norm", &l2_norm);
  m.impl("ema_", &ema_);
}

TORCH_LIBRARY_IMPL(pygan_optim, CPU, m) { register_entry_points(m); }

}  // namespace pygan_optim

