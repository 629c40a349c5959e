// With beta1 == 0, a grad kept as its parameter's exp_avg instead of copied
// into it (see grad_as_exp_avg in ops.h).
#pragma once

#include "ops.h"

#include <vector>

namespace pygan_optim {

// How the kept grads of a call become their exp_avgs (see grad_as_exp_avg in
// ops.h): as they are (the effective grad is the raw one) or with the
// effective grad written over them by the kernels.
enum class Kept { none, as_is, written };

// Clears the requests in `keep` that cannot be honoured exactly; returns how
// the others are kept.
Kept keep_grads_as_exp_avgs(std::vector<char>& keep, const AdamWork& w, at::TensorList params,
                            at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                            at::TensorList emas, const std::vector<char>& direct,
                            const Backend& backend);

// The kept grads become their parameters' exp_avgs (see kept_grads.cpp).
void swap_in_kept_grads(const std::vector<char>& keep, at::TensorList grads,
                        at::TensorList exp_avgs, AdamWork& work,
                        std::vector<c10::Storage>& on_return);

}  // namespace pygan_optim
