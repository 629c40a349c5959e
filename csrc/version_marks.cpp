// Version bumps after the kernels' writes (see version_marks.h).
#include "version_marks.h"

#include "tensor_pass.h"
#include "work_sharing.h"

namespace pygan_optim {

// Tells autograd that tensors were written: a graph that saved one of them
// (forward, then step, then backward) then fails loudly, as with torch's own
// in-place ops, instead of using the new values. The kernels write through
// raw pointers, which the dispatcher cannot see.
void mark_written(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
  }
}
void mark_written(const OptTensor& t) {
  if (t.has_value() && t->defined()) t->unsafeGetTensorImpl()->bump_version();
}

namespace {

constexpr size_t kMarkAhead = 4;  // counters this far ahead, tensors twice as far (NOTES, 10k x 1k)

// The line of a TensorImpl's count (line 0) or of its version counter's handle
// (offset 40 in torch 2.13: on line 1 for half the objects).
void prefetch_line0(const at::Tensor& t) { __builtin_prefetch(t.unsafeGetTensorImpl(), 1); }
void prefetch_counter_handle(const at::Tensor& t) {
  __builtin_prefetch(&t.unsafeGetTensorImpl()->version_counter());
}

}  // namespace

// After the kernels: tells autograd what was written (see mark_written), on
// all threads; `release` (the grads the entry read itself) is let go here too,
// while the lines are being visited anyway.
void mark_adam_written(const AdamWork& w, TensorList* release) {
  const size_t n = w.params.size();
  const auto lists = written_lists(w, w.amsgrad, w.zero_grads);
  shared_parallel_for(static_cast<int64_t>(n), kCheckGrain, kSharedBatch,
                      [&](int64_t begin, int64_t end) {
    // Per list, the counter bumped last: views of one buffer (FusedAdam's
    // packed state) share theirs, and one bump per batch tells autograd enough.
    std::array<const void*, lists.size()> last{};
    for (size_t i = begin; i < static_cast<size_t>(end); ++i) {
      // Two stages: the lines of the tensors' counter handles (and of the
      // released grads' counts), then the counters the handles point to,
      // each a miss of its own.
      // Only within the batch: past it, the next batch's thread may be letting
      // go of the `release` grads (also the list of grads zeroed) being read.
      if (i + 2 * kMarkAhead < static_cast<size_t>(end)) {
        for (at::TensorList list : lists) {
          if (i + 2 * kMarkAhead < list.size()) prefetch_counter_handle(list[i + 2 * kMarkAhead]);
        }
        if (release != nullptr) prefetch_line0((*release)[i + 2 * kMarkAhead]);
      }
      if (i + kMarkAhead < static_cast<size_t>(end)) {
        for (at::TensorList list : lists) {
          if (i + kMarkAhead >= list.size() || !list[i + kMarkAhead].defined()) continue;
          const void* counter = version_counter_of(list[i + kMarkAhead].unsafeGetTensorImpl());
          if (counter != nullptr) __builtin_prefetch(counter, 1);
        }
      }
      size_t k = 0;
      for (at::TensorList list : lists) {
        const void*& bumped = last[k++];
        if (i >= list.size() || !list[i].defined()) continue;
        c10::TensorImpl* impl = list[i].unsafeGetTensorImpl();
        const void* counter = version_counter_of(impl);
        // Inference tensors (no counter) were allowed only under InferenceMode.
        if (counter != nullptr && counter != bumped) impl->bump_version();
        bumped = counter;
      }
      if (release != nullptr) (*release)[i].reset();
    }
  });
}

}  // namespace pygan_optim
