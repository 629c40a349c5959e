// How the CPU passes over many items (tensors' checks, chunks of the
// kernels) share them between threads: one run of items per task, each
// claimed in batches, in order; a task done with its own run then takes the
// batches left in the others'. A thread slowed down (by another step's dirty
// lines in the cache, by freeing memory, by whatever else shares its core)
// then does not keep the other waiting at the join, as it did with one fixed
// range per thread: up to 1.4 ms of a 10 ms step over 10k small tensors
// (NOTES, "10k x 1k"). Claims are per batch, not per item: the atomic add of
// a claim waits for the stores in flight.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace pygan_optim {

// Batch b holds items [starts[b], starts[b + 1]); run t (task t's own)
// holds batches [first_of_run[t], first_of_run[t + 1]).
struct Batches {
  std::vector<size_t> starts;        // one per batch, then the item count
  std::vector<size_t> first_of_run;  // one per task, then the batch count
};

// `tasks` runs of about n / tasks items each, in batches of `batch` items.
inline Batches even_batches(size_t n, size_t tasks, size_t batch) {
  Batches b;
  for (size_t t = 0; t < tasks; ++t) {
    b.first_of_run.push_back(b.starts.size());
    const size_t end = n * (t + 1) / tasks;
    for (size_t i = n * t / tasks; i < end; i += batch) b.starts.push_back(i);
  }
  b.first_of_run.push_back(b.starts.size());
  b.starts.push_back(n);
  return b;
}

// Calls fn(begin, end, task) for every batch's items, on one task per run
// (as many as first_of_run says, run by at::parallel_for), after first() on
// task 0 (work that takes no bandwidth, such as freeing memory). An exception
// from fn reaches the caller, as from at::parallel_for.
template <typename First, typename Fn>
void for_each_batch(const Batches& b, const First& first, const Fn& fn) {
  const int64_t tasks = static_cast<int64_t>(b.first_of_run.size()) - 1;
  struct alignas(64) Cursor {  // the next batch of a run; a line of its own
    std::atomic<size_t> next;
  };
  std::vector<Cursor> cursors(static_cast<size_t>(tasks));
  for (int64_t t = 0; t < tasks; ++t) {
    cursors[t].next.store(b.first_of_run[t], std::memory_order_relaxed);
  }
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t == 0) first();
      for (int64_t k = 0; k < tasks; ++k) {
        const int64_t run = (t + k) % tasks;
        for (;;) {
          const size_t next = cursors[run].next.fetch_add(1, std::memory_order_relaxed);
          if (next >= b.first_of_run[run + 1]) break;
          fn(b.starts[next], b.starts[next + 1], t);
        }
      }
    }
  });
}

// at::parallel_for(0, n, grain, fn) with the runs shared as above (as many
// as it would use threads), in batches of `batch` items: fn(begin, end) per
// batch.
template <typename Fn>
void shared_parallel_for(int64_t n, int64_t grain, size_t batch, const Fn& fn) {
  const int64_t tasks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain));
  if (tasks == 1) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  for_each_batch(even_batches(static_cast<size_t>(n), static_cast<size_t>(tasks), batch), [] {},
                 [&](size_t begin, size_t end, int64_t) {
                   fn(static_cast<int64_t>(begin), static_cast<int64_t>(end));
                 });
}

}  // namespace pygan_optim
