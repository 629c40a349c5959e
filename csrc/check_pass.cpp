// The Adam step's check pass (see check_pass.h), and its common case read
// once per tensor (plain_slot).
#include "check_pass.h"

#include "checks.h"
#include "memory_spans.h"
#include "tensor_pass.h"
#include "version_marks.h"
#include "work_sharing.h"

#include <atomic>
#include <utility>

namespace pygan_optim {

AdamSlot slot_of(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m,
                 const at::Tensor& v, const at::Tensor& vmax, const at::Tensor& e,
                 const at::Tensor& step) {
  auto data = [](const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
  return {data(p),     data(g),      data(m),           data(v),
          data(vmax),  data(e),      step.data_ptr(),   p.numel(),
          p.scalar_type(), step.scalar_type()};
}

namespace {

// The common case of a parameter's checks, read once per tensor: with 10k
// small tensors the full checks (checks.h) cost more in calls through torch's
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
// step count). nullptr: the full checks decide. Always inlined: its flags are
// constants at each call, and a call per tensor cost about 13 instructions of
// its own (callgrind).
inline __attribute__((always_inline)) void* plain_data(const at::Tensor& t, const PlainParam& p,
                                                       bool shape, bool written,
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
  if (storage_copies_on_write(*data) || storage.data() == nullptr) return nullptr;
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
  // The parameter's own checks, read from its TensorImpl once: not_addressable's
  // key tests in one (kNotAddressableKeys, first: a subclass may answer device,
  // layout or sizes from Python, which a worker thread must not ask), its
  // is_meta as the device's, its storage tests in plain_data(p) below.
  // (Through not_addressable and torch's Tensor accessors this cost 0.24-0.34
  // ms more per 10k x 1k step; NOTES "10k x 1k", session 36.)
  if (!p.defined()) return false;
  const c10::TensorImpl* impl = p.unsafeGetTensorImpl();
  const c10::DispatchKeySet keys = impl->key_set();
  if (keys.has_any(kNotAddressableKeys) || device.is_meta() || impl->device() != device ||
      impl->layout() != at::kStrided || !supported_dtype(impl->dtype().toScalarType()) ||
      !impl->is_non_overlapping_and_dense() || impl->numel() == 0) {
    return false;
  }
  const c10::IntArrayRef sizes = impl->sizes(), strides = impl->strides();
  const PlainParam plain{
      keys, impl->dtype(), device, sizes, strides,
      static_cast<size_t>(last_element_offset(sizes, strides) + 1) * impl->dtype().itemsize()};
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
  s.numel = impl->numel();
  s.dtype = impl->dtype().toScalarType();
  s.step_dtype = step_dtype;
  slot = s;
  return true;
}

}  // namespace

CheckedParams check_adam_params(const AdamLists& lists, TensorList* read_grads,
                                const at::Device& device, bool amsgrad, bool zero_grads,
                                bool validate_only, bool inference_mode, const char* op) {
  const at::TensorList params = lists.params, grads = lists.grads, exp_avgs = lists.exp_avgs,
                       exp_avg_sqs = lists.exp_avg_sqs, max_exp_avg_sqs = lists.max_exp_avg_sqs,
                       state_steps = lists.steps, emas = lists.emas;
  const size_t n = params.size();
  const bool grads_of_params = read_grads != nullptr;
  // As adam_step_impl's check_lengths left them: the loop below (and
  // prefetch_ahead) index these lists unchecked.
  TORCH_INTERNAL_ASSERT(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                        state_steps.size() == n && (!amsgrad || max_exp_avg_sqs.size() == n) &&
                        (emas.empty() || emas.size() == n));
  const bool with_emas = !emas.empty();

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
  std::atomic<bool> maybe_shared{false};
  // A FusedAdam step's params and grads are usually the model's and autograd's
  // own: storages with one user each, from the device's allocator, and grads
  // held by their parameter alone (and read_grads). Memory from elsewhere
  // (numpy, DLPack, frombuffer, a lazy clone) may lie under two storages.
  // (The plain op checks its lists whole.)
  const c10::DeleterFnPtr own_deleter = grads_of_params ? allocator_deleter(device) : nullptr;
  auto note_sharing = [&](const at::Tensor& p, const at::Tensor& g) {
    if (grads_of_params && (storage_shared(p) || storage_shared(g) ||
                            !from_deleter(p, own_deleter) || !from_deleter(g, own_deleter) ||
                            grad_held_elsewhere(g, /*copies=*/1))) {
      maybe_shared.store(true, std::memory_order_relaxed);
    }
  };
  const AheadLists ahead{params, grads_of_params ? at::TensorList() : grads, exp_avgs,
                         exp_avg_sqs, state_steps, grads_of_params};
  const auto written = written_lists(lists, amsgrad, zero_grads);
  shared_parallel_for(static_cast<int64_t>(n), kCheckGrain, kSharedBatch,
                      [&](int64_t begin, int64_t end) {
    for (size_t i = begin; i < static_cast<size_t>(end); ++i) {
      prefetch_ahead(i, ahead);
      const at::Tensor& p = params[i];
      if (grads_of_params) {
        TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined (None)");
        (*read_grads)[i] = grad_of(p);
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
        note_sharing(p, g);
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
      note_sharing(p, g);
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
  return {std::move(direct), std::move(slots), zeroed_grads_with_graph.load(),
          maybe_shared.load()};
}

}  // namespace pygan_optim
