#include "adam_plan.h"

#include <torch/csrc/autograd/python_variable.h>

#include <string>

namespace pygan_optim {
namespace py = pybind11;

namespace {

// The tensors the parameters' Python objects hold now, borrowed: the step
// keeps the GIL, so no other thread can swap or replace a parameter (or drop
// it) until the step returns. Counted references would cost 1.5-2 ms per step
// over 10k parameters (AMD EPYC Zen 4): a parameter's first C++ reference
// also takes one on its Python object (torch 2.13), which needs the GIL, so
// they could only be taken one after another on this thread.
class BorrowedTensors {
 public:
  explicit BorrowedTensors(const std::vector<py::object>& objects) {
    constexpr size_t kAhead = 8;  // the objects are scattered: their loads miss
    const size_t n = objects.size();
    tensors_.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      if (i + kAhead < n) __builtin_prefetch(objects[i + kAhead].ptr());
      tensors_.push_back(Traits::createBorrow(THPVariable_Unpack(objects[i].ptr())));
    }
  }
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors_) Traits::destroyBorrow(t);
  }
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  operator at::TensorList() const { return tensors_; }

 private:
  using Traits = c10::MaybeOwnedTraits<at::Tensor>;
  TensorList tensors_;
};

}  // namespace

AdamPlan::AdamPlan(std::vector<py::object> params, TensorList exp_avgs, TensorList exp_avg_sqs,
                   TensorList max_exp_avg_sqs, TensorList steps)
    : params_(std::move(params)),
      exp_avgs_(std::move(exp_avgs)),
      exp_avg_sqs_(std::move(exp_avg_sqs)),
      max_exp_avg_sqs_(std::move(max_exp_avg_sqs)),
      steps_(std::move(steps)) {
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!THPVariable_Check(params_[i].ptr())) {
      throw py::type_error("AdamPlan: params[" + std::to_string(i) + "] is a " +
                           std::string(Py_TYPE(params_[i].ptr())->tp_name) +
                           ", not a tensor");
    }
  }
  // Every edit of the state (state['exp_avg'] = p.detach()) builds the plan again.
  check_plan_state_disjoint(BorrowedTensors(params_), exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_,
                            steps_, "FusedAdam");
}

std::vector<int64_t> AdamPlan::step(double lr, double beta1, double beta2, double eps,
                                    double weight_decay, bool amsgrad, bool maximize,
                                    bool decoupled, const OptTensor& lr_tensor,
                                    const OptTensor& grad_scale, const OptTensor& found_inf,
                                    const OptTensor& grad_mult, bool zero_grads,
                                    bool validate_only, const std::vector<int64_t>& keep_grads,
                                    const std::vector<std::optional<at::Tensor>>& emas,
                                    double ema_momentum, std::optional<double> ema_new_weight) {
  TORCH_CHECK(!cleared_, "AdamPlan.step: this plan's parameters were released by the garbage "
              "collector (the optimizer was part of an unreachable reference cycle)");
  TORCH_CHECK(emas.empty() || emas.size() == params_.size(), "AdamPlan.step: ", emas.size(),
              " emas for ", params_.size(), " parameters");
  TensorList ema_list;  // an undefined tensor where a parameter has no EMA
  ema_list.reserve(emas.size());
  for (const auto& e : emas) ema_list.push_back(e.has_value() ? *e : at::Tensor());
  std::vector<char> keep;
  if (!keep_grads.empty() && !validate_only) {
    keep.assign(params_.size(), 0);
    for (int64_t i : keep_grads) {
      TORCH_CHECK(i >= 0 && static_cast<size_t>(i) < params_.size(),
                  "AdamPlan.step: keep_grads index ", i, " out of range for ", params_.size(),
                  " parameters");
      keep[i] = 1;
    }
  }
  const BorrowedTensors params(params_);
  // The grads are read from the parameters by the pass that checks them.
  adam_step_impl(params, {}, exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_, steps_, lr, beta1,
                 beta2, eps, weight_decay, amsgrad, maximize, decoupled, lr_tensor, grad_scale,
                 found_inf, grad_mult, zero_grads, validate_only, ema_list, ema_momentum,
                 ema_new_weight,
                 ema_list.empty() ? &cache_ : &ema_cache_, keep.empty() ? nullptr : &keep,
                 /*grads_of_params=*/true);
  std::vector<int64_t> kept;
  for (size_t i = 0; i < keep.size(); ++i) {
    if (keep[i]) kept.push_back(static_cast<int64_t>(i));
  }
  return kept;
}

int AdamPlan::visit_params(visitproc visit, void* arg) const {
  for (const py::object& param : params_) Py_VISIT(param.ptr());
  return 0;
}

void AdamPlan::clear_params() {
  cleared_ = true;
  // Emptied before the references go: freeing a parameter may run code that
  // comes back to this plan.
  std::vector<py::object> released;
  released.swap(params_);
}

}  // namespace pygan_optim
