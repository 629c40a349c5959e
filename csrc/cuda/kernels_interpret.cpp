// Interpret mode: the CUDA kernels of kernels.cu, compiled by the host compiler
// against emulation.h (namespace pygan_optim::cuda_interpret). Always built, so
// the CUDA code paths run and are tested on machines without a GPU.
#define PYGAN_CUDA_INTERPRET 1
#include "kernels.cu"
