// The common case of the Adam step's checks (see plain_slot.h).
#include "plain_slot.h"

#include "checks.h"

namespace pygan_optim {

// Where the kernels find parameter i's tensors (see AdamSlot). exp_avg, max
// and ema may be undefined.
AdamSlot slot_of(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m,
                 const at::Tensor& v, const at::Tensor& vmax, const at::Tensor& e,
                 const at::Tensor& step) {
  auto data = [](const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
  return {data(p),     data(g),      data(m),           data(v),
          data(vmax),  data(e),      step.data_ptr(),   p.numel(),
          p.scalar_type(), step.scalar_type()};
}

namespace {

// The common case of a parameter's checks, read once per tensor: with 10k
// small tensors the full checks (checks.h) cost more in calls through torch's
// accessors, several per property and tensor, than in the misses on the
// metadata. What a companion tensor must share with its (plain, dense)
// parameter, read once per parameter.
struct PlainParam {
  c10::DispatchKeySet keys;
  caffe2::TypeMeta dtype;
  at::Device device;
  c10::IntArrayRef sizes, strides;
  size_t end_bytes;  // bytes from a tensor's first element to its last's end
};

bool same_ints(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k) {
    if (a[k] != b[k]) return false;
  }
  return true;
}

// Where a non-empty tensor's data is, if the full checks would take it as it
// is: what not_addressable, check_writable (`written`) and copies_on_write
// ask, with its key set equal to the parameter's (so no subclass, functional,
// nested, meta, negative or conjugate tensor, nor another kind of device) and
// its dtype, device, sizes and strides too (`shape`; else one element, as a
// step count). nullptr: the full checks decide.
void* plain_data(const at::Tensor& t, const PlainParam& p, bool shape, bool written,
                 bool inference_mode) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->key_set() != p.keys || impl->device() != p.device) return nullptr;
  size_t end_bytes = 0;
  if (shape) {
    if (impl->dtype() != p.dtype || !same_ints(impl->sizes(), p.sizes) ||
        !same_ints(impl->strides(), p.strides)) {
      return nullptr;
    }
    end_bytes = p.end_bytes;
  } else {
    if (impl->numel() != 1) return nullptr;
    end_bytes = impl->dtype().itemsize();  // its strides take it nowhere
  }
  if (written && !inference_mode && !impl->version_counter().enabled()) return nullptr;
  if (!impl->has_storage()) return nullptr;
  const c10::Storage& storage = impl->storage();
  c10::StorageImpl* data = storage.unsafeGetStorageImpl();
  if (data->has_materializer() || storage.data() == nullptr) return nullptr;
  const size_t start = static_cast<size_t>(impl->storage_offset()) * impl->dtype().itemsize();
  if (storage.nbytes() < start + end_bytes) return nullptr;
  // As Tensor::data_ptr() takes it (with the storage's own checks on writers).
  return static_cast<char*>(data->mutable_data()) + start;
}

}  // namespace

// Parameter i's slot when every one of its tensors passes plain_data (no EMA,
// no grad to detach: the caller asks the full checks for those); false when
// the full checks must decide.
bool plain_slot(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m,
                const at::Tensor& v, const at::Tensor& vmax, const at::Tensor& step,
                const at::Device& device, bool amsgrad, bool zero_grads, bool inference_mode,
                AdamSlot& slot) {
  if (!p.defined() || not_addressable(p) != nullptr || p.device() != device ||
      p.layout() != at::kStrided || !supported_dtype(p.scalar_type()) ||
      !p.is_non_overlapping_and_dense() || p.numel() == 0) {
    return false;
  }
  const c10::TensorImpl* impl = p.unsafeGetTensorImpl();
  const PlainParam plain{impl->key_set(), impl->dtype(), device, impl->sizes(), impl->strides(),
                         static_cast<size_t>(last_element_offset(p) + 1) * p.element_size()};
  AdamSlot s;
  s.param = plain_data(p, plain, true, true, inference_mode);
  s.grad = plain_data(g, plain, true, zero_grads, inference_mode);
  s.exp_avg = plain_data(m, plain, true, true, inference_mode);
  s.exp_avg_sq = plain_data(v, plain, true, true, inference_mode);
  s.step = plain_data(step, plain, false, true, inference_mode);
  if (!s.param || !s.grad || !s.exp_avg || !s.exp_avg_sq || !s.step) return false;
  if (amsgrad) {
    s.max_exp_avg_sq = plain_data(vmax, plain, true, true, inference_mode);
    if (!s.max_exp_avg_sq) return false;
  }
  const at::ScalarType step_dtype = step.scalar_type();
  if (step_dtype != at::kFloat && step_dtype != at::kDouble) return false;
  s.numel = p.numel();
  s.dtype = p.scalar_type();
  s.step_dtype = step_dtype;
  slot = s;
  return true;
}

}  // namespace pygan_optim
