// The input checks the ops share (see checks.h).
#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>

namespace pygan_optim {
namespace {

// The storage bytes a non-empty tensor's elements reach, from the storage's start.
size_t bytes_reached(const at::Tensor& t) {
  return static_cast<size_t>(t.storage_offset() + last_element_offset(t) + 1) * t.element_size();
}

}  // namespace

std::ostream& operator<<(std::ostream& os, const Name& n) {
  if (n.index == kScalar) return os << n.list;
  return os << n.list << "[" << n.index << "]";
}

at::Device common_device(at::TensorList first, const char* op) {
  TORCH_CHECK(!first.empty(), op, ": expected a non-empty tensor list");
  TORCH_CHECK(first[0].defined(), op, ": tensor 0 is undefined");
  return first[0].device();
}

// Why the kernels cannot read and write `t` through its data pointer, or
// nullptr when they can. Subclasses and wrappers (DTensor, FakeTensor,
// functional tensors) keep their data elsewhere or nowhere: the pointer of the
// wrapper is null or not theirs. A negative view's memory holds -values.
// Which keys refuse a tensor is kNotAddressableKeys (checks.h), the list the
// check pass's common case tests too; here each kind gets its message.
const char* not_addressable(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.key_set();
  if (keys.has_any(kNotAddressableKeys)) {
    if (keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::PythonTLSSnapshot)) {
      return "a tensor subclass or wrapper (such as DTensor or FakeTensor) whose data cannot be "
             "addressed directly; pass plain tensors (for a DTensor, its to_local() shard)";
    }
    if (keys.has(c10::DispatchKey::Functionalize)) {
      return "a functional tensor (torch.func / functionalization), whose data cannot be "
             "addressed directly";
    }
    if (t.is_nested()) return "a nested tensor";
    // What the set leaves: a negative or conjugate view (a meta one is named as meta).
    if (!t.is_meta()) return "a negative or conjugate view; call resolve_neg() first";
  }
  if (t.is_meta()) return "a meta tensor, which has no data";
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (!impl->has_storage() || (t.numel() > 0 && impl->storage().data() == nullptr)) {
    return "a tensor without storage";
  }
  if (t.numel() > 0 && impl->storage().nbytes() < bytes_reached(t)) {
    return "a tensor whose elements reach past the end of its storage (was the storage "
           "resized under it?)";
  }
  return nullptr;
}

void check_addressable(const at::Tensor& t, Name name, const char* op) {
  const char* why = not_addressable(t);
  TORCH_CHECK(why == nullptr, op, ": ", name, " is ", why);
}

void check_tensor(const at::Tensor& t, Name name, const at::Device& device, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined (None)");
  check_addressable(t, name, op);
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " is ", t.layout(),
              "; only dense (strided) tensors are supported");
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", name, " has dtype ",
              t.scalar_type(), "; supported are float32, float64, bfloat16 and float16");
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(),
              " but the other tensors are on ", device);
}

void check_companion(const at::Tensor& t, Name name, const at::Tensor& ref, Name ref_name,
                     const at::Device& device, const char* op) {
  check_tensor(t, name, device, op);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ",
              ref_name, " has shape ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

// A one-element float tensor on `device`. One on the CPU is copied over (a
// host-to-device copy, no synchronisation; refused under a CUDA graph capture);
// `writable` ones must already be there.
OptTensor scalar_on(const OptTensor& t, const char* name, const at::Device& device,
                    bool writable, const char* op) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  const char* why = not_addressable(*t);
  TORCH_CHECK(why == nullptr, op, ": ", name, " is ", why);
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have one element, not ", t->numel());
  // Read-only scalars may also be integers (torch's Adam takes lr=torch.tensor(1)).
  const bool integral = at::isIntegralType(t->scalar_type(), /*includeBool=*/false);
  TORCH_CHECK(at::isFloatingType(t->scalar_type()) || (integral && !writable), op, ": ", name,
              writable ? " must be a floating-point tensor, not "
                       : " must be a floating-point or integer tensor, not ",
              t->scalar_type());
  // Kernels read float32 or float64; another dtype (bf16, fp16, int64, ...) is converted here.
  const bool readable = t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble;
  if (t->device() == device && readable) return t->is_contiguous() ? *t : t->contiguous();
  TORCH_CHECK(!writable, op, ": ", name, " must be a float32 tensor on ", device, ", not ",
              t->scalar_type(), " on ", t->device());
  TORCH_CHECK(t->device() == device || t->device().is_cpu(), op, ": ", name, " is on ",
              t->device(), " but the tensors are on ", device);
  const Backend& backend = backend_for(device);
  TORCH_CHECK(t->device() == device || backend.capturing == nullptr || !backend.capturing(device),
              op, ": ", name, " is a CPU tensor; inside a CUDA graph capture its value would "
              "be copied once, at capture, not at each replay: put it on ", device);
  return t->to(device, readable ? t->scalar_type() : at::kFloat, /*non_blocking=*/true);
}

