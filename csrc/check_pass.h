// The Adam step's check pass: every check of every parameter, on all threads,
// before the step writes anything; and where the kernels find each parameter's
// tensors (AdamSlot).
#pragma once

#include "ops.h"

#include <vector>

namespace pygan_optim {

// What the checks found, per parameter.
struct CheckedParams {
  std::vector<char> direct;     // 1: run on its own tensors; 0: on contiguous copies
  std::vector<AdamSlot> slots;  // where a direct parameter's tensors are (not validate_only)
  // A grad to be zeroed that carries an autograd graph (backward(create_graph=True)):
  // zeroing detaches it, as zero_grad(set_to_none=False) does.
  bool zeroed_grads_with_graph = false;
  // Read from the params' .grad only: some parameter with a grad, or its grad,
  // shares its storage with another tensor, has memory from elsewhere than
  // the device's allocator, or its grad may be another parameter's or state
  // tensor (grad_held_elsewhere), so the step looks for memory its tensors
  // share (check_shared_memory).
  bool maybe_shared = false;
};

// How many steps so far looked for shared memory (maybe_shared): for tests
// that the common cases do not pay for it.
int64_t shared_memory_checks_run();

// Where the kernels find parameter i's tensors (see AdamSlot). exp_avg, max
// and ema may be undefined.
AdamSlot slot_of(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m,
                 const at::Tensor& v, const at::Tensor& vmax, const at::Tensor& e,
                 const at::Tensor& step);

// Refuses the call, naming the culprit, if any parameter's tensors are unfit;
// a parameter whose grad is None is skipped, as torch.optim.Adam does.
// `read_grads`: null, or the list (one per parameter) that `lists.grads`
// refers to, filled here from the params' .grad.
CheckedParams check_adam_params(const AdamLists& lists, TensorList* read_grads,
                                const at::Device& device, bool amsgrad, bool zero_grads,
                                bool validate_only, bool inference_mode, const char* op);

}  // namespace pygan_optim
