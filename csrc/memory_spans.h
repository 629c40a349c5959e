// Whether the tensors of an op call share memory: written tensors must not
// share it with each other, nor with the tensors the call reads.
#pragma once

#include "ops.h"

#include <initializer_list>

namespace pygan_optim {

// A named list of tensors, for messages ("grads[3]").
struct NamedList {
  const char* name;
  at::TensorList list;
  bool scalar = false;  // one optional tensor argument (lr, found_inf, ...), named without index
};
using NamedLists = std::initializer_list<NamedList>;

// An optional scalar tensor argument as a NamedList: empty when absent.
NamedList scalar_arg(const char* name, const OptTensor& t);

// Refuses a call whose written tensors share memory (see memory_spans.cpp).
// `look_only`: the data pointers are only looked at (no copy-on-write copy is
// made, no writer check runs), as FusedAdam's per-step check of sharing needs.
void check_disjoint(NamedLists written, NamedLists read, const char* op,
                    bool look_only = false);

// Whether any two of the tensors share memory.
bool any_overlap(at::TensorList tensors);

// Whether a tensor of `written` shares memory with another of `written` or
// with one of `read` (looked at only, as check_disjoint with look_only).
bool written_shares_memory(at::TensorList written, at::TensorList read);

}  // namespace pygan_optim
