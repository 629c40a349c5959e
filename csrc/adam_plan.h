// A param group's Adam tensors held on the C++ side between steps.
//
// Handing 10k parameters' tensors (params, states, steps: 50k tensors) through
// the dispatcher's Python binding costs about a microsecond each, more than
// the update itself. FusedAdam builds one AdamPlan per group and device when
// its state changes; each step then passes only scalars, and the grads are
// read from the parameters here.
//
// The parameters are held as their Python objects, not as tensors: a held
// tensor would count as a user of its TensorImpl, and torch.utils.swap_tensors
// (Module.load_state_dict and .to() under swap_module_params_on_conversion)
// refuses to swap a parameter someone else uses. Each step reads the tensor
// each object holds now.
#pragma once

#include <pybind11/pybind11.h>

#include "ops.h"

namespace pygan_optim {

class AdamPlan {
 public:
  // params: Python tensors (checked here).
  AdamPlan(std::vector<pybind11::object> params, TensorList exp_avgs, TensorList exp_avg_sqs,
           TensorList max_exp_avg_sqs, TensorList steps);

  // adam_step_ over the plan's tensors with each parameter's current grad
  // (a parameter without one is skipped). `keep_grads`: indices of parameters
  // whose grad should become their exp_avg (see grad_as_exp_avg in ops.h).
  // Returns those for which it did: their exp_avg tensors (the state's own
  // objects) now hold the grad's storage, and their old storage is freed.
  // `emas`: empty, or one per parameter of the plan (None: no EMA), blended
  // toward the new parameters in the same pass (see AdamWork::emas), with the
  // old averages' weight `ema_momentum` and the new parameters' weight
  // `ema_new_weight` (1 - ema_momentum in double when not given; see ema_).
  // Called with the GIL held, which it keeps (see BorrowedTensors in
  // adam_plan.cpp): other Python threads wait until the step returns.
  std::vector<int64_t> step(double lr, double beta1, double beta2, double eps,
                            double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                            const OptTensor& lr_tensor, const OptTensor& grad_scale,
                            const OptTensor& found_inf, const OptTensor& grad_mult,
                            bool zero_grads, bool validate_only,
                            const std::vector<int64_t>& keep_grads,
                            const std::vector<std::optional<at::Tensor>>& emas,
                            double ema_momentum, std::optional<double> ema_new_weight);

  size_t size() const { return params_.size(); }

  // For Python's cycle collector (module.cpp gives the type GC support): a plan
  // holds its parameters' Python objects, so a cycle through it (a module that
  // owns its optimizer, and a grad hook bound to that module) must be visible
  // to the collector, or it would never be freed.
  int visit_params(visitproc visit, void* arg) const;
  // Drops the parameters when the collector breaks a cycle; a later step refuses.
  void clear_params();
  // Host-to-device table copies made so far (CUDA and interpret mode).
  int64_t table_uploads() const { return cache_.uploads + ema_cache_.uploads; }

 private:
  std::vector<pybind11::object> params_;
  bool cleared_ = false;  // by clear_params
  TensorList exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_, steps_;
  // Reused while the tables stay the same; steps that blend EMAs have tables
  // of their own, so alternating with plain steps uploads nothing either.
  DeviceTableCache cache_, ema_cache_;
};

}  // namespace pygan_optim
