// The Python module pygan_optim._C. Loading it registers the ops (ops.cpp);
// the functions here expose build facts and the chunk planner for tests.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>
#include <vector>

#include "cpu/kernel_table.h"
#include "ops.h"
#include "pygan_optim/chunks.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pygan_optim's compiled kernels; the ops are under torch.ops.pygan_optim";
  m.def("cuda_built", &pygan_optim::cuda_built, "True when this build has the CUDA kernels");
  m.def(
      "cpu_capability", [] { return std::string(pygan_optim::cpu::active_kernels().name); },
      "Instruction set of the CPU loops in use: default, avx2 or avx512");
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
}
