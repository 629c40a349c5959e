// The CPU loops compiled for the avx2 instruction set (flags set in CMakeLists.txt).
#define PYGAN_ISA isa_avx2
#include "kernels_impl.h"

PYGAN_DEFINE_KERNEL_TABLE(kernels_avx2, "avx2")
