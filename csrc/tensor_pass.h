// What makes a host pass over thousands of tensors (the Adam step's checks,
// its version marks) fast: the work shared between threads in batches, and
// each tensor's metadata asked for ahead of its use.
#pragma once

#include <ATen/ATen.h>

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

// The lists whose metadata the check pass asks for ahead, each as long as
// `params` (prefetch_ahead indexes them unchecked), but `grads`: empty when
// the grads are read from the parameters (`grads_of_params`).
struct AheadLists {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, steps;
  bool grads_of_params;
};

// The state tensors' metadata is asked for this far ahead: FusedAdam's packed
// state has it in one run, which misses at each object without these
// prefetches, and a line asked for 4 ahead (as the parameters') came too late.
// 0.2-0.3 ms less per 10k x 1k step than at 4 (AMD EPYC Zen 4, 2 threads; 8
// to 64 about alike).
constexpr size_t kStateAhead = 16;

// Before checking parameter i: the metadata of the parameters after it, in
// stages that follow the pointers as they arrive, one parameter per stage:
// i + 4 the parameter's and grad's TensorImpls, i + 3 the storages of those
// and of the state; when the grads are read from the parameters, i + 3 the
// parameter's autograd data too, i + 2 the grad's TensorImpl and i + 1 its
// storage; i + kStateAhead the state's TensorImpls. Past the batch too: the next
// tensors are likely this thread's. Farther apart was slower (AMD Zen 4).
// Written out stage by stage: loops over lists of lists cost about a fifth of
// the pass's instructions (callgrind, session 36).
inline void prefetch_ahead(size_t i, const AheadLists& l) {
  const size_t n = l.params.size();
  if (i + 4 < n) {
    prefetch_impl(l.params[i + 4]);
    if (!l.grads_of_params) prefetch_impl(l.grads[i + 4]);
  }
  if (i + 3 < n) {
    const size_t j = i + 3;
    prefetch_storage(l.params[j]);
    if (l.grads_of_params) {
      __builtin_prefetch(l.params[j].unsafeGetTensorImpl()->autograd_meta());
    } else {
      prefetch_storage(l.grads[j]);
    }
    prefetch_storage(l.exp_avgs[j]);
    prefetch_storage(l.exp_avg_sqs[j]);
    prefetch_storage(l.steps[j]);
  }
  if (l.grads_of_params) {
    if (i + 2 < n) {
      const at::Tensor& grad = grad_of(l.params[i + 2]);
      if (grad.defined()) prefetch_impl(grad);
    }
    if (i + 1 < n) {
      const at::Tensor& grad = grad_of(l.params[i + 1]);
      if (grad.defined()) prefetch_storage(grad);
    }
  }
  if (i + kStateAhead < n) {
    prefetch_impl(l.exp_avgs[i + kStateAhead]);
    prefetch_impl(l.exp_avg_sqs[i + kStateAhead]);
    prefetch_impl(l.steps[i + kStateAhead]);
  }
}

}  // namespace pygan_optim
