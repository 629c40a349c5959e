// Telling autograd which tensors an op wrote: the kernels write through raw
// pointers, which the dispatcher cannot see.
#pragma once

#include "ops.h"

#include <array>

namespace pygan_optim {

// Each defined tensor's version is bumped (see version_marks.cpp).
void mark_written(at::TensorList tensors);
void mark_written(const OptTensor& t);

// What an Adam step writes, per parameter, with the lists' names for messages:
// params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (amsgrad), state_steps, emas,
// and grads when it zeroes them. An empty list where nothing is written.
constexpr size_t kWrittenLists = 7;
constexpr size_t kEmaList = 5;
constexpr const char* kWrittenNames[kWrittenLists] = {
    "params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "emas", "grads"};
inline std::array<at::TensorList, kWrittenLists> written_lists(const AdamLists& l, bool amsgrad,
                                                               bool zero_grads) {
  return {l.params, l.exp_avgs, l.exp_avg_sqs, amsgrad ? l.max_exp_avg_sqs : at::TensorList(),
          l.steps,  l.emas,     zero_grads ? l.grads : at::TensorList()};
}

// The counter holding a tensor's version (null for inference tensors): views
// share their base's. VariableVersion is a handle to it and nothing else.
inline const void* version_counter_of(const c10::TensorImpl* impl) {
  static_assert(sizeof(c10::VariableVersion) == sizeof(void*),
                "c10::VariableVersion is expected to hold one pointer to its counter");
  return *reinterpret_cast<const void* const*>(&impl->version_counter());
}

// After an Adam step's kernels, on all threads: bumps the version of every
// tensor the step wrote, and lets go of `release` (may be null) on the way.
void mark_adam_written(const AdamWork& w, TensorList* release);

}  // namespace pygan_optim
