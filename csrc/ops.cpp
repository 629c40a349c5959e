// Op schemas, the input checks both backends share, and staging of tensors
// whose memory layout differs from their parameter's.
#include "ops.h"

#include "pygan_optim/byte_runs.h"
#include "work_sharing.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <string>
#include <unordered_map>
#include <utility>

namespace pygan_optim {
namespace {

const Backend& backend_for(const at::Device& device) {
  if (device.is_cpu()) return cuda_interpret_enabled() ? cuda_interpret_backend() : cpu_backend();
#ifdef PYGAN_OPTIM_WITH_CUDA
  if (device.is_cuda()) return cuda_backend();
#endif
  TORCH_CHECK(false, "pygan_optim: no kernels for device ", device,
              " (this build has CPU", cuda_built() ? " and CUDA" : "", " kernels)");
}

// Names a tensor in messages, e.g. "grads[3]". Built only when a check fails,
// so a call over 10k tensors does not format 50k strings.
struct Name {
  const char* list;
  size_t index;
};
constexpr size_t kScalar = SIZE_MAX;  // Name::index of a scalar argument, not a list entry
std::ostream& operator<<(std::ostream& os, const Name& n) {
  if (n.index == kScalar) return os << n.list;
  return os << n.list << "[" << n.index << "]";
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// The device every tensor of the call must be on: the first list's first tensor.
at::Device common_device(at::TensorList first, const char* op) {
  TORCH_CHECK(!first.empty(), op, ": expected a non-empty tensor list");
  TORCH_CHECK(first[0].defined(), op, ": tensor 0 is undefined");
  return first[0].device();
}

// How many elements past a non-empty tensor's first its last one lies.
int64_t last_element_offset(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return last;
}

// The storage bytes a non-empty tensor's elements reach, from the storage's start.
size_t bytes_reached(const at::Tensor& t) {
  return static_cast<size_t>(t.storage_offset() + last_element_offset(t) + 1) * t.element_size();
}

// Why the kernels cannot read and write `t` through its data pointer, or
// nullptr when they can. Subclasses and wrappers (DTensor, FakeTensor,
// functional tensors) keep their data elsewhere or nowhere: the pointer of the
// wrapper is null or not theirs. A negative view's memory holds -values.
const char* not_addressable(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.key_set();
  if (keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::PythonTLSSnapshot)) {
    return "a tensor subclass or wrapper (such as DTensor or FakeTensor) whose data cannot be "
           "addressed directly; pass plain tensors (for a DTensor, its to_local() shard)";
  }
  if (keys.has(c10::DispatchKey::Functionalize)) {
    return "a functional tensor (torch.func / functionalization), whose data cannot be "
           "addressed directly";
  }
  if (t.is_nested()) return "a nested tensor";
  if (t.is_meta()) return "a meta tensor, which has no data";
  if (t.is_neg() || t.is_conj()) return "a negative or conjugate view; call resolve_neg() first";
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (!impl->has_storage() || (t.numel() > 0 && impl->storage().data() == nullptr)) {
    return "a tensor without storage";
  }
  if (t.numel() > 0 && impl->storage().nbytes() < bytes_reached(t)) {
    return "a tensor whose elements reach past the end of its storage (was the storage "
           "resized under it?)";
  }
  return nullptr;
}

void check_addressable(const at::Tensor& t, Name name, const char* op) {
  const char* why = not_addressable(t);
  TORCH_CHECK(why == nullptr, op, ": ", name, " is ", why);
}

// `t` must be defined, plain (see not_addressable), dense (strided), of a
// supported float dtype, on `device`.
void check_tensor(const at::Tensor& t, Name name, const at::Device& device, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined (None)");
  check_addressable(t, name, op);
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " is ", t.layout(),
              "; only dense (strided) tensors are supported");
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", name, " has dtype ",
              t.scalar_type(), "; supported are float32, float64, bfloat16 and float16");
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(),
              " but the other tensors are on ", device);
}

// `t` must match `ref` (a parameter) in shape and dtype.
void check_companion(const at::Tensor& t, Name name, const at::Tensor& ref, Name ref_name,
                     const at::Device& device, const char* op) {
  check_tensor(t, name, device, op);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ",
              ref_name, " has shape ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

// A one-element float tensor on `device`. One on the CPU is copied over (a
// host-to-device copy, no synchronisation; refused under a CUDA graph capture);
// `writable` ones must already be there.
OptTensor scalar_on(const OptTensor& t, const char* name, const at::Device& device,
                    bool writable, const char* op) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  const char* why = not_addressable(*t);
  TORCH_CHECK(why == nullptr, op, ": ", name, " is ", why);
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have one element, not ", t->numel());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name,
              " must be a floating-point tensor, not ", t->scalar_type());
  // Kernels read float32 or float64; another dtype (bf16, fp16, ...) is converted here.
  const bool readable = t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble;
  if (t->device() == device && readable) return t->is_contiguous() ? *t : t->contiguous();
  TORCH_CHECK(!writable, op, ": ", name, " must be a float32 tensor on ", device, ", not ",
              t->scalar_type(), " on ", t->device());
  TORCH_CHECK(t->device() == device || t->device().is_cpu(), op, ": ", name, " is on ",
              t->device(), " but the tensors are on ", device);
  const Backend& backend = backend_for(device);
  TORCH_CHECK(t->device() == device || backend.capturing == nullptr || !backend.capturing(device),
              op, ": ", name, " is a CPU tensor; inside a CUDA graph capture its value would "
              "be copied once, at capture, not at each replay: put it on ", device);
  return t->to(device, readable ? t->scalar_type() : at::kFloat, /*non_blocking=*/true);
}

// Tells autograd that tensors were written: a graph that saved one of them
// (forward, then step, then backward) then fails loudly, as with torch's own
// in-place ops, instead of using the new values. The kernels write through
// raw pointers, which the dispatcher cannot see.
void mark_written(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
  }
}
void mark_written(const OptTensor& t) {
  if (t.has_value() && t->defined()) t->unsafeGetTensorImpl()->bump_version();
}

// A tensor the op writes: an inference tensor only inside InferenceMode, as
// for torch's in-place ops. Checked up front so a refused step writes nothing.
// `inference_mode`: InferenceMode::is_enabled() on the calling thread (the
// checks may run on other threads, which do not share that setting).
template <typename N>  // a Name, or a plain name
void check_writable(const at::Tensor& t, const N& name, bool inference_mode, const char* op) {
  TORCH_CHECK(inference_mode || t.unsafeGetTensorImpl()->version_counter().enabled(), op, ": ",
              name, " is an inference tensor (created under torch.inference_mode()) and is "
              "written in place outside InferenceMode; clone it first, or call the op inside "
              "torch.inference_mode()");
}

// A written tensor whose elements share memory (an expanded view) would be
// staged through a copy whose write-back fails after the other writes: refused
// up front. Dense tensors (the Adam step's fast path) cannot have such elements.
void check_no_internal_overlap(const at::Tensor& t, Name name, const char* op) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name,
              " has elements that share memory (an expanded or stride-0 view) and is written "
              "in place; clone() it first");
}

void check_lengths(size_t expected, size_t got, const char* list, const char* op) {
  TORCH_CHECK(expected == got, op, ": expected ", expected, " tensors in ", list, ", got ",
              got);
}

// True when `t` can be walked as a flat array in the same element order as the
// parameter `p` (same sizes and strides, no gaps or overlaps).
bool same_layout(const at::Tensor& p, const at::Tensor& t) {
  return p.is_non_overlapping_and_dense() && t.strides() == p.strides();
}

}  // namespace

