// Where the tensors of an op call lie in memory, and whether they share it.
#include "memory_spans.h"

#include "checks.h"
#include "pygan_optim/byte_runs.h"

#include <algorithm>
#include <vector>

namespace pygan_optim {
namespace {

// The bytes a tensor's elements can reach: [first element, last element + 1).
// data_ptr() unless `look_only`: a copy-on-write tensor is copied here, on the
// calling thread, before the kernels' parallel regions take its pointer (see
// copies_on_write); FusedAdam's step has its check pass see to that itself.
std::pair<uintptr_t, uintptr_t> span_of(const at::Tensor& t, bool look_only) {
  const auto begin = reinterpret_cast<uintptr_t>(look_only ? t.const_data_ptr() : t.data_ptr());
  return {begin, begin + static_cast<uintptr_t>((last_element_offset(t) + 1) * t.element_size())};
}

// Where the elements of the (defined, addressable, non-empty) tensors of some
// named lists lie, sorted by start.
struct Span {
  uintptr_t begin, end;
  const char* list;
  size_t index;
  const at::Tensor* tensor;
  bool written;
};

void add_spans(NamedLists lists, bool written, bool look_only, std::vector<Span>& spans) {
  for (const auto& [list_name, list, scalar] : lists) {
    for (size_t i = 0; i < list.size(); ++i) {
      if (!list[i].defined() || list[i].numel() == 0 || not_addressable(list[i]) != nullptr) {
        continue;  // nothing to read or write through (or refused elsewhere)
      }
      const auto [begin, end] = span_of(list[i], look_only);
      spans.push_back({begin, end, list_name, scalar ? kScalar : i, &list[i], written});
    }
  }
}

std::vector<Span> sorted_spans(NamedLists written, NamedLists read = {},
                               bool look_only = false) {
  std::vector<Span> spans;
  add_spans(written, true, look_only, spans);
  add_spans(read, false, look_only, spans);
  // Stable: of tensors starting together, the one listed first comes first.
  std::stable_sort(spans.begin(), spans.end(),
                   [](const Span& a, const Span& b) { return a.begin < b.begin; });
  return spans;
}

}  // namespace

NamedList scalar_arg(const char* name, const OptTensor& t) {
  return {name, t.has_value() ? at::TensorList(*t) : at::TensorList(), true};
}

// The tensors an op call writes must not share memory with each other, nor
// with the tensors it reads: the kernels run chunks of different tensors on
// different threads (a tensor given twice would race), read and write through
// restrict pointers, and torch's ops would apply the writes one after another.
// Tensors that are only read may share. Tensors whose spans overlap (views of
// one buffer) are compared byte run by byte run (byte_runs.h): views with gaps,
// such as W[:, :k] and W[:, k:], interleave without sharing. O(n log n) when
// spans do not overlap. Run by the plain ops and for the EMAs of a step; by
// AdamPlan's steps when a plan is built (its state against its params) and in
// a step where a parameter's or grad's storage has another user
// (check_shared_memory, adam_step.cpp).
void check_disjoint(NamedLists written, NamedLists read, const char* op, bool look_only) {
  const std::vector<Span> spans = sorted_spans(written, read, look_only);
  std::vector<ByteRun> runs;
  std::vector<char> writes;
  for (size_t first = 0; first < spans.size();) {
    // A cluster: spans [first, last) that overlap one another, transitively.
    uintptr_t reach = spans[first].end;
    bool any_written = spans[first].written;
    size_t last = first + 1;
    for (; last < spans.size() && spans[last].begin < reach; ++last) {
      reach = std::max(reach, spans[last].end);
      any_written = any_written || spans[last].written;
    }
    if (last - first > 1 && any_written) {
      runs.clear();
      writes.clear();
      for (size_t k = first; k < last; ++k) {
        const at::Tensor& t = *spans[k].tensor;
        append_byte_runs(spans[k].begin, t.sizes().data(), t.strides().data(), t.dim(),
                         t.element_size(), static_cast<uint32_t>(k - first), runs);
        writes.push_back(spans[k].written);
      }
      const auto [later, earlier] = first_shared(runs, writes);
      if (later != TwoFarthest::kNone) {
        const Span& a = spans[first + later];
        const Span& b = spans[first + earlier];
        TORCH_CHECK(!(a.written && b.written), op, ": ", Name{a.list, a.index}, " and ",
                    Name{b.list, b.index},
                    " share memory; both are written (a tensor given twice?)");
        const Span& w = a.written ? a : b;
        const Span& r = a.written ? b : a;
        TORCH_CHECK(false, op, ": ", Name{w.list, w.index}, " is written and shares memory with ",
                    Name{r.list, r.index}, ", which the same call reads");
      }
    }
    first = last;
  }
}

bool written_shares_memory(at::TensorList written, at::TensorList read) {
  try {
    check_disjoint({{"written", written}}, {{"read", read}}, "", /*look_only=*/true);
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

bool any_overlap(at::TensorList tensors) {
  const std::vector<Span> spans = sorted_spans({{"", tensors}});
  for (size_t k = 1; k < spans.size(); ++k) {
    if (spans[k].begin < spans[k - 1].end) return true;
  }
  return false;
}

}  // namespace pygan_optim
