// Device helpers shared by the CUDA kernels: conversions, 16-byte vectors, cp.async.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

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

// 16 bytes moved as one vector (LDG.128 / STS.128 when aligned, which the callers check).
struct __align__(16) Raw16 {
  unsigned w[4];
};

// The cp.async seam (sm_80+): a 16-byte global -> shared copy of `src_bytes` bytes (0..16), the rest
// zero-filled (masked and tail elements), both addresses 16-byte aligned; commit closes a group,
// wait<N> blocks until at most N committed groups are pending. Under nvcc: inline PTX on sm_80+,
// a synchronous copy below; the SIMT harness defines MOSS_CP_ASYNC_SEAM and models them (deferred
// copies, alignment and the destination checked).
#ifndef MOSS_CP_ASYNC_SEAM
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
#else
  Raw16 v{};
  if (src_bytes == 16) {
    v = *static_cast<const Raw16*>(gmem);
  } else {
    for (int i = 0; i < src_bytes; ++i) reinterpret_cast<unsigned char*>(&v)[i] = static_cast<const unsigned char*>(gmem)[i];
  }
  *static_cast<Raw16*>(smem) = v;
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes,
                                           const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::cp_async16(smem, gmem, src_bytes, file, line);
}
__device__ __forceinline__ void cp_async_commit() { ::simt::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::cp_async_wait(N, file, line);
}
#endif

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

// Element e (compile-time after unrolling) of a 16-byte vector of T, as fp32; and VEC = 16 /
// sizeof(T) fp32 values rounded to T, packed into one 16-byte vector.
template <typename T>
__device__ __forceinline__ float vec_elem(const Raw16& r, int e) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(r.w[e]);
  } else {
    const auto u = static_cast<unsigned short>((r.w[e / 2] >> (16 * (e % 2))) & 0xffffu);
    if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(u));
    else return __bfloat162float(__ushort_as_bfloat16(u));
  }
}
template <typename T>
__device__ __forceinline__ Raw16 vec_pack(const float* f) {
  Raw16 r;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (sizeof(T) == 4) {
      r.w[w] = __float_as_uint(f[w]);
    } else if constexpr (std::is_same_v<T, __half>) {
      r.w[w] = static_cast<unsigned>(__half_as_ushort(__float2half_rn(f[2 * w]))) |
               (static_cast<unsigned>(__half_as_ushort(__float2half_rn(f[2 * w + 1]))) << 16);
    } else {
      r.w[w] = static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(f[2 * w]))) |
               (static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(f[2 * w + 1]))) << 16);
    }
  }
  return r;
}

// Blocks for a grid-stride loop over `n` items (capped: the loop covers the rest).
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = ceil_div(n > 0 ? n : 1, threads);
  return static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
}

}  // namespace moss::cuda