bool cuda_built() {
#ifdef PYGAN_OPTIM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace {

// True when `t` can be walked as a flat array alongside parameter `p`: same
// dtype, device, sizes and strides (p itself being dense). The common case,
// checked with a few comparisons per tensor.
bool walks_with(const at::Tensor& p, const at::Tensor& t) {
  // not_addressable first: it refuses subclasses by their key set alone, before
  // device(), layout() or sizes() could ask Python, which on a worker thread of
  // the check pass would wait forever for the GIL its caller holds (AdamPlan).
  return t.defined() && not_addressable(t) == nullptr && t.scalar_type() == p.scalar_type() &&
         t.device() == p.device() && t.layout() == at::kStrided && t.sizes() == p.sizes() &&
         t.strides() == p.strides();
}

}  // namespace

bool ema_walks_with(const at::Tensor& param, const at::Tensor& average) {
  return param.defined() && not_addressable(param) == nullptr && walks_with(param, average) &&
         average.const_data_ptr() != param.const_data_ptr();
}

namespace {

// The full checks of parameter i, with messages naming the culprit.
void check_adam_param(size_t i, at::TensorList params, const at::Tensor& grad,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList max_exp_avg_sqs, bool amsgrad, bool zero_grads,
                      const at::Device& device, const char* op) {
  const Name p_name{"params", i};
  check_tensor(params[i], p_name, device, op);
  check_companion(grad, Name{"grads", i}, params[i], p_name, device, op);
  check_companion(exp_avgs[i], Name{"exp_avgs", i}, params[i], p_name, device, op);
  check_companion(exp_avg_sqs[i], Name{"exp_avg_sqs", i}, params[i], p_name, device, op);
  if (amsgrad) {
    check_companion(max_exp_avg_sqs[i], Name{"max_exp_avg_sqs", i}, params[i], p_name, device, op);
  }
  check_no_internal_overlap(params[i], p_name, op);
  if (zero_grads) check_no_internal_overlap(grad, Name{"grads", i}, op);
  check_no_internal_overlap(exp_avgs[i], Name{"exp_avgs", i}, op);
  check_no_internal_overlap(exp_avg_sqs[i], Name{"exp_avg_sqs", i}, op);
  if (amsgrad) check_no_internal_overlap(max_exp_avg_sqs[i], Name{"max_exp_avg_sqs", i}, op);
}

// With thousands of small tensors the checks wait on cache misses (and TLB
// misses: each tensor's metadata sits on its own page, between tensors' data)
// for every tensor and its storage. Asking for them ahead, in stages that
// follow the pointers as they arrive, overlaps those waits.
constexpr int64_t kCheckGrain = 512;  // tensors per task: below this, one thread
constexpr size_t kSharedBatch = 256;  // tensors per claim (work_sharing.h)

// Every line of an object: a TensorImpl (176 bytes in torch 2.13, on a 16-byte
// boundary) spans up to 4 lines, its dtype, device and key set in the last.
template <size_t kBytes>
void prefetch_object(const void* object) {
  const char* start = static_cast<const char*>(object);
  for (size_t offset = 0; offset < kBytes; offset += 64) __builtin_prefetch(start + offset);
  __builtin_prefetch(start + kBytes - 1);
}
void prefetch_impl(const at::Tensor& t) {
  prefetch_object<sizeof(c10::TensorImpl)>(t.unsafeGetTensorImpl());
}
// The storage field as it is, without the (virtual) checks of storage(): a
// prefetch of any address is harmless, and the checks come later.
void prefetch_storage(const at::Tensor& t) {
  const c10::StorageImpl* storage = t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
  if (storage != nullptr) prefetch_object<sizeof(c10::StorageImpl)>(storage);
}

// A parameter's .grad without Tensor::grad()'s non-leaf warning check (an
// autograd call per parameter; a parameter is a leaf).
const at::Tensor& grad_of(const at::Tensor& param) { return param.unsafeGetTensorImpl()->grad(); }

// Parameter i's metadata, asked for ahead in stages that follow the pointers
// as they arrive: 0 the parameter's and grad's metadata, 1 the storages of
// those and of the state and the parameter's autograd data, 2 the grad's
// metadata and 3 the grad's storage (2 and 3 only when the grads are read
// from the parameters). `tensors`: params and grads; `state`: the state lists.
constexpr int kStages = 4;
void prefetch_stage(int stage, size_t i, std::initializer_list<at::TensorList> tensors,
                    std::initializer_list<at::TensorList> state, at::TensorList params,
                    bool grads_of_params) {
  if (stage == 0) {
    for (at::TensorList list : tensors) {
      if (i < list.size()) prefetch_impl(list[i]);
    }
  } else if (stage == 1) {
    for (auto lists : {tensors, state}) {
      for (at::TensorList list : lists) {
        if (i < list.size()) prefetch_storage(list[i]);
      }
    }
    if (grads_of_params) __builtin_prefetch(params[i].unsafeGetTensorImpl()->autograd_meta());
  } else if (grads_of_params) {
    const at::Tensor& grad = grad_of(params[i]);
    if (!grad.defined()) return;
    if (stage == 2) prefetch_impl(grad);
    else prefetch_storage(grad);
  }
}
// The state tensors' metadata is asked for this far ahead (their stage 0):
// FusedAdam's packed state has it in one run, which misses at each object
// without these prefetches, and a line asked for 4 ahead (as the
// parameters') came too late. 0.2-0.3 ms less per 10k x 1k step than at 4
// (AMD EPYC Zen 4, 2 threads; 8 to 64 about alike).
constexpr size_t kStateAhead = 16;

// What an Adam step writes, per parameter, with the lists' names for messages:
// params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (amsgrad), state_steps, emas,
// and grads when it zeroes them. An empty list where nothing is written.
constexpr size_t kWrittenLists = 7;
constexpr size_t kEmaList = 5;
constexpr const char* kWrittenNames[kWrittenLists] = {
    "params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "emas", "grads"};
std::array<at::TensorList, kWrittenLists> written_lists(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
    at::TensorList emas, bool amsgrad, bool zero_grads) {
  return {params, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList(), steps,
          emas,   zero_grads ? grads : at::TensorList()};
}

constexpr size_t kMarkAhead = 4;  // counters this far ahead, tensors twice as far (NOTES, 10k x 1k)

// The counter holding a tensor's version (null for inference tensors): views
// share their base's. VariableVersion is a handle to it and nothing else.
const void* version_counter_of(const c10::TensorImpl* impl) {
  static_assert(sizeof(c10::VariableVersion) == sizeof(void*),
                "c10::VariableVersion is expected to hold one pointer to its counter");
  return *reinterpret_cast<const void* const*>(&impl->version_counter());
}

// The line of a TensorImpl's count (line 0) or of its version counter's handle
// (offset 40 in torch 2.13: on line 1 for half the objects).
void prefetch_line0(const at::Tensor& t) { __builtin_prefetch(t.unsafeGetTensorImpl(), 1); }
void prefetch_counter_handle(const at::Tensor& t) {
  __builtin_prefetch(&t.unsafeGetTensorImpl()->version_counter());
}

// After the kernels: tells autograd what was written (see mark_written), on
// all threads; `release` (the grads the entry read itself) is let go here too,
// while the lines are being visited anyway.
void mark_adam_written(const AdamWork& w, TensorList* release) {
  const size_t n = w.params.size();
  const auto lists = written_lists(w.params, w.grads, w.exp_avgs, w.exp_avg_sqs,
                                   w.max_exp_avg_sqs, w.steps, w.emas, w.amsgrad, w.zero_grads);
  shared_parallel_for(static_cast<int64_t>(n), kCheckGrain, kSharedBatch,
                      [&](int64_t begin, int64_t end) {
    // Per list, the counter bumped last: views of one buffer (FusedAdam's
    // packed state) share theirs, and one bump per batch tells autograd enough.
    std::array<const void*, lists.size()> last{};
    for (size_t i = begin; i < static_cast<size_t>(end); ++i) {
      // Two stages: the lines of the tensors' counter handles (and of the
      // released grads' counts), then the counters the handles point to,
      // each a miss of its own.
      // Only within the batch: past it, the next batch's thread may be letting
      // go of the `release` grads (also the list of grads zeroed) being read.
      if (i + 2 * kMarkAhead < static_cast<size_t>(end)) {
        for (at::TensorList list : lists) {
          if (i + 2 * kMarkAhead < list.size()) prefetch_counter_handle(list[i + 2 * kMarkAhead]);
        }
        if (release != nullptr) prefetch_line0((*release)[i + 2 * kMarkAhead]);
      }
      if (i + kMarkAhead < static_cast<size_t>(end)) {
        for (at::TensorList list : lists) {
          if (i + kMarkAhead >= list.size() || !list[i + kMarkAhead].defined()) continue;
          const void* counter = version_counter_of(list[i + kMarkAhead].unsafeGetTensorImpl());
          if (counter != nullptr) __builtin_prefetch(counter, 1);
        }
      }
      size_t k = 0;
      for (at::TensorList list : lists) {
        const void*& bumped = last[k++];
        if (i >= list.size() || !list[i].defined()) continue;
        c10::TensorImpl* impl = list[i].unsafeGetTensorImpl();
        const void* counter = version_counter_of(impl);
        // Inference tensors (no counter) were allowed only under InferenceMode.
        if (counter != nullptr && counter != bumped) impl->bump_version();
        bumped = counter;
      }
      if (release != nullptr) (*release)[i].reset();
    }
  });
}

// A storage that copies its data on the first write to it (torch._lazy_clone).
// torch forbids that copy inside a parallel region, where the check pass and
// the kernels run, so the check pass leaves such a parameter's slot to the
// calling thread, whose slot_of (data_ptr) copies them before any kernel runs.
bool copies_on_write(const at::Tensor& t) {
  return t.defined() && t.unsafeGetTensorImpl()->has_storage() &&
         t.unsafeGetTensorImpl()->storage().unsafeGetStorageImpl()->has_materializer();
}

// A storage flagged to refuse access through a writable data pointer (as
// torch flags FakeTensor's and functional tensors' storages) fails
// Tensor::data_ptr(), which the slots and the staged write-backs call: asked
// up front by the full checks, with the tensor named, so that such a step
// writes nothing (a staged write-back, or a later call of a FusedAdam step
// that validate_only passed, would fail after other tensors were written).
// plain_data asks mutable_data() itself. Copy-on-write storages are skipped:
// materializing them is the calling thread's (see copies_on_write).
void check_data_access(const at::Tensor& t, Name name, const char* op) {
  if (!t.defined() || !t.unsafeGetTensorImpl()->has_storage() || copies_on_write(t)) return;
  try {
    t.unsafeGetTensorImpl()->storage().unsafeGetStorageImpl()->mutable_data();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, op, ": ", name, "'s data cannot be written through a data pointer: ",
                e.msg());
  }
}

// Where the kernels find parameter i's tensors (see AdamSlot). exp_avg, max
// and ema may be undefined.
AdamSlot slot_of(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m,
                 const at::Tensor& v, const at::Tensor& vmax, const at::Tensor& e,
                 const at::Tensor& step) {
  auto data = [](const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
  return {data(p),     data(g),      data(m),           data(v),
          data(vmax),  data(e),      step.data_ptr(),   p.numel(),
          p.scalar_type(), step.scalar_type()};
}

// The common case of a parameter's checks, read once per tensor: with 10k
// small tensors the full checks (below) cost more in calls through torch's
// accessors, several per property and tensor, than in the misses on the
// metadata. What a companion tensor must share with its (plain, dense)
// parameter, read once per parameter.
struct PlainParam {
  c10::DispatchKeySet keys;
  caffe2::TypeMeta dtype;
  at::Device device;
  c10::IntArrayRef sizes, strides;
  size_t end_bytes;  // bytes from a tensor's first element to its last's end
};

bool same_ints(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k) {
    if (a[k] != b[k]) return false;
  }
  return true;
}

// Where a non-empty tensor's data is, if the full checks would take it as it
// is: what not_addressable, check_writable (`written`) and copies_on_write
// ask, with its key set equal to the parameter's (so no subclass, functional,
// nested, meta, negative or conjugate tensor, nor another kind of device) and
// its dtype, device, sizes and strides too (`shape`; else one element, as a
// step count). nullptr: the full checks decide.
void* plain_data(const at::Tensor& t, const PlainParam& p, bool shape, bool written,
                 bool inference_mode) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->key_set() != p.keys || impl->device() != p.device) return nullptr;
  size_t end_bytes = 0;
  if (shape) {
    if (impl->dtype() != p.dtype || !same_ints(impl->sizes(), p.sizes) ||
        !same_ints(impl->strides(), p.strides)) {
      return nullptr;
    }
    end_bytes = p.end_bytes;
  } else {
    if (impl->numel() != 1) return nullptr;
    end_bytes = impl->dtype().itemsize();  // its strides take it nowhere
  }
  if (written && !inference_mode && !impl->version_counter().enabled()) return nullptr;
  if (!impl->has_storage()) return nullptr;
  const c10::Storage& storage = impl->storage();
  c10::StorageImpl* data = storage.unsafeGetStorageImpl();
  if (data->has_materializer() || storage.data() == nullptr) return nullptr;
  const size_t start = static_cast<size_t>(impl->storage_offset()) * impl->dtype().itemsize();
  if (storage.nbytes() < start + end_bytes) return nullptr;
  // As Tensor::data_ptr() takes it (with the storage's own checks on writers).
  return static_cast<char*>(data->mutable_data()) + start;
}