// A written tensor whose elements share memory (an expanded view) would be
// staged through a copy whose write-back fails after the other writes: refused
// up front. Dense tensors (the Adam step's fast path) cannot have such elements.
void check_no_internal_overlap(const at::Tensor& t, Name name, const char* op) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
              " has elements that share memory (an expanded or stride-0 view) and is written "
              "in place; clone() it first");
}

void check_lengths(size_t expected, size_t got, const char* list, const char* op) {
  TORCH_CHECK(expected == got, op, ": expected ", expected, " tensors in ", list, ", got ",
              got);
}

bool same_layout(const at::Tensor& p, const at::Tensor& t) {
  return p.is_non_overlapping_and_dense() && t.strides() == p.strides();
}

// True when `t` can be walked as a flat array alongside parameter `p`: same
// dtype, device, sizes and strides (p itself being dense). The common case,
// checked with a few comparisons per tensor.
bool walks_with(const at::Tensor& p, const at::Tensor& t) {
  // not_addressable first: it refuses subclasses by their key set alone, before
  // device(), layout() or sizes() could ask Python, which on a worker thread of
  // the check pass would wait forever for the GIL its caller holds (AdamPlan).
  return t.defined() && not_addressable(t) == nullptr && t.scalar_type() == p.scalar_type() &&
         t.device() == p.device() && t.layout() == at::kStrided && t.sizes() == p.sizes() &&
         t.strides() == p.strides();
}

bool ema_walks_with(const at::Tensor& param, const at::Tensor& average) {
  return param.defined() && not_addressable(param) == nullptr && walks_with(param, average) &&
         average.const_data_ptr() != param.const_data_ptr();
}

void check_adam_param(size_t i, at::TensorList params, const at::Tensor& grad,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList max_exp_avg_sqs, bool amsgrad, bool zero_grads,
                      const at::Device& device, const char* op) {
  const Name p_name{"params", i};
  check_tensor(params[i], p_name, device, op);
  check_companion(grad, Name{"grads", i}, params[i], p_name, device, op);
  check_companion(exp_avgs[i], Name{"exp_avgs", i}, params[i], p_name, device, op);
  check_companion(exp_avg_sqs[i], Name{"exp_avg_sqs", i}, params[i], p_name, device, op);
  if (amsgrad) {
    check_companion(max_exp_avg_sqs[i], Name{"max_exp_avg_sqs", i}, params[i], p_name, device, op);
  }
  check_no_internal_overlap(params[i], p_name, op);
  if (zero_grads) check_no_internal_overlap(grad, Name{"grads", i}, op);
  check_no_internal_overlap(exp_avgs[i], Name{"exp_avgs", i}, op);
  check_no_internal_overlap(exp_avg_sqs[i], Name{"exp_avg_sqs", i}, op);
  if (amsgrad) check_no_internal_overlap(max_exp_avg_sqs[i], Name{"max_exp_avg_sqs", i}, op);
}

// A storage that copies its data on the first write to it (torch._lazy_clone).
// torch forbids that copy inside a parallel region, where the check pass and
// the kernels run, so the check pass leaves such a parameter's slot to the
// calling thread, whose slot_of (data_ptr) copies them before any kernel runs.
bool copies_on_write(const at::Tensor& t) {
  return t.defined() && t.unsafeGetTensorImpl()->has_storage() &&
         storage_copies_on_write(*t.unsafeGetTensorImpl()->storage().unsafeGetStorageImpl());
}

