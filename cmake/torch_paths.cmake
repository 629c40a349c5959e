# Asks the Python interpreter's torch for its include and library paths and
# C++ ABI. Sets TORCH_INCLUDE_DIRS, TORCH_LIBRARY_DIRS, TORCH_CXX11_ABI and
# TORCH_CUDA_VERSION (empty for a CPU-only torch).
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
"import torch
from torch.utils import cpp_extension as c
print('|'.join(c.include_paths()))
print('|'.join(c.library_paths()))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.version.cuda or '')"
  OUTPUT_VARIABLE _torch_out
  RESULT_VARIABLE _torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "pygan_optim: cannot import torch with ${Python_EXECUTABLE}. "
    "Install torch first and build with `pip install --no-build-isolation .`")
endif()
string(REPLACE "\n" ";" _torch_lines "${_torch_out}")
list(LENGTH _torch_lines _n)
list(GET _torch_lines 0 _inc)
list(GET _torch_lines 1 _lib)
list(GET _torch_lines 2 TORCH_CXX11_ABI)
set(TORCH_CUDA_VERSION "")
if(_n GREATER 3)
  list(GET _torch_lines 3 TORCH_CUDA_VERSION)
endif()
string(REPLACE "|" ";" TORCH_INCLUDE_DIRS "${_inc}")
string(REPLACE "|" ";" TORCH_LIBRARY_DIRS "${_lib}")
message(STATUS "pygan_optim: torch include ${TORCH_INCLUDE_DIRS}; CUDA '${TORCH_CUDA_VERSION}'")