// Parameter i's slot when every one of its tensors passes plain_data (no EMA,
// no grad to detach: the caller asks the full checks for those); false when
// the full checks must decide.
bool plain_slot(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m,
                const at::Tensor& v, const at::Tensor& vmax, const at::Tensor& step,
                const at::Device& device, bool amsgrad, bool zero_grads, bool inference_mode,
                AdamSlot& slot) {
  if (!p.defined() || not_addressable(p) != nullptr || p.device() != device ||
      p.layout() != at::kStrided || !supported_dtype(p.scalar_type()) ||
      !p.is_non_overlapping_and_dense() || p.numel() == 0) {
    return false;
  }
  const c10::TensorImpl* impl = p.unsafeGetTensorImpl();
  const PlainParam plain{impl->key_set(), impl->dtype(), device, impl->sizes(), impl->strides(),
                         static_cast<size_t>(last_element_offset(p) + 1) * p.element_size()};
  AdamSlot s;
  s.param = plain_data(p, plain, true, true, inference_mode);
  s.grad = plain_data(g, plain, true, zero_grads, inference_mode);
  s.exp_avg = plain_data(m, plain, true, true, inference_mode);
  s.exp_avg_sq = plain_data(v, plain, true, true, inference_mode);
  s.step = plain_data(step, plain, false, true, inference_mode);
  if (!s.param || !s.grad || !s.exp_avg || !s.exp_avg_sq || !s.step) return false;
  if (amsgrad) {
    s.max_exp_avg_sq = plain_data(vmax, plain, true, true, inference_mode);
    if (!s.max_exp_avg_sq) return false;
  }
  const at::ScalarType step_dtype = step.scalar_type();
  if (step_dtype != at::kFloat && step_dtype != at::kDouble) return false;
  s.numel = p.numel();
  s.dtype = p.scalar_type();
  s.step_dtype = step_dtype;
  slot = s;
  return true;
}

