// Keeping grads as exp_avgs (see kept_grads.h).
#include "kept_grads.h"

#include "checks.h"
#include "version_marks.h"

#include <unordered_map>
#include <utility>

namespace pygan_optim {
namespace {

// Memory from the device's own allocator: not a numpy array's or another
// library's, not a shared-memory segment (share_memory_) or pinned memory,
// which something besides this process's tensors can reach.
bool own_allocation(const c10::Storage& storage) {
  const c10::Allocator* allocator = c10::GetAllocator(storage.device_type());
  return allocator != nullptr && allocator->raw_deleter() != nullptr &&
         storage.data_ptr().get_deleter() == allocator->raw_deleter();
}

}  // namespace

// Clears the requests in `keep` (see grad_as_exp_avg in ops.h) that cannot be
// honoured exactly; returns how the others are kept.
Kept keep_grads_as_exp_avgs(std::vector<char>& keep, const AdamWork& w, at::TensorList params,
                            at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                            at::TensorList emas, const std::vector<char>& direct,
                            const Backend& backend) {
  TORCH_CHECK(keep.size() == grads.size(), "pygan_optim: grad_as_exp_avg has ", keep.size(),
              " flags for ", grads.size(), " parameters");
  // With beta1 == 0 the new exp_avg is the effective grad: the raw grad, or
  // one the kernels can write over it. Not when the update is skipped
  // (found_inf set): exp_avg must then keep its values.
  const bool raw = !w.maximize && (w.decoupled || w.weight_decay == 0.0) && !w.grad_scale &&
                   !w.grad_mult && !w.found_inf;
  const bool written = !raw && backend.exp_avg_written_over_grad &&
                       (!w.found_inf || w.found_inf->item<double>() == 0.0);
  const bool exact =
      backend.grad_as_exp_avg && w.beta1 == 0.0 && !w.zero_grads && (raw || written);
  bool any = false;
  for (size_t i = 0; i < keep.size(); ++i) {
    if (!keep[i]) continue;
    const at::Tensor& g = grads[i];
    // A storage used by another tensor (a view, DDP's bucket, a user's alias)
    // could change under the state. Memory reachable otherwise (a numpy array,
    // shared memory, a Python object of the grad's storage that the caller
    // holds) would tie the state to it, or un-share a shared exp_avg.
    // A grad whose storage is larger than itself would pin the rest as state.
    // The exp_avg takes the grad's storage (see swap_in_kept_grads), so both
    // must start there, and the exp_avg must accept a new storage.
    const at::Tensor& m = exp_avgs[i];
    keep[i] = exact && g.defined() && direct[i] && storage_users(g) == 1 &&
              !has_python_object(g.storage()) && own_allocation(g.storage()) &&
              g.storage().nbytes() == g.nbytes() && g.storage_offset() == 0 &&
              (m.is_same(g) ||
               (storage_users(m) == 1 && own_allocation(m.storage()) &&
                m.storage_offset() == 0 && !m.is_view() && !m.requires_grad() &&
                m.unsafeGetTensorImpl()->allow_tensor_metadata_change()));
    any = any || keep[i];
  }
  if (!any) return Kept::none;
  // A kept grad or replaced exp_avg must be no other tensor of the call (the
  // same object in two lists has one storage user; a grad given to two
  // parameters would become both their exp_avgs): its memory would become, or
  // be freed under, that other tensor. Each must appear once (twice where a
  // parameter's grad is its exp_avg).
  std::unordered_map<const c10::TensorImpl*, int> uses;
  for (size_t i = 0; i < keep.size(); ++i) {
    if (keep[i]) uses[grads[i].unsafeGetTensorImpl()] = uses[exp_avgs[i].unsafeGetTensorImpl()] = 0;
  }
  for (at::TensorList list : {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas}) {
    for (const at::Tensor& t : list) {
      if (!t.defined()) continue;
      auto it = uses.find(t.unsafeGetTensorImpl());
      if (it != uses.end()) ++it->second;
    }
  }
  for (size_t i = 0; i < keep.size(); ++i) {
    if (!keep[i]) continue;
    const int expected = grads[i].is_same(exp_avgs[i]) ? 2 : 1;
    if (uses[grads[i].unsafeGetTensorImpl()] != expected ||
        uses[exp_avgs[i].unsafeGetTensorImpl()] != expected) {
      keep.assign(keep.size(), 0);  // rare enough to give up keeping for the whole call
      return Kept::none;
    }
  }
  return raw ? Kept::as_is : Kept::written;
}

// The kept grads become their parameters' exp_avgs: each exp_avg tensor (the
// same object, so the state and whoever holds it see the new values, as with
// torch's in-place update) takes its grad's storage. The old storages go to
// `work.to_free`, to be freed while the kernels run, unless a Python object
// refers to them: those go to `on_return`, freed by the calling thread.
void swap_in_kept_grads(const std::vector<char>& keep, at::TensorList grads,
                        at::TensorList exp_avgs, AdamWork& work,
                        std::vector<c10::Storage>& on_return) {
  for (size_t i = 0; i < keep.size(); ++i) {
    if (!keep[i] || exp_avgs[i].is_same(grads[i])) continue;
    c10::TensorImpl* m = exp_avgs[i].unsafeGetTensorImpl();
    c10::Storage old = m->storage();
    m->set_storage_keep_dtype(grads[i].storage());
    if (version_counter_of(m) != nullptr) m->bump_version();  // none: an inference tensor
    (has_python_object(old) ? on_return : work.to_free).push_back(std::move(old));
  }
}

}  // namespace pygan_optim
