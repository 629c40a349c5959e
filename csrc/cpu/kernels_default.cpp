// The CPU loops compiled for the default instruction set (flags set in CMakeLists.txt).
#define PYGAN_ISA isa_default
#include "kernels_impl.h"

PYGAN_DEFINE_KERNEL_TABLE(kernels_default, "default")