void check_step(const at::Tensor& step, size_t i, const at::Device& device, const char* op) {
  const Name s_name{"state_steps", i};
  TORCH_CHECK(step.defined(), op, ": ", s_name, " is undefined (None)");
  check_addressable(step, s_name, op);
  TORCH_CHECK(step.numel() == 1, op, ": ", s_name, " must be a one-element tensor");
  TORCH_CHECK(step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble, op, ": ",
              s_name, " must be float32 or float64, not ", step.scalar_type());
  TORCH_CHECK(step.device() == device, op, ": ", s_name, " is on ", step.device(),
              " but params are on ", device);
}

// An EMA to blend in the step: the parameter's dtype, device, shape and
// strides, so it walks with the parameter (memory: check_disjoint).
void check_ema(const at::Tensor& ema, size_t i, const at::Tensor& param,
               const at::Device& device, const char* op) {
  const Name e_name{"emas", i}, p_name{"params", i};
  // The parameter's key set first (see walks_with): its sizes may be Python's.
  TORCH_CHECK(param.defined(), op, ": ", p_name, " is undefined (None)");
  check_addressable(param, p_name, op);
  check_companion(ema, e_name, param, p_name, device, op);
  TORCH_CHECK(ema.strides() == param.strides(), op, ": ", e_name, " has strides ", ema.strides(),
              " but ", p_name, " has strides ", param.strides(),
              "; an EMA blended in the step must have its parameter's layout");
}

// The bytes a tensor's elements can reach: [first element, last element + 1).
// data_ptr(), not const_data_ptr(): a copy-on-write tensor is copied here, on
// the calling thread, before the kernels' parallel regions take its pointer
// (see copies_on_write).
std::pair<uintptr_t, uintptr_t> span_of(const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
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
struct NamedList {
  const char* name;
  at::TensorList list;
  bool scalar = false;  // one optional tensor argument (lr, found_inf, ...), named without index
};
using NamedLists = std::initializer_list<NamedList>;

// An optional scalar tensor argument as a NamedList: empty when absent.
NamedList scalar_arg(const char* name, const OptTensor& t) {
  return {name, t.has_value() ? at::TensorList(*t) : at::TensorList(), true};
}

void add_spans(NamedLists lists, bool written, std::vector<Span>& spans) {
  for (const auto& [list_name, list, scalar] : lists) {
    for (size_t i = 0; i < list.size(); ++i) {
      if (!list[i].defined() || list[i].numel() == 0 || not_addressable(list[i]) != nullptr) {
        continue;  // nothing to read or write through (or refused elsewhere)
      }
      const auto [begin, end] = span_of(list[i]);
      spans.push_back({begin, end, list_name, scalar ? kScalar : i, &list[i], written});
    }
  }
}

std::vector<Span> sorted_spans(NamedLists written, NamedLists read = {}) {
  std::vector<Span> spans;
  add_spans(written, true, spans);
  add_spans(read, false, spans);
  // Stable: of tensors starting together, the one listed first comes first.
  std::stable_sort(spans.begin(), spans.end(),
                   [](const Span& a, const Span& b) { return a.begin < b.begin; });
  return spans;
}

// The tensors an op call writes must not share memory with each other, nor
// with the tensors it reads: the kernels run chunks of different tensors on
// different threads (a tensor given twice would race), read and write through
// restrict pointers, and torch's ops would apply the writes one after another.
// Tensors that are only read may share. Tensors whose spans overlap (views of
// one buffer) are compared byte run by byte run (byte_runs.h): views with gaps,
// such as W[:, :k] and W[:, k:], interleave without sharing. O(n log n) when
// spans do not overlap. Run by the plain ops and for the EMAs of a step, not by
// AdamPlan's steps otherwise, whose state tensors the optimizer made itself
// (FusedAdam refuses a parameter given twice, or state tensors that parameters
// share).
void check_disjoint(NamedLists written, NamedLists read, const char* op) {
  const std::vector<Span> spans = sorted_spans(written, read);
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

// Whether any two of the tensors share memory.
bool any_overlap(at::TensorList tensors) {
  const std::vector<Span> spans = sorted_spans({{"", tensors}});
  for (size_t k = 1; k < spans.size(); ++k) {
    if (spans[k].begin < spans[k - 1].end) return true;
  }
  return false;
}

bool has_python_object(const c10::Storage& storage) {
  return storage.unsafeGetStorageImpl()->pyobj_slot()->load_pyobj() != nullptr;
}

// Memory from the device's own allocator: not a numpy array's or another
// library's, not a shared-memory segment (share_memory_) or pinned memory,
// which something besides this process's tensors can reach.
bool own_allocation(const c10::Storage& storage) {
  const c10::Allocator* allocator = c10::GetAllocator(storage.device_type());
  return allocator != nullptr && allocator->raw_deleter() != nullptr &&
         storage.data_ptr().get_deleter() == allocator->raw_deleter();
}

// The tensors using t's storage. A Python object made for the storage (by
// `untyped_storage()`, or `torch.save` of a checkpoint) holds a reference of its
// own as long as the storage lives; it is not another tensor.
int64_t storage_users(const at::Tensor& t) {
  const c10::Storage& storage = t.storage();
  return static_cast<int64_t>(storage.use_count()) - (has_python_object(storage) ? 1 : 0);
}

// How the kept grads of a call become their exp_avgs (see grad_as_exp_avg in
// ops.h): as they are (the effective grad is the raw one) or with the
// effective grad written over them by the kernels.
enum class Kept { none, as_is, written };

// Clears the requests in `keep` (see grad_as_exp_avg in ops.h) that cannot be
// honoured exactly; returns how the others are kept.
Kept keep_grads_as_exp_avgs(std::vector<char>& keep, const AdamWork& w, at::TensorList params,
                            at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                            at::TensorList emas, const std::vector<char>& direct,
                            const Backend& backend) {
  TORCH_CHECK(keep.size() == grads.size(), "pygan_optim: grad_as_exp_avg has ", keep.size(),
              " flags for ", grads.size(), " parameters");
  // With beta1 == 0 the new exp_avg is the effective grad: the raw grad, or
  // one the kernels can write over it. Not when the update is skipped
  // (found_inf set): exp_avg must then keep its values.
  const bool raw = !w.maximize && (w.decoupled || w.weight_decay == 0.0) && !w.grad_scale &&
                   !w.grad_mult && !w.found_inf;
  const bool written = !raw && backend.exp_avg_written_over_grad &&
                       (!w.found_inf || w.found_inf->item<double>() == 0.0);
  const bool exact =
      backend.grad_as_exp_avg && w.beta1 == 0.0 && !w.zero_grads && (raw || written);
  bool any = false;
  for (size_t i = 0; i < keep.size(); ++i) {
    if (!keep[i]) continue;
    const at::Tensor& g = grads[i];
    // A storage used by another tensor (a view, DDP's bucket, a user's alias)
    // could change under the state. Memory reachable otherwise (a numpy array,
    // shared memory, a Python object of the grad's storage that the caller
    // holds) would tie the state to it, or un-share a shared exp_avg.
    // A grad whose storage is larger than itself would pin the rest as state.
    // The exp_avg takes the grad's storage (see swap_in_kept_grads), so both
    // must start there, and the exp_avg must accept a new storage.
    const at::Tensor& m = exp_avgs[i];
    keep[i] = exact && g.defined() && direct[i] && storage_users(g) == 1 &&
              !has_python_object(g.storage()) && own_allocation(g.storage()) &&
              g.storage().nbytes() == g.nbytes() && g.storage_offset() == 0 &&
              (m.is_same(g) ||
               (storage_users(m) == 1 && own_allocation(m.storage()) &&
                m.storage_offset() == 0 && !m.is_view() && !m.requires_grad() &&
                m.unsafeGetTensorImpl()->allow_tensor_metadata_change()));
    any = any || keep[i];
  }
  if (!any) return Kept::none;
  // A kept grad or replaced exp_avg must be no other tensor of the call (the
  // same object in two lists has one storage user; a grad given to two
  // parameters would become both their exp_avgs): its memory would become, or
  // be freed under, that other tensor. Each must appear once (twice where a
  // parameter's grad is its exp_avg).
  std::unordered_map<const c10::TensorImpl*, int> uses;
  for (size_t i = 0; i < keep.size(); ++i) {
    if (keep[i]) uses[grads[i].unsafeGetTensorImpl()] = uses[exp_avgs[i].unsafeGetTensorImpl()] = 0;
  }
  for (at::TensorList list : {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas}) {
    for (const at::Tensor& t : list) {
      if (!t.defined()) continue;
      auto it = uses.find(t.unsafeGetTensorImpl());
      if (it != uses.end()) ++it->second;
    }
  }
  for (size_t i = 0; i < keep.size(); ++i) {
    if (!keep[i]) continue;
    const int expected = grads[i].is_same(exp_avgs[i]) ? 2 : 1;
    if (uses[grads[i].unsafeGetTensorImpl()] != expected ||
        uses[exp_avgs[i].unsafeGetTensorImpl()] != expected) {
      keep.assign(keep.size(), 0);  // rare enough to give up keeping for the whole call
      return Kept::none;
    }
  }
  return raw ? Kept::as_is : Kept::written;
}

// The kept grads become their parameters' exp_avgs: each exp_avg tensor (the
// same object, so the state and whoever holds it see the new values, as with
// torch's in-place update) takes its grad's storage. The old storages go to
// `work.to_free`, to be freed while the kernels run, unless a Python object
// refers to them: those go to `on_return`, freed by the calling thread.
void swap_in_kept_grads(const std::vector<char>& keep, at::TensorList grads,
                        at::TensorList exp_avgs, AdamWork& work,
                        std::vector<c10::Storage>& on_return) {
  for (size_t i = 0; i < keep.size(); ++i) {
    if (!keep[i] || exp_avgs[i].is_same(grads[i])) continue;
    c10::TensorImpl* m = exp_avgs[i].unsafeGetTensorImpl();
    c10::Storage old = m->storage();
    m->set_storage_keep_dtype(grads[i].storage());
    if (version_counter_of(m) != nullptr) m->bump_version();  // none: an inference tensor
    (has_python_object(old) ? on_return : work.to_free).push_back(std::move(old));
  }
}

// The weights of an EMA blend: `momentum` the old average's, `new_weight` the
// new parameters' (1 - momentum in double when not given). Each must be in
// [0, 1] (NaN is refused), and the two must add up to 1 but for rounding: a
// pair such as (m, m) or (1 - m, 1 - m) is a mistake, not a blend.
EmaCoeffs<double> ema_weights_of(double momentum, std::optional<double> new_weight,
                                 const char* momentum_name, const char* weight_name,
                                 const char* op) {
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, op, ": ", momentum_name,
                    " must be in [0, 1], not ", momentum);
  if (!new_weight.has_value()) return make_ema_coeffs(momentum);
  const double weight = *new_weight;
  TORCH_CHECK_VALUE(weight >= 0.0 && weight <= 1.0, op, ": ", weight_name,
                    " (the new parameters' weight) must be in [0, 1], not ", weight);
  TORCH_CHECK_VALUE(std::fabs(momentum + weight - 1.0) <= kEmaWeightSumSlack, op, ": ",
                    momentum_name, " (the old average's weight, ", momentum, ") and ",
                    weight_name, " (the new parameters' weight, ", weight,
                    ") must add up to 1; MMagic's momentum m is ", momentum_name, "=1-m, ",
                    weight_name, "=m");
  return make_ema_coeffs(momentum, weight);
}

}  // namespace

