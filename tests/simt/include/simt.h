// The SIMT execution harness: lets csrc/cuda/*.cu compile as ordinary C++ (g++) and run on the CPU,
// so that every CUDA kernel is executed and checked in CI without a GPU. Test infrastructure only
// (tests/simt/), never part of the installed product.
//
// Model (csrc/README.md, "Running the CUDA kernels without a GPU", also says what it cannot show):
//   * every CUDA thread of a block is a fiber (ucontext); a block's fibers run cooperatively on one OS
//     thread from one synchronisation point to the next (a block barrier, a warp shuffle, a wmma call);
//   * the blocks of a launch run on SIMT_WORKERS OS threads (block b on worker b % workers), so races
//     between blocks show under ThreadSanitizer;
//   * static __shared__ variables are thread_local statics in one ELF section ("simt_shared") and the
//     dynamic shared memory is a per-worker arena; both are filled with 0xFF (NaN in every float
//     type) before each block;
//   * __syncthreads is a block barrier that every thread still running must reach at the same call
//     site (exited threads drop out, as on sm_70+); a barrier reached by only part of the block, or a
//     warp operation whose mask names a lane that is elsewhere, is reported as a launch error;
//   * __shfl_*_sync exchange values among the lanes of the mask only; wmma fragments are held whole by
//     every lane, accumulator elements are owned by lane e % 32, every wmma call is a warp operation of
//     all 32 lanes with its pointer alignment (32 bytes) and ldm (a multiple of 16 bytes) checked;
//   * half / bf16 conversions round to nearest even, bit-identical to CUDA's (NaN -> 0x7fff);
//   * cp.async copies are deferred to the wait that covers their group (zero-filled past src-size),
//     so reading shared memory before the wait shows stale data.
// Under ThreadSanitizer the fibers are TSan fibers switched without synchronisation; the only
// happens-before edges inside a launch are the block barriers (and block start/end on a worker).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// A static __shared__ variable: one copy per OS thread (block), in the section that is poisoned
// before each block.
#define __shared__ static thread_local __attribute__((section("simt_shared")))

// The launch seam (csrc/cuda/common.cuh defines the same names for nvcc as <<<...>>> and
// extern __shared__): kernel name last, since a template argument list may hold commas.
#define MOSS_LAUNCH(grid, block, smem, stream, ...) \
  ::simt::launcher(__VA_ARGS__, #__VA_ARGS__, grid, block, smem, stream)
#define MOSS_CP_ASYNC_SEAM 1  // common.cuh's cp.async helpers call simt::cp_async16 & co.
#define MOSS_DYNAMIC_SHARED(type, name, align) \
  type* const name = static_cast<type*>(::simt::dynamic_shared(alignof(type) > (align) ? alignof(type) : (align)))

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---------------------------------------------------------------------------------------- runtime API
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
  cudaErrorIllegalInstruction = 715,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamCreate(cudaStream_t* stream);
cudaError_t cudaStreamDestroy(cudaStream_t stream);

namespace simt {

struct Thread;
struct Block;

// The fiber running now on this OS thread (null outside a kernel).
Thread* current();
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void* dynamic_shared(size_t align);

// Synchronisation points (called by the macros below with their call site).
void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
uint64_t shfl(int kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);
// A wmma call: a warp operation of all 32 lanes; ptr/ldm (bytes per row) checked when ptr is given.
void wmma_op(const char* what, const void* ptr, int64_t ldm_bytes, const char* file, int line);
int lane_id();
[[noreturn]] void fail(const char* fmt, ...);

// cp.async (csrc/cuda/common.cuh's seam cp_async16 / cp_async_commit / cp_async_wait<N>): a 16-byte
// global -> shared copy of src_bytes bytes, zero-filled to 16, both addresses 16-byte aligned, the
// destination in shared memory. The destination reads as 0xff (NaN) from the issue until a
// cp_async_wait(n) that leaves at most n committed groups pending carries the copy out; a thread
// that exits with copies not waited for is a launch error.
void cp_async16(void* dst, const void* src, int src_bytes, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int pending, const char* file, int line);

// Function attributes set through cudaFuncSetAttribute, keyed by the kernel's address.
cudaError_t set_max_dynamic_smem(const void* func, int bytes);

// One launch: checks the configuration, then runs `body(launch)` for every thread of every block.
cudaError_t launch(const void* func, const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   void (*body)(void*), void* ctx);

template <typename... P>
struct Launcher {
  void (*func)(P...);
  const char* name;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  template <typename... A>
  void operator()(A&&... args) const {
    // Parameters are copied once at launch (as CUDA copies them to constant memory); every thread
    // reads the same copy.
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    struct Ctx {
      void (*func)(P...);
      std::tuple<std::decay_t<P>...>* params;
    } ctx{func, &params};
    launch(reinterpret_cast<const void*>(func), name, grid, block, smem, stream,
           [](void* c) {
             auto* x = static_cast<Ctx*>(c);
             std::apply(x->func, *x->params);
           },
           &ctx);
  }
};

template <typename... P>
Launcher<P...> launcher(void (*func)(P...), const char* name, dim3 grid, dim3 block, size_t smem,
                        cudaStream_t stream) {
  return Launcher<P...>{func, name, grid, block, smem, stream};
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace simt

template <typename F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return simt::set_max_dynamic_smem(reinterpret_cast<const void*>(func), value);
}

#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())
#define warpSize 32

#define __syncthreads() ::simt::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::simt::syncwarp(__VA_ARGS__ + 0 ? (__VA_ARGS__ + 0) : 0xffffffffu, __FILE__, __LINE__)

namespace simt {
enum ShflKind : int { kIdx = 0, kUp = 1, kDown = 2, kXor = 3 };
template <typename T>
T shfl_t(int kind, unsigned mask, T v, int arg, int width, const char* file, int line) {
  return from_bits<T>(shfl(kind, mask, to_bits(v), arg, width, file, line));
}
}  // namespace simt
#define __shfl_sync(mask, v, src, ...) \
  ::simt::shfl_t(::simt::kIdx, mask, v, src, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::simt::shfl_t(::simt::kUp, mask, v, d, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::simt::shfl_t(::simt::kDown, mask, v, d, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::simt::shfl_t(::simt::kXor, mask, v, m, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
