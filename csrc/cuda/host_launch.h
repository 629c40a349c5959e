// Host side of the CUDA backend, shared by the real one (cuda_backend.cpp) and
// interpret mode (interpret_backend.cpp): plans chunks over the tensor lists,
// packs the per-tensor and chunk tables into one buffer, hands it to the
// device and launches the kernels of kernels.cu, one launch per dtype present
// in the list. What needs the CUDA runtime is behind `Runtime`:
//   Runtime::Guard(device)            makes `device` current for the scope
//   Runtime::stream(device)           the stream to enqueue on
//   Runtime::upload(bytes, device)    the bytes as a uint8 tensor on `device`,
//                                     copied without blocking the host
//   Runtime::used_on(tensor, stream)  the tensor is read by work on `stream`
//                                     (not to be reused before that work ends)
//   Runtime::capturing(stream)        `stream` is being captured into a CUDA graph
//   Runtime::record(stream)           an event after the work enqueued on `stream` so far
//   Runtime::wait_for(event, stream)  `stream`'s later work waits for that event
//   Runtime::check(error)             throws on a launch error
//
// Under capture nothing is copied from the host: the tables must be on the
// device from an earlier call with the same tensors (a warm-up step), and what
// the graph reads is held for as long as its cache lives.
//
// Inputs were checked by the entries (checks.h): tensors are dense, on one
// device, of a supported dtype, and the tensors of one parameter share their
// layout.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <iterator>
#include <list>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "kernels.cuh"
#include "pygan_optim/chunks.h"

namespace pygan_optim {
namespace PYGAN_CUDA_NS {
namespace host {

namespace kern = ::pygan_optim::PYGAN_CUDA_NS;
using kern::DType;

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float;
    case at::kDouble: return DType::Double;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Half;
    default: TORCH_CHECK(false, "pygan_optim (CUDA): unsupported dtype ", t);
  }
}

bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// A one-element tensor for the kernels to read. One of another floating dtype
// (float8, ...) is converted to float32 first; the copy goes into `keep`, which
// the caller holds until the kernels are enqueued (the caching allocator orders
// reuse of its memory after them on the stream).
kern::ScalarArg scalar_arg(const OptTensor& t, std::vector<at::Tensor>& keep) {
  if (!t.has_value() || !t->defined()) return {nullptr, DType::Float};
  at::Tensor s = *t;
  if (!kernel_dtype(s.scalar_type())) {
    s = s.to(at::kFloat);
    keep.push_back(s);
  }
  return {s.data_ptr(), dtype_of(s.scalar_type())};
}

// The chunks of all tensors (plan_chunks, so boundaries match the CPU's),
// reordered into one run per dtype; within a run a tensor's chunks stay
// consecutive. Chunk::tensor keeps indexing the full list.
struct Group {
  DType dtype;
  int64_t first;  // into Plan::chunks
  int64_t count;
};

struct Plan {
  std::vector<Chunk> chunks;
  std::vector<Group> groups;
};

// `empty_chunks`: an empty tensor gets one chunk of 0 elements (Adam advances
// its step there), else none.
Plan plan_by_dtype(at::TensorList tensors, bool empty_chunks = false) {
  std::vector<int64_t> numels;
  std::vector<DType> dtypes;
  numels.reserve(tensors.size());
  dtypes.reserve(tensors.size());
  for (const auto& t : tensors) {
    numels.push_back(t.numel());
    dtypes.push_back(dtype_of(t.scalar_type()));
  }
  std::vector<Chunk> all = plan_chunks(numels);
  if (empty_chunks) {
    for (size_t t = 0; t < numels.size(); ++t) {
      if (numels[t] == 0) all.push_back({static_cast<int64_t>(t), 0, 0});
    }
  }
  Plan plan;
  plan.chunks.reserve(all.size());
  for (DType d : {DType::Float, DType::Double, DType::BFloat16, DType::Half}) {
    const auto first = static_cast<int64_t>(plan.chunks.size());
    for (const Chunk& c : all) {
      if (dtypes[static_cast<size_t>(c.tensor)] == d) plan.chunks.push_back(c);
    }
    const auto count = static_cast<int64_t>(plan.chunks.size()) - first;
    if (count > 0) plan.groups.push_back({d, first, count});
  }
  return plan;
}

// Tables for the kernels: appended on the host, then handed to the device in
// one copy (Runtime::upload).
class DeviceTables {
 public:
  // Appends `items`; returns their offset for get().
  template <typename T>
  size_t add(const std::vector<T>& items) {
    static_assert(std::is_trivially_copyable_v<T>, "tables hold plain data");
    const size_t offset = (bytes_.size() + kAlign - 1) / kAlign * kAlign;
    bytes_.resize(offset + items.size() * sizeof(T));
    if (!items.empty()) std::memcpy(bytes_.data() + offset, items.data(), items.size() * sizeof(T));
    return offset;
  }