void check_plan_state_disjoint(at::TensorList params, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                               at::TensorList steps, const char* op) {
  try {
    check_disjoint({{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                    {"max_exp_avg_sqs", max_exp_avg_sqs}, {"state_steps", steps}},
                   {{"params", params}}, op);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, e.msg(), "; each parameter's state needs memory of its own (was the "
                "state edited, or loaded from a checkpoint that shares it?)");
  }
}

void adam_step_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList state_steps, double lr, double beta1, double beta2,
                    double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                    const OptTensor& lr_tensor, const OptTensor& grad_scale,
                    const OptTensor& found_inf, const OptTensor& grad_mult, bool zero_grads,
                    bool validate_only, at::TensorList emas, double ema_momentum,
                    std::optional<double> ema_new_weight,
                    DeviceTableCache* table_cache, std::vector<char>* grad_as_exp_avg,
                    bool grads_of_params) {
  constexpr const char* op = "pygan_optim.adam_step_";
  TORCH_CHECK_VALUE(lr >= 0.0, op, ": invalid learning rate ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, op, ": invalid beta1 ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, op, ": invalid beta2 ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": invalid eps ", eps);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, op, ": invalid weight_decay ", weight_decay);
  const size_t n = params.size();
  TensorList read_grads;  // grads_of_params: filled by the checks below
  if (grads_of_params) {
    TORCH_CHECK(grads.empty(), op, ": grads given and also to be read from the params");
    read_grads.resize(n);
    grads = read_grads;
  }
  check_lengths(n, grads.size(), "grads", op);
  check_lengths(n, exp_avgs.size(), "exp_avgs", op);
  check_lengths(n, exp_avg_sqs.size(), "exp_avg_sqs", op);
  check_lengths(n, state_steps.size(), "state_steps", op);
  if (amsgrad) check_lengths(n, max_exp_avg_sqs.size(), "max_exp_avg_sqs (amsgrad)", op);
  const bool with_emas = !emas.empty();
  EmaCoeffs<double> ema_weights{0.0, 1.0};
  if (with_emas) {
    check_lengths(n, emas.size(), "emas", op);
    ema_weights = ema_weights_of(ema_momentum, ema_new_weight, "ema_momentum",
                                 "ema_new_weight", op);
  }
  if (n == 0) return;
  const at::Device device = common_device(params, op);
  const bool inference_mode = c10::InferenceMode::is_enabled();
  // What runs after the kernels through torch's ops (write-backs of staged
  // tensors, grads zeroed late) is optimizer work, not part of a graph: under
  // grad mode autograd would refuse it on tensors that require grad, after
  // the kernels wrote (the kernels themselves write through raw pointers).
  const at::NoGradGuard no_grad;

  // Every check runs before any tensor is touched: a refused step changes nothing.
  // A parameter whose grad is None is skipped, as torch.optim.Adam does. One
  // whose tensors do not share a dense layout runs on contiguous copies.
  // With thousands of tensors this loop waits on cache misses for each one's
  // metadata, so it runs on all threads (at::parallel_for rethrows a failure),
  // and it notes where each direct parameter's tensors are (AdamSlot) while
  // their metadata is at hand.
  std::vector<char> direct(n, 1);
  std::vector<AdamSlot> slots(n);
  std::vector<char> slot_later(n, 0);  // see copies_on_write
  // Grads zeroed as optimizer.zero_grad(set_to_none=False) would, that carry an
  // autograd graph (backward(create_graph=True)): it also detaches them.
  std::atomic<bool> zeroed_grads_with_graph{false};
  const auto ahead_tensors = {params, grads_of_params ? at::TensorList() : grads};
  const auto ahead_state = {exp_avgs, exp_avg_sqs, state_steps};
  const auto written = written_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                     state_steps, emas, amsgrad, zero_grads);
  shared_parallel_for(static_cast<int64_t>(n), kCheckGrain, kSharedBatch,
                      [&](int64_t begin, int64_t end) {
    for (size_t i = begin; i < static_cast<size_t>(end); ++i) {
      for (int stage = 0; stage < kStages; ++stage) {
        const size_t ahead = kStages - stage;  // farther apart was slower (AMD Zen 4)
        if (i + ahead < n) {  // past the batch too: its next is likely this thread's
          prefetch_stage(stage, i + ahead, ahead_tensors, ahead_state, params, grads_of_params);
        }
      }
      for (at::TensorList list : ahead_state) {
        if (i + kStateAhead < list.size()) prefetch_impl(list[i + kStateAhead]);
      }
      const at::Tensor& p = params[i];
      if (grads_of_params) {
        TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined (None)");
        read_grads[i] = grad_of(p);
      }
      const at::Tensor& g = grads[i];
      if (zero_grads && grads_of_params && g.defined() && g.requires_grad()) {
        // torch's zero_grad(set_to_none=False) detaches such a grad in place
        // when it has a grad_fn, which a view cannot be; refused here, before
        // anything is written. (A leaf view only loses requires_grad.)
        TORCH_CHECK(!(g.is_view() && g.grad_fn()), op, ": the grad of params[", i,
                    "] carries an autograd graph (backward(create_graph=True)) and is a view "
                    "of another tensor, so it cannot "
                    "be detached and zeroed in place as zero_grad(set_to_none=False) does; "
                    "release the grads instead (set_to_none=True)");
        zeroed_grads_with_graph.store(true, std::memory_order_relaxed);
      }
      if (!with_emas && g.defined() &&
          plain_slot(p, g, exp_avgs[i], exp_avg_sqs[i],
                     amsgrad ? max_exp_avg_sqs[i] : at::Tensor(), state_steps[i], device,
                     amsgrad, zero_grads, inference_mode, slots[i])) {
        continue;  // the common case, checked: direct, its slot noted
      }
      if (with_emas && emas[i].defined()) {  // blended even without a grad
        check_ema(emas[i], i, p, device, op);
        check_writable(emas[i], Name{kWrittenNames[kEmaList], i}, inference_mode, op);
        check_no_internal_overlap(emas[i], Name{kWrittenNames[kEmaList], i}, op);
      }
      if (!g.defined()) continue;  // skipped, whatever it holds, as torch.optim.Adam does
      const bool fast = p.defined() && not_addressable(p) == nullptr && p.device() == device &&
                        p.layout() == at::kStrided &&
                        supported_dtype(p.scalar_type()) && p.is_non_overlapping_and_dense() &&
                        walks_with(p, g) && walks_with(p, exp_avgs[i]) &&
                        walks_with(p, exp_avg_sqs[i]) &&
                        (!amsgrad || walks_with(p, max_exp_avg_sqs[i]));
      if (!fast) {
        check_adam_param(i, params, g, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad,
                         zero_grads, device, op);
        direct[i] = 0;
      }
      check_step(state_steps[i], i, device, op);
      for (size_t k = 0; k < kWrittenLists; ++k) {  // the EMA was checked above
        if (k != kEmaList && i < written[k].size()) {
          check_writable(written[k][i], Name{kWrittenNames[k], i}, inference_mode, op);
        }
      }
      // Fast and not validate_only: slot_of takes every data pointer below.
      // A staged grad that is not zeroed is only read, through its copy.
      if (!fast || validate_only) {
        check_data_access(p, Name{"params", i}, op);
        if (fast || zero_grads || g.is_contiguous()) check_data_access(g, Name{"grads", i}, op);
        check_data_access(exp_avgs[i], Name{"exp_avgs", i}, op);
        check_data_access(exp_avg_sqs[i], Name{"exp_avg_sqs", i}, op);
        if (amsgrad) check_data_access(max_exp_avg_sqs[i], Name{"max_exp_avg_sqs", i}, op);
        check_data_access(state_steps[i], Name{"state_steps", i}, op);
      }
      if (fast && !validate_only) {
        if (copies_on_write(p) || copies_on_write(g) || copies_on_write(exp_avgs[i]) ||
            copies_on_write(exp_avg_sqs[i]) || copies_on_write(state_steps[i]) ||
            (amsgrad && copies_on_write(max_exp_avg_sqs[i])) ||
            (with_emas && copies_on_write(emas[i]))) {
          slot_later[i] = 1;
        } else {
          slots[i] = slot_of(p, g, exp_avgs[i], exp_avg_sqs[i],
                             amsgrad ? max_exp_avg_sqs[i] : at::Tensor(),
                             with_emas ? emas[i] : at::Tensor(), state_steps[i]);
        }
      }
    }
  });
  for (size_t i = 0; i < n; ++i) {  // see copies_on_write
    if (slot_later[i]) {
      slots[i] = slot_of(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                         amsgrad ? max_exp_avg_sqs[i] : at::Tensor(),
                         with_emas ? emas[i] : at::Tensor(), state_steps[i]);
    }
  }
  if (with_emas) {
    check_disjoint({{"emas", emas}},
                   {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs},
                    {"exp_avg_sqs", exp_avg_sqs},
                    {"max_exp_avg_sqs", amsgrad ? max_exp_avg_sqs : at::TensorList()}},
                   op);
    const Backend& backend = backend_for(device);
    TORCH_CHECK(backend.capturing == nullptr || !backend.capturing(device), op,
                ": EMAs blended in a step inside a CUDA graph capture: each replay would blend "
                "again; blend outside the graph (ema_ after the replay)");
  }
  size_t with_grad = 0;
  bool all_direct = true;
  for (size_t i = 0; i < n; ++i) {
    const bool has_grad = grads[i].defined();
    with_grad += has_grad;
    all_direct = all_direct && has_grad && direct[i];
  }

  AdamWork work;
  work.lr = lr;
  work.beta1 = beta1;
  work.beta2 = beta2;
  work.eps = eps;
  work.weight_decay = weight_decay;
  work.amsgrad = amsgrad;
  work.maximize = maximize;
  work.decoupled = decoupled;
  work.zero_grads = zero_grads;
  work.lr_tensor = scalar_on(lr_tensor, "lr", device, false, op);
  work.grad_scale = scalar_on(grad_scale, "grad_scale", device, false, op);
  work.found_inf = scalar_on(found_inf, "found_inf", device, false, op);
  work.grad_mult = scalar_on(grad_mult, "grad_mult", device, false, op);
  work.table_cache = table_cache;
  work.ema_weights = ema_weights;
  if (validate_only || with_grad == 0) {
    if (grad_as_exp_avg != nullptr) grad_as_exp_avg->assign(grad_as_exp_avg->size(), 0);
    if (validate_only) return;
  }
  // EMAs of parameters the update pass does not walk (no grad, or staged):
  // blended by an ema_ pass of their own after the update.
  TensorList emas_after, params_after;
  for (size_t i = 0; with_emas && i < n; ++i) {
    if (emas[i].defined() && !(grads[i].defined() && direct[i])) {
      emas_after.push_back(emas[i]);
      params_after.push_back(params[i]);
    }
  }
  auto blend_after = [&] {
    if (!emas_after.empty()) ema_(emas_after, params_after, ema_momentum, ema_new_weight);
  };
  if (with_grad == 0) {
    blend_after();
    return;
  }

  const Kept kept_as =
      grad_as_exp_avg == nullptr
          ? Kept::none
          : keep_grads_as_exp_avgs(*grad_as_exp_avg, work, params, grads, exp_avgs, exp_avg_sqs,
                                   amsgrad ? max_exp_avg_sqs : at::TensorList(), emas, direct,
                                   backend_for(device));
  const bool any_kept = kept_as != Kept::none;
  auto kept = [&](size_t i) { return any_kept && (*grad_as_exp_avg)[i]; };
  // A kept grad's slot: no exp_avg to store, or the grad itself to store into.
  auto kept_slot = [&](AdamSlot& slot) {
    slot.exp_avg = kept_as == Kept::written ? slot.grad : nullptr;
  };
  // Right before the backend runs, after anything that may still fail.
  std::vector<c10::Storage> freed_on_return;
  auto swap_kept = [&] {
    if (any_kept) swap_in_kept_grads(*grad_as_exp_avg, grads, exp_avgs, work, freed_on_return);
  };

  // One grad read by two parameters of the call (a grad tensor given to both):
  // zeros written in the pass could reach the second before it reads them, so
  // they are written after the pass instead.
  const bool zero_after = work.zero_grads && any_overlap(grads);
  if (zero_after) work.zero_grads = false;
  auto zero_late = [&] {
    for (size_t i = 0; zero_after && i < n; ++i) {
      if (grads[i].defined()) grads[i].zero_();
    }
    for (size_t i = 0; zeroed_grads_with_graph && i < n; ++i) {
      at::Tensor g = grads[i];  // the same TensorImpl
      if (!g.defined() || !g.requires_grad()) continue;
      if (g.grad_fn()) g.detach_();  // torch's zero_grad does the same
      else g.requires_grad_(false);
    }
  };

  if (all_direct) {  // the caller's lists as they are: no copies
    TensorList exp_avgs_left;  // undefined where the grad is kept instead
    if (any_kept) {
      exp_avgs_left.assign(exp_avgs.begin(), exp_avgs.end());
      for (size_t i = 0; i < n; ++i) {
        if (kept(i)) {
          exp_avgs_left[i] = at::Tensor();
          kept_slot(slots[i]);
        }
      }
    }
    work.set_lists(params, grads, any_kept ? at::TensorList(exp_avgs_left) : exp_avgs,
                   exp_avg_sqs, max_exp_avg_sqs, state_steps);
    work.emas = emas;
    work.slots = std::move(slots);
    swap_kept();
    backend_for(device).adam(work);
    zero_late();  // before the grads read from the params are let go
    mark_adam_written(work, grads_of_params ? &read_grads : nullptr);
    return;
  }

  // Only the parameters with grads, staged where needed.
  TensorList own[7];  // params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, emas
  for (auto& list : own) list.reserve(with_grad);
  struct Staged {
    size_t arg, work;
  };
  std::vector<Staged> staged;
  for (size_t i = 0; i < n; ++i) {
    if (!grads[i].defined()) continue;
    auto pick = [&](const at::Tensor& t) { return direct[i] ? t : t.contiguous(); };
    if (!direct[i]) staged.push_back({i, own[0].size()});
    own[0].push_back(pick(params[i]));
    own[1].push_back(pick(grads[i]));
    own[2].push_back(kept(i) ? at::Tensor() : pick(exp_avgs[i]));
    own[3].push_back(pick(exp_avg_sqs[i]));
    if (amsgrad) own[4].push_back(pick(max_exp_avg_sqs[i]));
    own[5].push_back(state_steps[i]);  // one element: always contiguous
    if (with_emas) own[6].push_back(direct[i] ? emas[i] : at::Tensor());
    const size_t k = own[0].size() - 1;
    work.slots.push_back(slot_of(own[0][k], own[1][k], own[2][k], own[3][k],
                                 amsgrad ? own[4][k] : at::Tensor(),
                                 with_emas ? own[6][k] : at::Tensor(), own[5][k]));
    if (kept(i)) kept_slot(work.slots.back());
  }
  work.set_lists(own[0], own[1], own[2], own[3], own[4], own[5]);
  work.emas = own[6];

  swap_kept();
  backend_for(device).adam(work);
  mark_adam_written(work, nullptr);

  // contiguous() returns the tensor itself when it already is contiguous.
  auto write_back = [](const at::Tensor& dst, const at::Tensor& src) {
    if (!src.is_same(dst)) dst.copy_(src);
  };
  for (const Staged& s : staged) {
    write_back(params[s.arg], own[0][s.work]);
    write_back(exp_avgs[s.arg], own[2][s.work]);
    write_back(exp_avg_sqs[s.arg], own[3][s.work]);
    if (amsgrad) write_back(max_exp_avg_sqs[s.arg], own[4][s.work]);
    if (work.zero_grads && !own[1][s.work].is_same(grads[s.arg])) grads[s.arg].zero_();
  }
  zero_late();
  blend_after();
}

