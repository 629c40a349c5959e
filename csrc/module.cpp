// The Python module pygan_optim._C. Loading it registers the ops (ops.cpp);
// the functions here expose build facts and the chunk planner for tests.
#include <torch/python.h>
#include <torch/version.h>

#include <string>
#include <tuple>
#include <vector>

#include "adam_plan.h"
#include "check_pass.h"
#include "cpu/kernel_table.h"
#include "memory_spans.h"
#include "ops.h"
#include "pygan_optim/chunks.h"

namespace py = pybind11;

namespace {

// The C++ object of a bound instance; nullptr before __init__ ran (or when it
// failed). Nothing here can throw: the collector's callbacks are C.
template <class T>
T* bound_object(PyObject* self) {
  const auto v_h = reinterpret_cast<py::detail::instance*>(self)->get_value_and_holder();
  return v_h.holder_constructed() ? v_h.template value_ptr<T>() : nullptr;
}

// Gives a bound C++ type that holds Python objects the cycle collector's
// support: T::visit_params reports them, T::clear_params drops them.
template <class T>
void collected_by_gc(PyHeapTypeObject* heap_type) {
  PyTypeObject* type = &heap_type->ht_type;
  type->tp_flags |= Py_TPFLAGS_HAVE_GC;
  type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) -> int {
    Py_VISIT(Py_TYPE(self));  // a heap type's instances own a reference to it
    const T* object = bound_object<T>(self);
    return object == nullptr ? 0 : object->visit_params(visit, arg);
  };
  type->tp_clear = [](PyObject* self) -> int {
    if (T* object = bound_object<T>(self)) object->clear_params();
    return 0;
  };
}

}  // namespace

#define PYGAN_OPTIM_STR_(x) #x
#define PYGAN_OPTIM_STR(x) PYGAN_OPTIM_STR_(x)
// The torch this module was compiled against, also as bytes that _ext.py can
// find in the file when loading it fails (a torch of another version).
constexpr char kBuiltWithTorch[] =
    "PYGAN_OPTIM_BUILT_WITH_TORCH=" PYGAN_OPTIM_STR(TORCH_VERSION_MAJOR) "." PYGAN_OPTIM_STR(
        TORCH_VERSION_MINOR) "." PYGAN_OPTIM_STR(TORCH_VERSION_PATCH) ";";