  // Copies the tables to `device` (Runtime::upload: enqueued on `stream`), or
  // takes the cache's copy when the bytes are the same. `what` names the call
  // in the error a capture gets when there is no copy yet.
  template <typename Runtime>
  void upload(const at::Device& device, cudaStream_t stream, DeviceTableCache* cache,
              const char* what) {
    const bool capturing = Runtime::capturing(stream);
    if (cache != nullptr && cache->tables.defined() && cache->tables.device() == device &&
        cache->bytes == bytes_) {
      device_ = cache->tables;
      // Tables copied on another stream may not have landed yet: their copy was
      // enqueued there behind that stream's work. (A capture needs no wait:
      // torch.cuda.graph synchronizes the device before it begins, and an
      // event recorded outside a capture is no ordinary dependency inside it.)
      if (!capturing && cache->tables_stream != static_cast<const void*>(stream)) {
        Runtime::wait_for(cache->tables_ready, stream);
      }
    } else {
      TORCH_CHECK(!capturing, "pygan_optim: ", what, " inside a CUDA graph capture needs its "
                  "tensor tables on the device already, from a call with the same tensors "
                  "outside the capture (a warm-up step); this call's tensors are new or at new "
                  "addresses. Warm up first, and keep the tensors (grads included: "
                  "zero_grad(set_to_none=False)) where they are.");
      device_ = Runtime::upload(bytes_, device);
      if (cache != nullptr) {
        cache->bytes = bytes_;
        cache->tables = device_;
        cache->tables_stream = stream;
        cache->tables_ready = Runtime::record(stream);
        ++cache->uploads;
      }
    }
    Runtime::used_on(device_, stream);
    if (capturing && cache != nullptr) cache->hold(device_);
  }

  const std::vector<char>& bytes() const { return bytes_; }

  // The device address of the table added at `offset`.
  template <typename T>
  T* get(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<char*>(device_.data_ptr()) + offset);
  }

 private:
  static constexpr size_t kAlign = 16;
  std::vector<char> bytes_;
  at::Tensor device_;
};

// The tables of plain op calls (adam_step_ without a plan, scale_, l2_norm,
// ema_), kept on the device by their bytes: a training loop calls them with
// the same tensors every step, so a repeated call copies nothing, and a CUDA
// graph captured around one finds its tables here. Entries used under capture
// stay for the life of the process (the graph keeps their addresses); of the
// others, the least recently used beyond kKeep are dropped.
template <typename Runtime>
class TableStore {
 public:
  // Uploads `tables` (or finds them) under the store's lock; then calls
  // with_entry(entry) under the lock too (the entry may be dropped after it).
  template <typename WithEntry = void (*)(DeviceTableCache&)>
  static void upload(DeviceTables& tables, const at::Device& device, cudaStream_t stream,
                     const char* what, const WithEntry& with_entry = [](DeviceTableCache&) {}) {
    const std::vector<char>& bytes = tables.bytes();
    // Never destroyed: freeing device memory at exit could outlive the allocator.
    static TableStore& store = *new TableStore;
    std::lock_guard<std::mutex> lock(store.mutex_);
    auto it = store.entries_.begin();
    while (it != store.entries_.end() &&
           !(it->bytes == bytes && it->tables.defined() && it->tables.device() == device)) {
      ++it;
    }
    if (it == store.entries_.end()) it = store.entries_.emplace(store.entries_.begin());
    else store.entries_.splice(store.entries_.begin(), store.entries_, it);
    tables.template upload<Runtime>(device, stream, &*it, what);
    with_entry(*it);
    store.evict();
  }

 private:
  static constexpr size_t kKeep = 64;

  void evict() {
    size_t unheld = 0;
    for (auto it = entries_.begin(); it != entries_.end();) {
      const bool drop = it->held.empty() && (++unheld > kKeep || !it->tables.defined());
      it = drop ? entries_.erase(it) : std::next(it);
    }
  }

  std::mutex mutex_;
  std::list<DeviceTableCache> entries_;  // most recently used first
};

