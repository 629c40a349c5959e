// Picks the CPU loops for this machine once, at run time.
#include <cstdlib>
#include <cstring>

#include "kernel_table.h"

namespace pygan_optim {
namespace cpu {
namespace {

bool has_avx2() {
#ifdef PYGAN_OPTIM_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool has_avx512() {
#ifdef PYGAN_OPTIM_X86
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

const KernelTable& choose() {
  // ATEN_CPU_CAPABILITY caps the choice, as it does for ATen's own kernels.
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  const bool allow_avx512 = !cap || std::strcmp(cap, "avx512") == 0 || cap[0] == '\0';
  const bool allow_avx2 = allow_avx512 || std::strcmp(cap, "avx2") == 0;
  if (allow_avx512 && has_avx512()) return kernels_avx512();
  if (allow_avx2 && has_avx2()) return kernels_avx2();
  return kernels_default();
}

}  // namespace

const KernelTable& active_kernels() {
  static const KernelTable& table = choose();
  return table;
}

}  // namespace cpu
}  // namespace pygan_optim
