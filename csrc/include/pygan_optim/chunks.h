// Chunk planning shared by the CPU and CUDA multi-tensor launchers.
//
// A list of tensors is cut into fixed-size chunks; a chunk is the unit of
// parallel work (an at::parallel_for task on the CPU, a thread block on CUDA).
// Boundaries depend only on the tensor sizes, never on the thread count, so
// reductions summed per chunk are reproducible.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace pygan_optim {

// 64K elements: 256 KiB per fp32 stream, so the five streams of an Adam chunk
// stay in a core's L2 while it is processed.
constexpr int64_t kDefaultChunkSize = 65536;

struct Chunk {
  int64_t tensor;  // index into the tensor list
  int64_t begin;   // first element, inclusive
  int64_t end;     // last element, exclusive
};

// Chunks in tensor order; a tensor's chunks are consecutive. Empty tensors get
// none.
inline std::vector<Chunk> plan_chunks(const std::vector<int64_t>& numels,
                                      int64_t chunk_size = kDefaultChunkSize) {
  if (chunk_size <= 0) throw std::invalid_argument("plan_chunks: chunk_size must be positive");
  int64_t total = 0;
  for (int64_t n : numels) {
    if (n < 0) throw std::invalid_argument("plan_chunks: negative numel");
    total += (n + chunk_size - 1) / chunk_size;
  }
  std::vector<Chunk> chunks;
  chunks.reserve(static_cast<size_t>(total));
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t begin = 0; begin < numels[t]; begin += chunk_size) {
      const int64_t end = begin + chunk_size < numels[t] ? begin + chunk_size : numels[t];
      chunks.push_back({static_cast<int64_t>(t), begin, end});
    }
  }
  return chunks;
}

// Splits `chunks` into `tasks` consecutive runs of about equal element counts
// (one per thread). Returns tasks + 1 offsets into `chunks`: run t is
// [offsets[t], offsets[t + 1]). Balancing by elements, not chunk count, keeps
// threads even when many small tensors sit beside a few large ones.
inline std::vector<size_t> partition_chunks(const std::vector<Chunk>& chunks, int64_t tasks) {
  if (tasks <= 0) throw std::invalid_argument("partition_chunks: tasks must be positive");
  int64_t total = 0;
  for (const Chunk& c : chunks) total += c.end - c.begin;
  std::vector<size_t> offsets(static_cast<size_t>(tasks) + 1, chunks.size());
  offsets[0] = 0;
  int64_t done = 0;
  size_t next = 0;
  for (int64_t t = 1; t < tasks; ++t) {
    const int64_t target = total / tasks * t + total % tasks * t / tasks;
    while (next < chunks.size() && done < target) {
      done += chunks[next].end - chunks[next].begin;
      ++next;
    }
    offsets[static_cast<size_t>(t)] = next;
  }
  return offsets;
}

}  // namespace pygan_optim
