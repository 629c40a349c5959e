// The input checks the ops share. Each names the tensor it refuses
// ("grads[3]") and runs before anything is written, so a refused call
// changes nothing.
#pragma once

#include "ops.h"

#include <ostream>

#if !__has_include(<c10/core/StorageMaterializer.h>)
#include <c10/core/impl/COW.h>  // torch 2.11: no StorageImpl materializer hook yet
#endif

namespace pygan_optim {

// Whether the storage copies its data on the first write (torch._lazy_clone):
// torch 2.13+ says so through a materializer hook (StorageMaterializer.h),
// 2.11 through the copy-on-write deleter of its DataPtr. Neither materializes.
inline bool storage_copies_on_write(const c10::StorageImpl& s) {
#if __has_include(<c10/core/StorageMaterializer.h>)
  return s.has_materializer();
#else
  return c10::impl::cow::is_cow_data_ptr(s.data_ptr());
#endif
}

// Names a tensor in messages, e.g. "grads[3]". Built only when a check fails,
// so a call over 10k tensors does not format 50k strings.
struct Name {
  const char* list;
  size_t index;
};
constexpr size_t kScalar = SIZE_MAX;  // Name::index of a scalar argument, not a list entry
std::ostream& operator<<(std::ostream& os, const Name& n);

// Inline (as last_element_offset below): the check pass asks it per tensor.
inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}
// The device every tensor of the call must be on: the first list's first tensor.
at::Device common_device(at::TensorList first, const char* op);
// How many elements past a non-empty tensor's first its last one lies.
inline int64_t last_element_offset(c10::IntArrayRef sizes, c10::IntArrayRef strides) {
  int64_t last = 0;
  for (size_t d = 0; d < sizes.size(); ++d) last += (sizes[d] - 1) * strides[d];
  return last;
}
inline int64_t last_element_offset(const at::Tensor& t) {
  return last_element_offset(t.sizes(), t.strides());
}
// Why the kernels cannot read and write `t` through its data pointer, or
// nullptr when they can (see checks.cpp).
const char* not_addressable(const at::Tensor& t);
// The keys of tensors the kernels cannot address as they are (a subclass or
// wrapper, a functional or nested tensor, a negative or conjugate view): the
// one list, which not_addressable and the check pass's common case
// (plain_slot) both test. NestedTensor, a per-backend
// functionality, is its bare functionality bit here, which NestedTensorCPU,
// NestedTensorCUDA, ... all carry (as is_nested() asks); has_any's debug check
// allows it, the set having no backend bits. (operator<< does not print it.)
constexpr c10::DispatchKeySet kNotAddressableKeys({
    c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
    c10::DispatchKey::Functionalize, c10::DispatchKey::NestedTensor, c10::DispatchKey::Negative,
    c10::DispatchKey::Conjugate});
void check_addressable(const at::Tensor& t, Name name, const char* op);
// `t` must be defined, plain (see not_addressable), dense (strided), of a
// supported float dtype, on `device`.
void check_tensor(const at::Tensor& t, Name name, const at::Device& device, const char* op);
// `t` must match `ref` (a parameter) in shape and dtype.
void check_companion(const at::Tensor& t, Name name, const at::Tensor& ref, Name ref_name,
                     const at::Device& device, const char* op);
// A one-element float tensor on `device` (see checks.cpp).
OptTensor scalar_on(const OptTensor& t, const char* name, const at::Device& device,
                    bool writable, const char* op);

// A tensor the op writes: an inference tensor only inside InferenceMode, as
// for torch's in-place ops. Checked up front so a refused step writes nothing.
// `inference_mode`: InferenceMode::is_enabled() on the calling thread (the
// checks may run on other threads, which do not share that setting).
template <typename N>  // a Name, or a plain name
void check_writable(const at::Tensor& t, const N& name, bool inference_mode, const char* op) {
  TORCH_CHECK(inference_mode || t.unsafeGetTensorImpl()->version_counter().enabled(), op, ": ",
              name, " is an inference tensor (created under torch.inference_mode()) and is "
              "written in place outside InferenceMode; clone it first, or call the op inside "
              "torch.inference_mode()");
}