// A storage flagged to refuse access through a writable data pointer (as
// torch flags FakeTensor's and functional tensors' storages) fails
// Tensor::data_ptr(), which the slots and the staged write-backs call: asked
// up front by the full checks, with the tensor named, so that such a step
// writes nothing (a staged write-back, or a later call of a FusedAdam step
// that validate_only passed, would fail after other tensors were written).
// plain_data asks mutable_data() itself. Copy-on-write storages are skipped:
// materializing them is the calling thread's (see copies_on_write).
void check_data_access(const at::Tensor& t, Name name, const char* op) {
  if (!t.defined() || !t.unsafeGetTensorImpl()->has_storage() || copies_on_write(t)) return;
  try {
    t.unsafeGetTensorImpl()->storage().unsafeGetStorageImpl()->mutable_data();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, op, ": ", name, "'s data cannot be written through a data pointer: ",
                e.msg());
  }
}

void check_step(const at::Tensor& step, size_t i, const at::Device& device, const char* op) {
  const Name s_name{"state_steps", i};
  TORCH_CHECK(step.defined(), op, ": ", s_name, " is undefined (None)");
  check_addressable(step, s_name, op);
  TORCH_CHECK(step.numel() == 1, op, ": ", s_name, " must be a one-element tensor");
  TORCH_CHECK(step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble, op, ": ",
              s_name, " must be float32 or float64, not ", step.scalar_type());
  TORCH_CHECK(step.device() == device, op, ": ", s_name, " is on ", step.device(),
              " but params are on ", device);
}

// An EMA to blend in the step: the parameter's dtype, device, shape and
// strides, so it walks with the parameter (memory: check_disjoint).
void check_ema(const at::Tensor& ema, size_t i, const at::Tensor& param,
               const at::Device& device, const char* op) {
  const Name e_name{"emas", i}, p_name{"params", i};
  // The parameter's key set first (see walks_with): its sizes may be Python's.
  TORCH_CHECK(param.defined(), op, ": ", p_name, " is undefined (None)");
  check_addressable(param, p_name, op);
  check_companion(ema, e_name, param, p_name, device, op);
  TORCH_CHECK(ema.strides() == param.strides(), op, ": ", e_name, " has strides ", ema.strides(),
              " but ", p_name, " has strides ", param.strides(),
              "; an EMA blended in the step must have its parameter's layout");
}

// The weights of an EMA blend: `momentum` the old average's, `new_weight` the
// new parameters' (1 - momentum in double when not given). Each must be in
// [0, 1] (NaN is refused), and the two must add up to 1 but for rounding: a
// pair such as (m, m) or (1 - m, 1 - m) is a mistake, not a blend.
EmaCoeffs<double> ema_weights_of(double momentum, std::optional<double> new_weight,
                                 const char* momentum_name, const char* weight_name,
                                 const char* op) {
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, op, ": ", momentum_name,
                    " must be in [0, 1], not ", momentum);
  if (!new_weight.has_value()) return make_ema_coeffs(momentum);
  const double weight = *new_weight;
  TORCH_CHECK_VALUE(weight >= 0.0 && weight <= 1.0, op, ": ", weight_name,
                    " (the new parameters' weight) must be in [0, 1], not ", weight);
  TORCH_CHECK_VALUE(std::fabs(momentum + weight - 1.0) <= kEmaWeightSumSlack, op, ": ",
                    momentum_name, " (the old average's weight, ", momentum, ") and ",
                    weight_name, " (the new parameters' weight, ", weight,
                    ") must add up to 1; MMagic's momentum m is ", momentum_name, "=1-m, ",
                    weight_name, "=m");
  return make_ema_coeffs(momentum, weight);
}

bool has_python_object(const c10::Storage& storage) {
  return storage.unsafeGetStorageImpl()->pyobj_slot()->load_pyobj() != nullptr;
}

bool is_tensor_subclass_object(PyObject* obj) {
  // A plain read of the object's type, which the tensor keeps alive: safe
  // without the GIL.
  return Py_TYPE(obj) != reinterpret_cast<PyTypeObject*>(THPVariableClass);
}

c10::DeleterFnPtr allocator_deleter(const at::Device& device) {
  if (!device.is_cpu() && !device.is_cuda()) return nullptr;
  const c10::Allocator* allocator = c10::GetAllocator(device.type());
  return allocator == nullptr ? nullptr : allocator->raw_deleter();
}

int64_t storage_users(const at::Tensor& t) {
  if (!t.unsafeGetTensorImpl()->has_storage()) return 0;
  const c10::Storage& storage = t.unsafeGetTensorImpl()->unsafe_storage();
  return static_cast<int64_t>(storage.use_count()) - (has_python_object(storage) ? 1 : 0);
}

}  // namespace pygan_optim