void adam_step_(at::TensorList params, const OptTensorList& grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
                double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                const OptTensor& lr_tensor, const OptTensor& grad_scale,
                const OptTensor& found_inf, const OptTensor& grad_mult, bool zero_grads,
                bool validate_only, at::TensorList emas, at::IntArrayRef ema_index,
                double ema_momentum, std::optional<double> ema_new_weight) {
  TensorList plain_grads;  // an undefined tensor for None
  plain_grads.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    std::optional<at::Tensor> g = grads.get(i);
    plain_grads.push_back(g.has_value() ? std::move(*g) : at::Tensor());
  }
  // emas[k] belongs to params[ema_index[k]]; the impl wants one slot per parameter.
  constexpr const char* op = "pygan_optim.adam_step_";
  TORCH_CHECK(emas.size() == ema_index.size(), op, ": ", emas.size(), " emas but ",
              ema_index.size(), " ema_index entries");
  TensorList ema_slots(emas.empty() ? 0 : params.size());
  for (size_t k = 0; k < emas.size(); ++k) {
    const int64_t i = ema_index[k];
    TORCH_CHECK(i >= 0 && static_cast<size_t>(i) < params.size(), op, ": ema_index[", k, "] = ",
                i, " is out of range for ", params.size(), " params");
    TORCH_CHECK(!ema_slots[i].defined(), op, ": two emas for params[", i, "]");
    TORCH_CHECK(emas[k].defined(), op, ": emas[", k, "] is undefined");
    ema_slots[i] = emas[k];
  }
  if (!params.empty()) {
    check_disjoint({{"params", params}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                    {"max_exp_avg_sqs", amsgrad ? max_exp_avg_sqs : at::TensorList()},
                    {"state_steps", state_steps}, {"emas", ema_slots},  // named by param
                    {"grads", zero_grads ? plain_grads : at::TensorList()}},
                   {{"grads", zero_grads ? at::TensorList() : plain_grads},
                    scalar_arg("lr", lr_tensor), scalar_arg("grad_scale", grad_scale),
                    scalar_arg("grad_mult", grad_mult), scalar_arg("found_inf", found_inf)},
                   op);
  }
  adam_step_impl(params, plain_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                 beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, lr_tensor,
                 grad_scale, found_inf, grad_mult, zero_grads, validate_only, ema_slots,
                 ema_momentum, ema_new_weight);
}