void check_no_internal_overlap(const at::Tensor& t, Name name, const char* op);
void check_lengths(size_t expected, size_t got, const char* list, const char* op);
// True when `t` can be walked as a flat array in the same element order as the
// parameter `p` (same sizes and strides, no gaps or overlaps).
bool same_layout(const at::Tensor& p, const at::Tensor& t);
// True when `t` can be walked as a flat array alongside parameter `p`: same
// dtype, device, sizes and strides (p itself being dense).
bool walks_with(const at::Tensor& p, const at::Tensor& t);
// The full checks of parameter i, with messages naming the culprit.
void check_adam_param(size_t i, at::TensorList params, const at::Tensor& grad,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList max_exp_avg_sqs, bool amsgrad, bool zero_grads,
                      const at::Device& device, const char* op);
// A storage that copies its data on the first write to it (see checks.cpp).
bool copies_on_write(const at::Tensor& t);
// A storage flagged to refuse a writable data pointer, refused up front (see checks.cpp).
void check_data_access(const at::Tensor& t, Name name, const char* op);

// Whether a Python object was made for the storage (by `untyped_storage()`, or
// `torch.save` of a checkpoint): it holds a reference of its own as long as the
// storage lives.
bool has_python_object(const c10::Storage& storage);

// The tensors using t's storage (its Python object, if any, is not one).
int64_t storage_users(const at::Tensor& t);

// Whether other tensors use t's storage (as storage_users(t) > 1), safe on the
// check pass's worker threads; the Python object is looked at only when the
// count says more than one user (it counts too).
inline bool storage_shared(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  // (unsafe_storage: storage() throws for a wrapper subclass)
  if (!impl->has_storage()) return false;
  const c10::Storage& storage = impl->unsafe_storage();
  const size_t uses = storage.use_count();
  return uses > 1 && (uses > 2 || !has_python_object(storage));
}

// Whether a Python object is a tensor of a subclass (a Parameter), not a plain one.
bool is_tensor_subclass_object(PyObject* obj);

// Whether a grad read from its parameter may also be another parameter or a
// state tensor as the very same object (p1.grad = p0), which shares no storage
// with anything: a grad that requires grad or is a Parameter (a parameter
// usually is both), or one with more holders than its parameter's .grad, the
// check pass's copies of it (`copies`) and its Python object (a state tensor
// is held by its plan too). Safe on the check pass's worker threads. A grad
// that other threads copy too (one grad object for two parameters) may count
// more: that only asks for the exact check.
inline bool grad_held_elsewhere(const at::Tensor& g, size_t copies) {
  const c10::TensorImpl* impl = g.unsafeGetTensorImpl();
  PyObject* python = impl->pyobj_slot()->load_pyobj();
  return impl->requires_grad() || g.use_count() > 1 + copies + (python != nullptr) ||
         (python != nullptr && is_tensor_subclass_object(python));
}

// The raw deleter of the device's allocator (nullptr where there is none).
c10::DeleterFnPtr allocator_deleter(const at::Device& device);

// Whether t's memory was allocated with `deleter` (nullptr: taken as so).
inline bool from_deleter(const at::Tensor& t, c10::DeleterFnPtr deleter) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return deleter == nullptr || !impl->has_storage() ||
         impl->unsafe_storage().data_ptr().get_deleter() == deleter;
}

void check_step(const at::Tensor& step, size_t i, const at::Device& device, const char* op);
// An EMA to blend in the step: the parameter's dtype, device, shape and strides.
void check_ema(const at::Tensor& ema, size_t i, const at::Tensor& param,
               const at::Device& device, const char* op);
// The weights of an EMA blend, checked (see checks.cpp).
EmaCoeffs<double> ema_weights_of(double momentum, std::optional<double> new_weight,
                                 const char* momentum_name, const char* weight_name,
                                 const char* op);

}  // namespace pygan_optim
