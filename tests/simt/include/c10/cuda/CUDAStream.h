// SIMT harness stand-in: one (default) stream; launches run to completion in order.
#pragma once
#include <cuda_runtime.h>
namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace c10::cuda