namespace {

// Checks shared by scale and scale_: inputs/outputs pairwise alike; found_inf a
// writable one-element float tensor on their device.
ScaleWork make_scale_work(at::TensorList inputs, TensorList outputs, double factor,
                          const OptTensor& factor_tensor, const at::Tensor& found_inf,
                          const char* op) {
  const at::Device device = common_device(inputs, op);
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_tensor(inputs[i], Name{"tensors", i}, device, op);
  }
  ScaleWork work;
  work.factor = factor;
  work.factor_tensor = scalar_on(factor_tensor, "factor", device, false, op);
  TORCH_CHECK(found_inf.defined(), op, ": found_inf is required");
  work.found_inf = *scalar_on(found_inf, "found_inf", device, true, op);
  check_writable(work.found_inf, "found_inf", c10::InferenceMode::is_enabled(), op);
  TORCH_CHECK(work.found_inf.scalar_type() == at::kFloat, op,
              ": found_inf must be float32 (as torch.amp.GradScaler's), not ",
              work.found_inf.scalar_type());
  work.inputs.assign(inputs.begin(), inputs.end());
  work.outputs = std::move(outputs);
  return work;
}

}  // namespace

void scale_(at::TensorList tensors, double factor, const OptTensor& factor_tensor,
            const at::Tensor& found_inf) {
  constexpr const char* op = "pygan_optim.scale_";
  if (tensors.empty()) return;
  ScaleWork work = make_scale_work(tensors, {}, factor, factor_tensor, found_inf, op);
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_writable(tensors[i], Name{"tensors", i}, c10::InferenceMode::is_enabled(), op);
    check_no_internal_overlap(tensors[i], Name{"tensors", i}, op);
  }
  check_disjoint({{"tensors", tensors}, scalar_arg("found_inf", work.found_inf)},
                 {scalar_arg("factor", work.factor_tensor)}, op);
  // In place: a tensor with gaps or overlaps is scaled through a gapless copy.
  std::vector<size_t> staged;
  for (size_t i = 0; i < work.inputs.size(); ++i) {
    if (!work.inputs[i].is_non_overlapping_and_dense()) {
      work.inputs[i] = work.inputs[i].contiguous();
      staged.push_back(i);
    }
  }
  work.outputs = work.inputs;
  backend_for(work.inputs[0].device()).scale(work);
  mark_written(work.outputs);
  mark_written(OptTensor(work.found_inf));
  for (size_t i : staged) tensors[i].copy_(work.outputs[i]);
}

