// Picks the CPU loops for this machine once, at run time.
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

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

// On an Intel Xeon (Emerald Rapids VM, session 37) the loops' divides and
// square roots held the hardware prefetchers back: asking 2 KB ahead took
// 3-11% off BigGAN-128's Adam steps and updates (NOTES, "An Intel Xeon again"
// in Measurements). Not measured on an AMD CPU, where prefetching the next chunk
// had made the small-tensor steps slower (session 20): left off there until
// measured (PYGAN_OPTIM_STREAM_PREFETCH=2048 tries it).
int64_t choose_stream_prefetch() {
  if (const char* text = std::getenv("PYGAN_OPTIM_STREAM_PREFETCH")) {
    char* end = nullptr;
    errno = 0;
    const long long bytes = std::strtoll(text, &end, 10);
    if (*text == '\0' || *end != '\0' || errno != 0 || bytes < 0 ||
        bytes > kMaxStreamPrefetchBytes) {
      throw std::invalid_argument("pygan_optim: PYGAN_OPTIM_STREAM_PREFETCH='" +
                                  std::string(text) + "': expected a byte count from 0 to " +
                                  std::to_string(kMaxStreamPrefetchBytes));
    }
    return bytes;
  }
#ifdef PYGAN_OPTIM_X86
  if (__builtin_cpu_is("intel")) return 2048;
#endif
  return 0;
}

}  // namespace

const KernelTable& active_kernels() {
  static const KernelTable& table = choose();
  return table;
}

int64_t stream_prefetch_bytes() {
  static const int64_t bytes = choose_stream_prefetch();
  return bytes;
}

}  // namespace cpu
}  // namespace pygan_optim
