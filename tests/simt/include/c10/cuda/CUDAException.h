// SIMT harness stand-in for C10_CUDA_CHECK: a failed call raises with the harness's message.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#define C10_CUDA_CHECK(expr)                                                                  \
  do {                                                                                        \
    const cudaError_t simt_err_ = (expr);                                                     \
    TORCH_CHECK(simt_err_ == cudaSuccess, "CUDA error (SIMT harness): ", cudaGetErrorString(simt_err_)); \
  } while (0)