template <typename Runtime>
void run_adam(AdamWork& w) {
  if (w.params.empty()) return;
  const at::Device device = w.params[0].device();
  const typename Runtime::Guard guard(device);
  const cudaStream_t stream = Runtime::stream(device);

  std::vector<at::Tensor> keep;
  kern::AdamArgs args{};
  args.lr = w.lr;
  args.beta1 = w.beta1;
  args.beta2 = w.beta2;
  args.eps = w.eps;
  args.weight_decay = w.weight_decay;
  args.amsgrad = w.amsgrad;
  args.maximize = w.maximize;
  args.decoupled = w.decoupled;
  args.zero_grads = w.zero_grads;
  args.lr_tensor = scalar_arg(w.lr_tensor, keep);
  args.grad_scale = scalar_arg(w.grad_scale, keep);
  args.grad_mult = scalar_arg(w.grad_mult, keep);
  args.found_inf = scalar_arg(w.found_inf, keep);
  args.ema = w.ema_weights;

  const size_t n = w.params.size();
  const Plan plan = plan_by_dtype(w.params, /*empty_chunks=*/true);
  std::vector<int32_t> chunks_of(n, 0);
  for (const Chunk& c : plan.chunks) ++chunks_of[static_cast<size_t>(c.tensor)];
  std::vector<kern::AdamTensor> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    const AdamSlot& slot = w.slots[i];  // exp_avg null where the grad is kept as exp_avg
    tensors[i] = {slot.param,       slot.grad, slot.exp_avg, slot.exp_avg_sq,
                  slot.max_exp_avg_sq, slot.ema, slot.step,
                  slot.step_dtype == at::kDouble ? DType::Double : DType::Float, chunks_of[i]};
  }
  DeviceTables tables;
  const size_t tensors_at = tables.add(tensors);
  const size_t chunks_at = tables.add(plan.chunks);

  // One counter per tensor, zero between launches (the kernel resets it).
  // Kept with the cached tables, so a repeated step allocates nothing either
  // (only on the same stream: the last step's kernels may still use it).
  at::Tensor counters;
  auto take_counters = [&](DeviceTableCache& cache, bool hold_params) {
    counters = cache.counters.defined() && cache.counters.device() == device &&
                       cache.counters.numel() == static_cast<int64_t>(n) &&
                       cache.counters_stream == static_cast<const void*>(stream)
                   ? cache.counters
                   : at::zeros({static_cast<int64_t>(n)},
                               at::TensorOptions().dtype(at::kInt).device(device));
    cache.counters = counters;
    cache.counters_stream = stream;
    if (Runtime::capturing(stream)) {
      cache.hold(counters);
      // Every replay writes the parameters at these addresses: held as long
      // as the plan (FusedAdam keeps captured plans), so none is freed or
      // swapped (torch.utils.swap_tensors refuses a held tensor) under it.
      // (A plan-less call's entry holds only its tables and counters, as
      // those of scale_ and ema_ do: the caller keeps its tensors.)
      if (hold_params) cache.hold(w.params);
    }
  };
  if (w.table_cache != nullptr) {
    tables.template upload<Runtime>(device, stream, w.table_cache, "adam_step_");
    take_counters(*w.table_cache, /*hold_params=*/true);
  } else {
    // A plan-less call (ops.adam_step_, a torch.compile'd step) finds its
    // tables and counters from an earlier call with the same tensors, so it
    // can be captured after a warm-up, as scale_, l2_norm and ema_ can.
    TableStore<Runtime>::upload(tables, device, stream, "adam_step_",
                                [&](DeviceTableCache& entry) { take_counters(entry, false); });
  }
  const auto* dev_tensors = tables.get<kern::AdamTensor>(tensors_at);
  const Chunk* dev_chunks = tables.get<Chunk>(chunks_at);
  for (const Group& g : plan.groups) {
    Runtime::check(kern::launch_adam(g.dtype, dev_tensors, dev_chunks + g.first, g.count,
                                     counters.data_ptr<int32_t>(), args, stream));
  }
}

// Uploads one table entry per tensor plus the chunk plan, then calls
// launch(group, entries, chunks of that group) once per dtype group.
template <typename Runtime, typename Entry, typename Launch>
void launch_by_dtype(at::TensorList tensors, const std::vector<Entry>& entries,
                     const at::Device& device, cudaStream_t stream, const char* what,
                     const Launch& launch) {
  const Plan plan = plan_by_dtype(tensors);
  DeviceTables tables;
  const size_t entries_at = tables.add(entries);
  const size_t chunks_at = tables.add(plan.chunks);
  TableStore<Runtime>::upload(tables, device, stream, what);
  for (const Group& g : plan.groups) {
    Runtime::check(launch(g, tables.get<Entry>(entries_at), tables.get<Chunk>(chunks_at) + g.first));
  }
}

