# CUDA kernels: PYGAN_OPTIM_CUDA=0 never, =1 always (fails loudly if it
# cannot), unset/auto when torch is a CUDA build and a CUDA toolkit is found.
# The decision never asks torch.cuda.is_available(): a build machine needs no GPU.
set(_cuda_mode "$ENV{PYGAN_OPTIM_CUDA}")
if(_cuda_mode STREQUAL "")
  set(_cuda_mode auto)
endif()
if(NOT _cuda_mode MATCHES "^(0|1|auto)$")
  message(FATAL_ERROR "PYGAN_OPTIM_CUDA must be 0, 1 or auto, not '${_cuda_mode}'")
endif()

set(PYGAN_OPTIM_WITH_CUDA OFF)
if(NOT _cuda_mode STREQUAL "0")
  # The real toolkit, not a wrapper script on PATH: its include/ must be beside bin/.
  find_program(PYGAN_NVCC nvcc
    HINTS ENV CUDA_HOME ENV CUDA_PATH /usr/local/cuda PATH_SUFFIXES bin NO_DEFAULT_PATH)
  if(NOT PYGAN_NVCC)
    find_program(PYGAN_NVCC nvcc)
  endif()
  set(_why "")
  if(TORCH_CUDA_VERSION STREQUAL "")
    set(_why "torch ${Python_EXECUTABLE} is a CPU-only build")
  elseif(NOT PYGAN_NVCC)
    set(_why "no nvcc found (set CUDA_HOME)")
  else()
    get_filename_component(_cuda_root "${PYGAN_NVCC}" DIRECTORY)
    get_filename_component(_cuda_root "${_cuda_root}" DIRECTORY)
    if(NOT EXISTS "${_cuda_root}/include/cuda_runtime.h")
      set(_why "${PYGAN_NVCC} has no include/cuda_runtime.h beside it (set CUDA_HOME)")
    endif()
  endif()
  if(_why STREQUAL "")
    set(PYGAN_OPTIM_WITH_CUDA ON)
  elseif(_cuda_mode STREQUAL "1")
    message(FATAL_ERROR "PYGAN_OPTIM_CUDA=1 but the CUDA kernels cannot be built: ${_why}")
  else()
    message(STATUS "pygan_optim: building without CUDA: ${_why}")
  endif()
endif()

if(PYGAN_OPTIM_WITH_CUDA)
  set(CMAKE_CUDA_COMPILER "${PYGAN_NVCC}")
  # TORCH_CUDA_ARCH_LIST uses torch's spelling ("8.0;9.0+PTX"); default sm_80 and sm_90.
  set(_arch_list "$ENV{TORCH_CUDA_ARCH_LIST}")
  if(_arch_list STREQUAL "")
    set(_arch_list "8.0;9.0+PTX")
  endif()
  string(REPLACE " " ";" _arch_list "${_arch_list}")
  set(CMAKE_CUDA_ARCHITECTURES "")
  foreach(_arch IN LISTS _arch_list)
    string(REPLACE "+PTX" "" _num "${_arch}")
    string(REPLACE "." "" _num "${_num}")
    if(_arch MATCHES "\\+PTX$")
      list(APPEND CMAKE_CUDA_ARCHITECTURES "${_num}")
    else()
      list(APPEND CMAKE_CUDA_ARCHITECTURES "${_num}-real")
    endif()
  endforeach()
  enable_language(CUDA)
  message(STATUS "pygan_optim: CUDA kernels for ${CMAKE_CUDA_ARCHITECTURES} with ${PYGAN_NVCC}")

  # Headers torch's CUDA headers may include (cuBLAS, ...) ship in the pip
  # nvidia packages rather than the toolkit.
  execute_process(COMMAND "${Python_EXECUTABLE}" -c
"import glob, os, sysconfig
print('|'.join(glob.glob(os.path.join(sysconfig.get_paths()['purelib'], 'nvidia', '*', 'include'))))"
    OUTPUT_VARIABLE _nv_inc OUTPUT_STRIP_TRAILING_WHITESPACE)
  string(REPLACE "|" ";" _nv_inc "${_nv_inc}")

  target_sources(_C PRIVATE csrc/cuda/cuda_backend.cpp csrc/cuda/kernels.cu)
  # _C exists already, so its CUDA properties are set here rather than through
  # the CMAKE_CUDA_* variables (read only when a target is created). C++17 for
  # the .cu: without CUDA_STANDARD, CMake would ask nvcc for the C++ standard
  # of the target (20), which CMake 3.25 does not know how to request from nvcc 13.
  set_target_properties(_C PROPERTIES
    CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}"
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    CUDA_EXTENSIONS OFF)
  target_include_directories(_C PRIVATE "${_cuda_root}/include" ${_nv_inc})
  target_compile_definitions(_C PRIVATE PYGAN_OPTIM_WITH_CUDA=1)
  target_link_directories(_C PRIVATE "${_cuda_root}/lib64")
  target_link_libraries(_C PRIVATE c10_cuda torch_cuda cudart)
  # --fmad=false: FMAs only where math.h's mul_add asks for them, as on the CPU
  # and in interpret mode, so the three give the same bits (but for the
  # device's pow, up to 2 ulp from glibc's: float64 updates may differ by ulps).
  set_source_files_properties(csrc/cuda/kernels.cu PROPERTIES
    COMPILE_OPTIONS "-O3;--expt-relaxed-constexpr;-Xptxas=-v;--fmad=false")
  set_property(TARGET _C PROPERTY CUDA_RUNTIME_LIBRARY Shared)
  # -O3 etc. above are for g++ only.
  target_compile_options(_C PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo>)
endif()
