// What makes a host pass over thousands of tensors (the Adam step's checks,
// its version marks) fast: the work shared between threads in batches, and
// each tensor's metadata asked for ahead of its use.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

namespace pygan_optim {

// With thousands of small tensors the checks wait on cache misses (and TLB
// misses: each tensor's metadata sits on its own page, between tensors' data)
// for every tensor and its storage. Asking for them ahead, in stages that
// follow the pointers as they arrive, overlaps those waits.
constexpr int64_t kCheckGrain = 512;  // tensors per task: below this, one thread
constexpr size_t kSharedBatch = 256;  // tensors per claim (work_sharing.h)

// Every line of an object: a TensorImpl (176 bytes in torch 2.13, on a 16-byte
// boundary) spans up to 4 lines, its dtype, device and key set in the last.
template <size_t kBytes>
void prefetch_object(const void* object) {
  const char* start = static_cast<const char*>(object);
  for (size_t offset = 0; offset < kBytes; offset += 64) __builtin_prefetch(start + offset);
  __builtin_prefetch(start + kBytes - 1);
}
inline void prefetch_impl(const at::Tensor& t) {
  prefetch_object<sizeof(c10::TensorImpl)>(t.unsafeGetTensorImpl());
}
// The storage field as it is, without the (virtual) checks of storage(): a
// prefetch of any address is harmless, and the checks come later.
inline void prefetch_storage(const at::Tensor& t) {
  const c10::StorageImpl* storage = t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
  if (storage != nullptr) prefetch_object<sizeof(c10::StorageImpl)>(storage);
}

// A parameter's .grad without Tensor::grad()'s non-leaf warning check (an
// autograd call per parameter; a parameter is a leaf).
inline const at::Tensor& grad_of(const at::Tensor& param) {
  return param.unsafeGetTensorImpl()->grad();
}

// Parameter i's metadata, asked for ahead in stages that follow the pointers
// as they arrive: 0 the parameter's and grad's metadata, 1 the storages of
// those and of the state and the parameter's autograd data, 2 the grad's
// metadata and 3 the grad's storage (2 and 3 only when the grads are read
// from the parameters). `tensors`: params and grads; `state`: the state lists.
constexpr int kStages = 4;
inline void prefetch_stage(int stage, size_t i, std::initializer_list<at::TensorList> tensors,
                    std::initializer_list<at::TensorList> state, at::TensorList params,
                    bool grads_of_params) {
  if (stage == 0) {
    for (at::TensorList list : tensors) {
      if (i < list.size()) prefetch_impl(list[i]);
    }
  } else if (stage == 1) {
    for (auto lists : {tensors, state}) {
      for (at::TensorList list : lists) {
        if (i < list.size()) prefetch_storage(list[i]);
      }
    }
    if (grads_of_params) __builtin_prefetch(params[i].unsafeGetTensorImpl()->autograd_meta());
  } else if (grads_of_params) {
    const at::Tensor& grad = grad_of(params[i]);
    if (!grad.defined()) return;
    if (stage == 2) prefetch_impl(grad);
    else prefetch_storage(grad);
  }
}
// The state tensors' metadata is asked for this far ahead (their stage 0):
// FusedAdam's packed state has it in one run, which misses at each object
// without these prefetches, and a line asked for 4 ahead (as the
// parameters') came too late. 0.2-0.3 ms less per 10k x 1k step than at 4
// (AMD EPYC Zen 4, 2 threads; 8 to 64 about alike).
constexpr size_t kStateAhead = 16;

}  // namespace pygan_optim
