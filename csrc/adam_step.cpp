// The Adam step: every check before any write, the common case read once per
// tensor, staging of tensors whose layout differs from their parameter's,
// then the backend's kernels and the version marks.
#include "ops.h"

#include "check_pass.h"
#include "checks.h"
#include "kept_grads.h"
#include "memory_spans.h"
#include "version_marks.h"

#include <atomic>
#include <string>
#include <utility>
#include <vector>

namespace pygan_optim {

void check_plan_state_disjoint(at::TensorList params, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                               at::TensorList steps, const char* op) {
  try {
    check_disjoint({{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                    {"max_exp_avg_sqs", max_exp_avg_sqs}, {"state_steps", steps}},
                   {{"params", params}}, op);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, e.msg(), "; each parameter's state needs memory of its own (was the "
                "state edited, or loaded from a checkpoint that shares it?)");
  }
}

namespace {

bool same_memory(const at::Tensor& a, const at::Tensor& b) {
  return b.defined() && a.const_data_ptr() == b.const_data_ptr() && a.dtype() == b.dtype() &&
         a.sizes() == b.sizes() && a.strides() == b.strides();
}

std::atomic<int64_t> shared_memory_checks{0};  // see shared_memory_checks_run

// A FusedAdam step whose parameters or grads may share memory (the check
// pass's maybe_shared: a storage with other users, memory from elsewhere than
// the device's allocator, or a grad held elsewhere): two parameters that
// overlap (tied through .data) or a grad viewing (or being) another parameter
// or its state would be read and written
// in another order than torch's loop over the tensors (or by two threads at
// once). Refused, naming both. A grad that is exactly its own parameter or one
// of its own state tensors stays allowed: read, then written, element by
// element, as torch does. Parameters without a grad are not stepped.
void check_shared_memory(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::TensorList steps, const char* op) {
  shared_memory_checks.fetch_add(1, std::memory_order_relaxed);
  const size_t n = params.size();
  const bool amsgrad = !max_exp_avg_sqs.empty();
  // A copy-on-write tensor (a lazy clone) gets memory of its own before it is
  // written, and what it reads meanwhile does not change: left out.
  auto own = [](const at::Tensor& t) { return copies_on_write(t) ? at::Tensor() : t; };
  TensorList p(n), g(n), m(n), v(n), vmax(n), s(n);
  for (size_t i = 0; i < n; ++i) {
    if (!grads[i].defined()) continue;
    p[i] = own(params[i]);
    m[i] = own(exp_avgs[i]);
    v[i] = own(exp_avg_sqs[i]);
    if (amsgrad) vmax[i] = own(max_exp_avg_sqs[i]);
    s[i] = own(steps[i]);
    const at::Tensor& grad = grads[i];
    const bool own_tensor = same_memory(grad, params[i]) || same_memory(grad, exp_avgs[i]) ||
                            same_memory(grad, exp_avg_sqs[i]) ||
                            (amsgrad && same_memory(grad, max_exp_avg_sqs[i]));
    if (!own_tensor) {
      g[i] = own(grad);
    }
  }
  // Grads as read even when zeroed: grads sharing memory with each other are
  // zeroed after the pass (zero_after below), as zero_grad would; what they
  // must not share is memory with the tensors the update writes.
  try {
    check_disjoint({{"params", p}, {"exp_avgs", m}, {"exp_avg_sqs", v},
                    {"max_exp_avg_sqs", vmax}, {"state_steps", s}},
                   {{"grads", g}}, op, /*look_only=*/true);
  } catch (const c10::Error& e) {
    std::string msg = e.msg();
    const std::string plain_op_hint = " (a tensor given twice?)";
    const size_t at = msg.find(plain_op_hint);
    if (at != std::string::npos) msg.erase(at, plain_op_hint.size());
    TORCH_CHECK(false, msg, "; torch's Adam would update one, then read or update the other "
                "with its new values, an order the fused step does not keep: give each parameter, "
                "grad and state memory of its own (were weights tied through .data, or a "
                ".grad set to another parameter or its state?)");
  }
}

}  // namespace

int64_t shared_memory_checks_run() { return shared_memory_checks.load(); }

void adam_step_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList state_steps, double lr, double beta1, double beta2,
                    double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                    const OptTensor& lr_tensor, const OptTensor& grad_scale,
                    const OptTensor& found_inf, const OptTensor& grad_mult, bool zero_grads,
                    bool validate_only, at::TensorList emas, double ema_momentum,
                    std::optional<double> ema_new_weight,
                    DeviceTableCache* table_cache, std::vector<char>* grad_as_exp_avg,
                    bool grads_of_params) {
  constexpr const char* op = "pygan_optim.adam_step_";
  TORCH_CHECK_VALUE(lr >= 0.0, op, ": invalid learning rate ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, op, ": invalid beta1 ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, op, ": invalid beta2 ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": invalid eps ", eps);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, op, ": invalid weight_decay ", weight_decay);
  const size_t n = params.size();
  TensorList read_grads;  // grads_of_params: filled by the checks below
  if (grads_of_params) {
    TORCH_CHECK(grads.empty(), op, ": grads given and also to be read from the params");
    read_grads.resize(n);
    grads = read_grads;
  }
  check_lengths(n, grads.size(), "grads", op);
  check_lengths(n, exp_avgs.size(), "exp_avgs", op);
  check_lengths(n, exp_avg_sqs.size(), "exp_avg_sqs", op);
  check_lengths(n, state_steps.size(), "state_steps", op);
  if (amsgrad) check_lengths(n, max_exp_avg_sqs.size(), "max_exp_avg_sqs (amsgrad)", op);
  const bool with_emas = !emas.empty();
  EmaCoeffs<double> ema_weights{0.0, 1.0};
  if (with_emas) {
    check_lengths(n, emas.size(), "emas", op);
    ema_weights = ema_weights_of(ema_momentum, ema_new_weight, "ema_momentum",
                                 "ema_new_weight", op);
  }
  if (n == 0) return;
  const at::Device device = common_device(params, op);
  const bool inference_mode = c10::InferenceMode::is_enabled();
  // What runs after the kernels through torch's ops (write-backs of staged
  // tensors, grads zeroed late) is optimizer work, not part of a graph: under
  // grad mode autograd would refuse it on tensors that require grad, after
  // the kernels wrote (the kernels themselves write through raw pointers).
  const at::NoGradGuard no_grad;

  // Every check runs before any tensor is touched (check_pass.cpp).
  CheckedParams checked = check_adam_params(
      {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, emas},
      grads_of_params ? &read_grads : nullptr, device, amsgrad, zero_grads, validate_only,
      inference_mode, op);
  const std::vector<char>& direct = checked.direct;
  std::vector<AdamSlot>& slots = checked.slots;
  const bool zeroed_grads_with_graph = checked.zeroed_grads_with_graph;
  if (checked.maybe_shared) {
    check_shared_memory(params, grads, exp_avgs, exp_avg_sqs,
                        amsgrad ? max_exp_avg_sqs : at::TensorList(), state_steps, op);
  }

  size_t with_grad = 0;
  bool all_direct = true;
  for (size_t i = 0; i < n; ++i) {
    const bool has_grad = grads[i].defined();
    with_grad += has_grad;
    all_direct = all_direct && has_grad && direct[i];
  }

  AdamWork work;
  work.lr = lr;
  work.beta1 = beta1;
  work.beta2 = beta2;
  work.eps = eps;
  work.weight_decay = weight_decay;
  work.amsgrad = amsgrad;
  work.maximize = maximize;
  work.decoupled = decoupled;
  work.zero_grads = zero_grads;
  work.lr_tensor = scalar_on(lr_tensor, "lr", device, false, op);
  work.grad_scale = scalar_on(grad_scale, "grad_scale", device, false, op);
  work.found_inf = scalar_on(found_inf, "found_inf", device, false, op);
  work.grad_mult = scalar_on(grad_mult, "grad_mult", device, false, op);
  work.table_cache = table_cache;
  work.ema_weights = ema_weights;
  if (validate_only || with_grad == 0) {
    if (grad_as_exp_avg != nullptr) grad_as_exp_avg->assign(grad_as_exp_avg->size(), 0);
    if (validate_only) return;
  }
  // EMAs of parameters the update pass does not walk (no grad, or staged):
  // blended by an ema_ pass of their own after the update.
  TensorList emas_after, params_after;
  for (size_t i = 0; with_emas && i < n; ++i) {
    if (emas[i].defined() && !(grads[i].defined() && direct[i])) {
      emas_after.push_back(emas[i]);
      params_after.push_back(params[i]);
    }
  }
  auto blend_after = [&] {
    if (!emas_after.empty()) ema_(emas_after, params_after, ema_momentum, ema_new_weight);
  };
  if (with_grad == 0) {
    blend_after();
    return;
  }

  const Kept kept_as =
      grad_as_exp_avg == nullptr
          ? Kept::none
          : keep_grads_as_exp_avgs(*grad_as_exp_avg, work, params, grads, exp_avgs, exp_avg_sqs,
                                   amsgrad ? max_exp_avg_sqs : at::TensorList(), emas, direct,
                                   backend_for(device));
  const bool any_kept = kept_as != Kept::none;
  auto kept = [&](size_t i) { return any_kept && (*grad_as_exp_avg)[i]; };
  // A kept grad's slot: no exp_avg to store, or the grad itself to store into.
  auto kept_slot = [&](AdamSlot& slot) {
    slot.exp_avg = kept_as == Kept::written ? slot.grad : nullptr;
  };
  // Right before the backend runs, after anything that may still fail.
  std::vector<c10::Storage> freed_on_return;
  auto swap_kept = [&] {
    if (any_kept) swap_in_kept_grads(*grad_as_exp_avg, grads, exp_avgs, work, freed_on_return);
  };

  // One grad read by two parameters of the call (a grad tensor given to both):
  // zeros written in the pass could reach the second before it reads them, so
  // they are written after the pass instead.
  const bool zero_after = work.zero_grads && any_overlap(grads);
  if (zero_after) work.zero_grads = false;
  auto zero_late = [&] {
    for (size_t i = 0; zero_after && i < n; ++i) {
      if (grads[i].defined()) grads[i].zero_();
    }
    for (size_t i = 0; zeroed_grads_with_graph && i < n; ++i) {
      at::Tensor g = grads[i];  // the same TensorImpl
      if (!g.defined() || !g.requires_grad()) continue;
      if (g.grad_fn()) g.detach_();  // torch's zero_grad does the same
      else g.requires_grad_(false);
    }
  };

  if (all_direct) {  // the caller's lists as they are: no copies
    TensorList exp_avgs_left;  // undefined where the grad is kept instead
    if (any_kept) {
      exp_avgs_left.assign(exp_avgs.begin(), exp_avgs.end());
      for (size_t i = 0; i < n; ++i) {
        if (kept(i)) {
          exp_avgs_left[i] = at::Tensor();
          kept_slot(slots[i]);
        }
      }
    }
    work.lists() = {params, grads, any_kept ? at::TensorList(exp_avgs_left) : exp_avgs,
                    exp_avg_sqs, max_exp_avg_sqs, state_steps, emas};
    work.slots = std::move(slots);
    swap_kept();
    backend_for(device).adam(work);
    zero_late();  // before the grads read from the params are let go
    mark_adam_written(work, grads_of_params ? &read_grads : nullptr);
    return;
  }

  // Only the parameters with grads, staged where needed.
  TensorList own[7];  // params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, emas
  for (auto& list : own) list.reserve(with_grad);
  struct Staged {
    size_t arg, work;
  };
  std::vector<Staged> staged;
  for (size_t i = 0; i < n; ++i) {
    if (!grads[i].defined()) continue;
    auto pick = [&](const at::Tensor& t) { return direct[i] ? t : t.contiguous(); };
    if (!direct[i]) staged.push_back({i, own[0].size()});
    own[0].push_back(pick(params[i]));
    own[1].push_back(pick(grads[i]));
    own[2].push_back(kept(i) ? at::Tensor() : pick(exp_avgs[i]));
    own[3].push_back(pick(exp_avg_sqs[i]));
    if (amsgrad) own[4].push_back(pick(max_exp_avg_sqs[i]));
    own[5].push_back(state_steps[i]);  // one element: always contiguous
    if (with_emas) own[6].push_back(direct[i] ? emas[i] : at::Tensor());
    const size_t k = own[0].size() - 1;
    work.slots.push_back(slot_of(own[0][k], own[1][k], own[2][k], own[3][k],
                                 amsgrad ? own[4][k] : at::Tensor(),
                                 with_emas ? own[6][k] : at::Tensor(), own[5][k]));
    if (kept(i)) kept_slot(work.slots.back());
  }
  work.lists() = {own[0], own[1], own[2], own[3], own[4], own[5], own[6]};

  swap_kept();
  backend_for(device).adam(work);
  mark_adam_written(work, nullptr);

  // contiguous() returns the tensor itself when it already is contiguous.
  auto write_back = [](const at::Tensor& dst, const at::Tensor& src) {
    if (!src.is_same(dst)) dst.copy_(src);
  };
  for (const Staged& s : staged) {
    write_back(params[s.arg], own[0][s.work]);
    write_back(exp_avgs[s.arg], own[2][s.work]);
    write_back(exp_avg_sqs[s.arg], own[3][s.work]);
    if (amsgrad) write_back(max_exp_avg_sqs[s.arg], own[4][s.work]);
    if (work.zero_grads && !own[1][s.work].is_same(grads[s.arg])) grads[s.arg].zero_();
  }
  zero_late();
  blend_after();
}

void adam_step_(at::TensorList params, const OptTensorList& grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
                double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                const OptTensor& lr_tensor, const OptTensor& grad_scale,
                const OptTensor& found_inf, const OptTensor& grad_mult, bool zero_grads,
                bool validate_only, at::TensorList emas, at::IntArrayRef ema_index,
                double ema_momentum, std::optional<double> ema_new_weight) {
  TensorList plain_grads;  // an undefined tensor for None
  plain_grads.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    std::optional<at::Tensor> g = grads.get(i);
    plain_grads.push_back(g.has_value() ? std::move(*g) : at::Tensor());
  }
  // emas[k] belongs to params[ema_index[k]]; the impl wants one slot per parameter.
  constexpr const char* op = "pygan_optim.adam_step_";
  TORCH_CHECK(emas.size() == ema_index.size(), op, ": ", emas.size(), " emas but ",
              ema_index.size(), " ema_index entries");
  TensorList ema_slots(emas.empty() ? 0 : params.size());
  for (size_t k = 0; k < emas.size(); ++k) {
    const int64_t i = ema_index[k];
    TORCH_CHECK(i >= 0 && static_cast<size_t>(i) < params.size(), op, ": ema_index[", k, "] = ",
                i, " is out of range for ", params.size(), " params");
    TORCH_CHECK(!ema_slots[i].defined(), op, ": two emas for params[", i, "]");
    TORCH_CHECK(emas[k].defined(), op, ": emas[", k, "] is undefined");
    ema_slots[i] = emas[k];
  }
  if (!params.empty()) {
    check_disjoint({{"params", params}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                    {"max_exp_avg_sqs", amsgrad ? max_exp_avg_sqs : at::TensorList()},
                    {"state_steps", state_steps}, {"emas", ema_slots},  // named by param
                    {"grads", zero_grads ? plain_grads : at::TensorList()}},
                   {{"grads", zero_grads ? at::TensorList() : plain_grads},
                    scalar_arg("lr", lr_tensor), scalar_arg("grad_scale", grad_scale),
                    scalar_arg("grad_mult", grad_mult), scalar_arg("found_inf", found_inf)},
                   op);
  }
  adam_step_impl(params, plain_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                 beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, lr_tensor,
                 grad_scale, found_inf, grad_mult, zero_grads, validate_only, ema_slots,
                 ema_momentum, ema_new_weight);
}

}  // namespace pygan_optim
