// The CPU loops compiled for the avx512 instruction set (flags set in CMakeLists.txt).
#define PYGAN_ISA isa_avx512
#include "kernels_impl.h"

PYGAN_DEFINE_KERNEL_TABLE(kernels_avx512, "avx512")