template <typename Runtime>
void run_scale(const ScaleWork& w) {
  if (w.inputs.empty()) return;
  const at::Device device = w.inputs[0].device();
  const typename Runtime::Guard guard(device);
  const cudaStream_t stream = Runtime::stream(device);

  std::vector<at::Tensor> keep;
  const kern::ScalarArg factor_tensor = scalar_arg(w.factor_tensor, keep);
  std::vector<kern::ScaleTensor> tensors(w.inputs.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    tensors[i] = {w.inputs[i].data_ptr(), w.outputs[i].data_ptr()};
  }
  float* found_inf = w.found_inf.data_ptr<float>();
  // Out of place, the outputs are new tensors at each call: their tables can
  // never be found again, so no warm-up makes such a call capturable.
  const char* what = w.outputs[0].is_same(w.inputs[0])
                         ? "scale_"
                         : "scale (out of place: each call's outputs are new tensors; use scale_)";
  launch_by_dtype<Runtime>(w.inputs, tensors, device, stream, what,
                  [&](const Group& g, const kern::ScaleTensor* table, const Chunk* chunks) {
                    return kern::launch_scale(g.dtype, table, chunks, g.count, w.factor,
                                              factor_tensor, found_inf, stream);
                  });
}

template <typename Runtime>
void run_l2_norm(const NormWork& w) {
  const at::Device device = w.total.device();
  const typename Runtime::Guard guard(device);
  const cudaStream_t stream = Runtime::stream(device);

  std::vector<at::Tensor> keep;
  const kern::ScalarArg scale_tensor = scalar_arg(w.scale_tensor, keep);
  const size_t n = w.tensors.size();
  std::vector<const void*> data(n);
  for (size_t i = 0; i < n; ++i) data[i] = w.tensors[i].data_ptr();
  const Plan plan = plan_by_dtype(w.tensors);
  // Where each tensor's chunk sums land in `partial`: its chunks are consecutive.
  std::vector<kern::ChunkRange> ranges(n, kern::ChunkRange{0, 0});
  for (size_t k = 0; k < plan.chunks.size(); ++k) {
    kern::ChunkRange& r = ranges[static_cast<size_t>(plan.chunks[k].tensor)];
    if (r.count == 0) r.first = static_cast<int64_t>(k);
    ++r.count;
  }
  DeviceTables tables;
  const size_t data_at = tables.add(data);
  const size_t chunks_at = tables.add(plan.chunks);
  const size_t ranges_at = tables.add(ranges);
  TableStore<Runtime>::upload(tables, device, stream, "l2_norm");

  const auto num_chunks = static_cast<int64_t>(plan.chunks.size());
  at::Tensor partial = at::empty({num_chunks > 0 ? num_chunks : 1},
                                 at::TensorOptions().dtype(at::kDouble).device(device));
  double* partial_ptr = partial.data_ptr<double>();
  float* found_inf = w.found_inf ? w.found_inf->data_ptr<float>() : nullptr;
  for (const Group& g : plan.groups) {
    Runtime::check(kern::launch_sum_squares(
        g.dtype, tables.get<const void*>(data_at), tables.get<Chunk>(chunks_at) + g.first,
        g.count, w.scale, scale_tensor, partial_ptr + g.first, found_inf, stream));
  }
  Runtime::check(kern::launch_norm_reduce(partial_ptr, tables.get<kern::ChunkRange>(ranges_at),
                                          static_cast<int64_t>(n), w.per_tensor.data_ptr<float>(),
                                          w.total.data_ptr<float>(), stream));
}

template <typename Runtime>
void run_ema(const EmaWork& w) {
  if (w.ema.empty()) return;
  const at::Device device = w.ema[0].device();
  const typename Runtime::Guard guard(device);
  const cudaStream_t stream = Runtime::stream(device);

  std::vector<kern::EmaTensor> tensors(w.ema.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    tensors[i] = {w.ema[i].data_ptr(), w.params[i].data_ptr()};
  }
  launch_by_dtype<Runtime>(w.ema, tensors, device, stream, "ema_",
                  [&](const Group& g, const kern::EmaTensor* table, const Chunk* chunks) {
                    return kern::launch_ema(g.dtype, table, chunks, g.count, w.weights, stream);
                  });
}

}  // namespace host
}  // namespace PYGAN_CUDA_NS
}  // namespace pygan_optim
