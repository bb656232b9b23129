// Device helpers shared by the CUDA kernels: dtype-erased loads/stores and conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../include/moss_cuda.h"

// The launch seam: every launch is MOSS_LAUNCH(grid, block, smem, stream, kernel)(args...) and every
// dynamic shared memory declaration MOSS_DYNAMIC_SHARED(type, name, align). Under nvcc they are
// exactly `kernel<<<grid, block, smem, stream>>>(args...)` and `extern __shared__ __align__(align)
// type name[]`; the SIMT harness (tests/simt, which runs these kernels on the CPU in CI) defines
// them in its own <cuda_runtime.h>. The kernel comes last: a template argument list holds commas.
#ifndef MOSS_LAUNCH
#define MOSS_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define MOSS_DYNAMIC_SHARED(type, name, align) extern __shared__ __align__(align) type name[]
#endif
#include "../include/moss_index.h"

namespace moss::cuda {

// Element `off` of a buffer of dtype `dt`, as fp32 (the branch is uniform across a warp).
__device__ __forceinline__ float load_as_float(const void* p, DType dt, int64_t off) {
  switch (dt) {
    case DType::kF16: return __half2float(static_cast<const __half*>(p)[off]);
    case DType::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[off]);
    default: return static_cast<const float*>(p)[off];
  }
}

__device__ __forceinline__ void store_from_float(void* p, DType dt, int64_t off, float v) {
  switch (dt) {
    case DType::kF16: static_cast<__half*>(p)[off] = __float2half_rn(v); break;
    case DType::kBF16: static_cast<__nv_bfloat16*>(p)[off] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[off] = v; break;
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
  return v;
}

// Blocks for a grid-stride loop over `n` items (capped: the loop covers the rest).
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = ceil_div(n > 0 ? n : 1, threads);
  return static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
}

}  // namespace moss::cuda