PYBIND11_MODULE(_C, m) {
  m.doc() = "pygan_optim's compiled kernels; the ops are under torch.ops.pygan_optim";
  {
    const std::string marker(kBuiltWithTorch);
    const size_t start = marker.find('=') + 1;
    m.attr("built_with_torch") = marker.substr(start, marker.size() - 1 - start);
  }
  // Same Python exception types as the ops raise through the dispatcher.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  m.def("cuda_built", &pygan_optim::cuda_built, "True when this build has the CUDA kernels");
  m.def("set_cuda_interpret", &pygan_optim::set_cuda_interpret, py::arg("enabled"),
        "Route this thread's CPU op calls through the CUDA backend run on the CPU "
        "(interpret mode); returns the previous setting");
  m.def("set_cuda_interpret_capturing", &pygan_optim::set_cuda_interpret_capturing,
        py::arg("capturing"),
        "Interpret mode: this thread's op calls behave as inside a CUDA graph capture "
        "(no table uploads); returns the previous setting");
  m.def("cuda_interpret_barrier_check", &pygan_optim::cuda_interpret_barrier_check,
        "Interpret mode's check of itself: the launch errors of a kernel whose threads "
        "meet at different barriers and of one whose threads all meet");
  m.def("stream_pass", &pygan_optim::stream_pass, py::arg("inputs"), py::arg("outputs"),
        py::arg("ahead") = std::optional<int64_t>(), py::call_guard<py::gil_scoped_release>(),
        "Memory-roof probe: outputs[j] = sum(inputs) in one pass on all threads (float32 "
        "CPU tensors of one size, 1-4 inputs, 1-4 outputs), prefetching the inputs `ahead` "
        "bytes ahead (default: as the kernels do, stream_prefetch_bytes())");
  m.def(
      "cpu_capability", [] { return std::string(pygan_optim::cpu::active_kernels().name); },
      "Instruction set of the CPU loops in use: default, avx2 or avx512");
  // Read here, at import, so that a bad PYGAN_OPTIM_STREAM_PREFETCH fails the
  // import with its message instead of a step halfway through.
  const int64_t prefetch_bytes = pygan_optim::cpu::stream_prefetch_bytes();
  m.def(
      "stream_prefetch_bytes", [prefetch_bytes] { return prefetch_bytes; },
      "How far ahead the CPU's Adam and EMA loops prefetch each tensor they read, in bytes "
      "(0: not at all); PYGAN_OPTIM_STREAM_PREFETCH sets it, else the CPU's vendor");
  m.def(
      "plan_chunks",
      [](const std::vector<int64_t>& numels, int64_t chunk_size) {
        std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
        for (const auto& c : pygan_optim::plan_chunks(numels, chunk_size)) {
          out.emplace_back(c.tensor, c.begin, c.end);
        }
        return out;
      },
      py::arg("numels"), py::arg("chunk_size") = pygan_optim::kDefaultChunkSize,
      "(tensor, begin, end) per chunk, as the kernels split the tensors");
  m.def(
      "partition_chunks",
      [](const std::vector<int64_t>& numels, int64_t chunk_size, int64_t tasks) {
        return pygan_optim::partition_chunks(pygan_optim::plan_chunks(numels, chunk_size), tasks);
      },
      py::arg("numels"), py::arg("chunk_size"), py::arg("tasks"),
      "Offsets splitting the chunks into runs of about equal size, one per thread");
  m.attr("default_chunk_size") = pygan_optim::kDefaultChunkSize;
  // Holders of a tensor that Python's refcount does not see (another parameter's
  // .grad, an autograd graph, C++ code): FusedAdam compares these with the counts
  // of an unshared tensor before keeping a grad as exp_avg.
  m.def(
      "use_count", [](const at::Tensor& t) { return t.use_count(); }, py::arg("tensor"),
      "Strong references to the tensor's TensorImpl, this call's included");
  m.def(
      "same_objects",
      [](const py::list& a, const py::list& b) {
        const Py_ssize_t n = PyList_GET_SIZE(a.ptr());
        if (PyList_GET_SIZE(b.ptr()) != n) return false;
        for (Py_ssize_t i = 0; i < n; ++i) {
          if (PyList_GET_ITEM(a.ptr(), i) != PyList_GET_ITEM(b.ptr(), i)) return false;
        }
        return true;
      },
      py::arg("a"), py::arg("b"),
      "Whether two lists hold the same objects in the same order (identity, not ==): "
      "FusedAdam's check that a group's parameters are still those of its plan (3 us over "
      "10k parameters, where a Python loop took 0.14-0.26 ms)");
  m.def("ema_walks_with", &pygan_optim::ema_walks_with, py::arg("param"), py::arg("average"),
        "Whether an EMA average can be blended in its parameter's update pass (one call "
        "instead of a dozen attribute reads per pair)");
  m.def(
      "written_shares_memory",
      [](const std::vector<at::Tensor>& written, const std::vector<at::Tensor>& read) {
        return pygan_optim::written_shares_memory(written, read);
      },
      py::arg("written"), py::arg("read"),
      "Whether a tensor of `written` shares memory with another of them or with one of "
      "`read` (FusedAdam's EMAs blended across several calls of a step)");
  m.def("shared_memory_checks_run", &pygan_optim::shared_memory_checks_run,
        "How many FusedAdam steps so far looked for memory their tensors share (see "
        "CheckedParams::maybe_shared)");
  m.def(
      "grad_use_count",
      [](const at::Tensor& param) {
        const at::Tensor grad = param.grad();
        return grad.defined() ? grad.use_count() : 0;
      },
      py::arg("param"), "use_count of param.grad as read from C++ (0 without a grad)");

  using pygan_optim::AdamPlan;
  py::class_<AdamPlan>(m, "AdamPlan",
                       "A param group's Adam tensors, kept across steps (see adam_plan.h)",
                       py::custom_type_setup(collected_by_gc<AdamPlan>))
      .def(py::init<std::vector<py::object>, pygan_optim::TensorList, pygan_optim::TensorList,
                    pygan_optim::TensorList, pygan_optim::TensorList>(),
           py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
           py::arg("max_exp_avg_sqs"), py::arg("steps"))
      .def("step", &AdamPlan::step, py::kw_only(), py::arg("lr"), py::arg("beta1"),
           py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("amsgrad"),
           py::arg("maximize"), py::arg("decoupled"), py::arg("lr_tensor"), py::arg("grad_scale"),
           py::arg("found_inf"), py::arg("grad_mult"), py::arg("zero_grads"),
           py::arg("validate_only"), py::arg("keep_grads") = std::vector<int64_t>{},
           py::arg("emas") = std::vector<std::optional<at::Tensor>>{},
           py::arg("ema_momentum") = 0.0,
           py::arg("ema_new_weight") = std::optional<double>())
      // (step keeps the GIL: see adam_plan.cpp)
      .def("__len__", &AdamPlan::size)
      .def_property_readonly("table_uploads", &AdamPlan::table_uploads,
                             "Host-to-device copies of the kernel tables so far (CUDA and "
                             "interpret mode; a step with unchanged tensors makes none)");
}
