// Which of a few strided tensors share a byte: each tensor's elements as runs
// of contiguous bytes, all runs sorted once and swept. Exact for any strides
// (views with gaps interleave without sharing), O(R log R) in the number of
// runs R: a dense tensor is one run, a column of a row-major matrix one run
// per element.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace pygan_optim {

struct ByteRun {
  uintptr_t begin, end;  // [begin, end)
  uint32_t owner;        // index of the tensor it belongs to
};

// Appends the runs of a tensor with `sizes` and `strides` (in elements, none
// negative) of `item`-byte elements starting at `base`. Dims of size 1 or
// stride 0 add no address; the others are taken by decreasing stride and
// merged where one steps exactly over the next, so a dense tensor in any
// dimension order is one run.
inline void append_byte_runs(uintptr_t base, const int64_t* sizes, const int64_t* strides,
                             int64_t dims, int64_t item, uint32_t owner,
                             std::vector<ByteRun>& out) {
  std::vector<std::pair<int64_t, int64_t>> d;  // (stride, size)
  for (int64_t k = 0; k < dims; ++k) {
    if (sizes[k] == 0) return;  // no elements
    if (sizes[k] > 1 && strides[k] != 0) d.emplace_back(strides[k], sizes[k]);
  }
  std::sort(d.begin(), d.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<std::pair<int64_t, int64_t>> merged;
  for (const auto& [stride, size] : d) {
    if (!merged.empty() && merged.back().first == stride * size) {
      merged.back() = {stride, merged.back().second * size};
    } else {
      merged.emplace_back(stride, size);
    }
  }
  int64_t run = item;  // bytes per run: the innermost dim when it is contiguous
  if (!merged.empty() && merged.back().first == 1) {
    run = merged.back().second * item;
    merged.pop_back();
  }
  std::vector<int64_t> index(merged.size(), 0);
  for (;;) {
    int64_t offset = 0;
    for (size_t k = 0; k < merged.size(); ++k) offset += index[k] * merged[k].first;
    const uintptr_t begin = base + static_cast<uintptr_t>(offset * item);
    out.push_back({begin, begin + static_cast<uintptr_t>(run), owner});
    size_t k = merged.size();
    while (k > 0 && ++index[k - 1] == merged[k - 1].second) index[--k] = 0;
    if (k == 0) return;
  }
}

// The latest-ending run seen so far of two different owners, for the sweep.
class TwoFarthest {
 public:
  void add(const ByteRun& r) {
    if (r.owner == first_.owner) {
      first_.end = std::max(first_.end, r.end);
    } else if (r.end > first_.end) {
      second_ = first_;
      first_ = {r.end, r.owner};
    } else if (r.end > second_.end) {
      second_ = {r.end, r.owner};
    }
  }
  // An owner other than r's with a run ending after r begins, or kNone.
  uint32_t overlapping_other(const ByteRun& r) const {
    const Entry& e = first_.owner != r.owner ? first_ : second_;
    return e.owner != kNone && e.end > r.begin ? e.owner : kNone;
  }
  static constexpr uint32_t kNone = UINT32_MAX;

 private:
  struct Entry {
    uintptr_t end = 0;
    uint32_t owner = kNone;
  };
  Entry first_, second_;
};

// Sorts `runs` and returns the first pair of owners (later, earlier) that
// share a byte where at least one of them is written (written[owner]); two
// read-only owners may share. {kNone, kNone} when there is none.
inline std::pair<uint32_t, uint32_t> first_shared(std::vector<ByteRun>& runs,
                                                  const std::vector<char>& written) {
  std::sort(runs.begin(), runs.end(), [](const ByteRun& a, const ByteRun& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.owner < b.owner;
  });
  TwoFarthest any, writes;
  for (const ByteRun& r : runs) {
    const uint32_t other = written[r.owner] ? any.overlapping_other(r)
                                            : writes.overlapping_other(r);
    if (other != TwoFarthest::kNone) return {r.owner, other};
    any.add(r);
    if (written[r.owner]) writes.add(r);
  }
  return {TwoFarthest::kNone, TwoFarthest::kNone};
}

}  // namespace pygan_optim