TensorList scale(at::TensorList inputs, double factor, const OptTensor& factor_tensor,
                 const at::Tensor& found_inf) {
  constexpr const char* op = "pygan_optim.scale";
  if (inputs.empty()) return {};
  ScaleWork work = make_scale_work(inputs, {}, factor, factor_tensor, found_inf, op);
  for (auto& t : work.inputs) {
    if (!t.is_non_overlapping_and_dense()) t = t.contiguous();
    work.outputs.push_back(at::empty_like(t));  // empty_like keeps a dense layout
  }
  backend_for(work.inputs[0].device()).scale(work);
  mark_written(OptTensor(work.found_inf));
  return work.outputs;
}

std::tuple<at::Tensor, at::Tensor> l2_norm(at::TensorList tensors, double scale,
                                           const OptTensor& scale_tensor,
                                           const OptTensor& found_inf) {
  constexpr const char* op = "pygan_optim.l2_norm";
  const at::Device device = common_device(tensors, op);
  NormWork work;
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_tensor(tensors[i], Name{"tensors", i}, device, op);
    // The norm does not depend on element order, only on reading each once.
    work.tensors.push_back(tensors[i].is_non_overlapping_and_dense() ? tensors[i]
                                                                     : tensors[i].contiguous());
  }
  work.scale = scale;
  work.scale_tensor = scalar_on(scale_tensor, "scale", device, false, op);
  work.found_inf = scalar_on(found_inf, "found_inf", device, true, op);
  if (work.found_inf) {
    check_writable(*work.found_inf, "found_inf", c10::InferenceMode::is_enabled(), op);
    TORCH_CHECK(work.found_inf->scalar_type() == at::kFloat, op,
                ": found_inf must be float32, not ", work.found_inf->scalar_type());
  }
  check_disjoint({scalar_arg("found_inf", work.found_inf)},
                 {{"tensors", tensors}, scalar_arg("scale", work.scale_tensor)}, op);
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
  work.total = at::empty({}, opts);
  work.per_tensor = at::empty({static_cast<int64_t>(tensors.size())}, opts);
  backend_for(device).l2_norm(work);
  mark_written(work.found_inf);
  return {work.total, work.per_tensor};
}

void ema_(at::TensorList ema, at::TensorList params, double momentum,
          std::optional<double> new_weight) {
  constexpr const char* op = "pygan_optim.ema_";
  if (ema.empty() && params.empty()) return;
  const EmaCoeffs<double> weights =
      ema_weights_of(momentum, new_weight, "momentum", "new_weight", op);
  check_lengths(ema.size(), params.size(), "params", op);
  const at::Device device = common_device(ema, op);
  EmaWork work;
  work.weights = weights;
  std::vector<size_t> staged;
  for (size_t i = 0; i < ema.size(); ++i) {
    check_tensor(ema[i], Name{"ema", i}, device, op);
    check_writable(ema[i], Name{"ema", i}, c10::InferenceMode::is_enabled(), op);
    check_no_internal_overlap(ema[i], Name{"ema", i}, op);
    check_companion(params[i], Name{"params", i}, ema[i], Name{"ema", i}, device, op);
    const bool direct = same_layout(ema[i], params[i]);
    work.ema.push_back(direct ? ema[i] : ema[i].contiguous());
    work.params.push_back(direct ? params[i] : params[i].contiguous());
    if (!direct) staged.push_back(i);
  }
  check_disjoint({{"ema", ema}}, {{"params", params}}, op);
  backend_for(device).ema(work);
  mark_written(work.ema);
  for (size_t i : staged) {
    if (!work.ema[i].is_same(ema[i])) ema[i].copy_(work.ema[i]);
  }
}

TORCH_LIBRARY(pygan_optim, m) {
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!)?[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
      "bool maximize, bool decoupled, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? grad_mult=None, bool zero_grads=False, "
      "bool validate_only=False, Tensor(g!)[] emas, int[] ema_index, float ema_momentum, "
      "float? ema_new_weight=None) -> ()");
  m.def("scale_(Tensor(a!)[] tensors, float factor, Tensor? factor_tensor, Tensor(b!) found_inf) -> ()");
  m.def("scale(Tensor[] inputs, float factor, Tensor? factor_tensor, Tensor(a!) found_inf) -> Tensor[]");
  m.def("l2_norm(Tensor[] tensors, float scale=1.0, Tensor? scale_tensor=None, Tensor(a!)? found_inf=None) -> (Tensor, Tensor)");
  m.def("ema_(Tensor(a!)[] ema, Tensor[] params, float momentum, float? new_weight=None) -> ()");
}

void register_entry_points(torch::Library& m) {
  m.impl("adam_step_", &adam_step_);
  m.impl("scale_", &scale_);
  m.impl("scale", &scale);
  m.impl("l2_norm", &l2_norm);
  m.impl("ema_", &ema_);
}

TORCH_LIBRARY_IMPL(pygan_optim, CPU, m) { register_entry_points(m); }

}  // namespace pygan_optim
