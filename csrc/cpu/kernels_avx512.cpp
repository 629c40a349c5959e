// The CPU loops compiled for the avx512 instruction set (flags set in CMakeLists.txt).
#define PYGAN_ISA isa_avx512
// GCC 12's AVX-512 headers (sqrt, conversions, half extracts and inserts) warn
// that their own undefined source operands may be used uninitialized: false
// positives, silenced here only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels_impl.h"

PYGAN_DEFINE_KERNEL_TABLE(kernels_avx512, "avx512")
#pragma GCC diagnostic pop
