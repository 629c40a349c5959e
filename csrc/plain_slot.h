// Where the kernels find a parameter's tensors (AdamSlot), and the common
// case of the Adam step's checks read in one go per tensor.
#pragma once

#include "ops.h"

namespace pygan_optim {

// Parameter i's slot; exp_avg, max and ema may be undefined.
AdamSlot slot_of(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m,
                 const at::Tensor& v, const at::Tensor& vmax, const at::Tensor& e,
                 const at::Tensor& step);

// Fills `slot` and returns true when every tensor of the parameter passes the
// common case's checks; false when the full checks (checks.h) must decide.
bool plain_slot(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m,
                const at::Tensor& v, const at::Tensor& vmax, const at::Tensor& step,
                const at::Device& device, bool amsgrad, bool zero_grads, bool inference_mode,
                AdamSlot& slot);

}  // namespace pygan_optim
