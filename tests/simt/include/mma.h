// SIMT harness stand-in for <mma.h>: nvcuda::wmma m16n16k16 with the fragment held whole by every
// lane (the real layout is opaque, so any assignment of elements to lanes is a valid model).
// Accumulator elements are owned by lane e % 32: fill, mma and store touch only the caller's own
// elements, so a store is 32 lanes writing disjoint parts (as on the GPU) and ThreadSanitizer sees
// which lane wrote what. Every call is a warp operation of all 32 lanes (uniform pointer and ldm,
// same call site) with CUDA's rules checked: a 256-bit (32-byte) aligned pointer and an ldm that is
// a multiple of 16 bytes. Products accumulate in fp32 in k order (fmaf); the tensor cores' own
// rounding of the sum is not modelled.
#pragma once

#include "simt.h"
#include "simt_types.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
constexpr bool is_operand = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the harness models m16n16k16 only");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float> : detail::is_operand<T>,
                "operands are __half or __nv_bfloat16, accumulators float");

 public:
  static constexpr int num_elements = 256;
  float x[256];  // element (i, j) at i * 16 + j, values exactly representable in T
};

template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm,
                      const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulators take a layout argument");
  ::simt::wmma_op("load_matrix_sync", p, static_cast<int64_t>(ldm) * sizeof(T), file, line);
  constexpr bool row = std::is_same_v<L, row_major>;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = detail::to_f(row ? p[i * ldm + j] : p[j * ldm + i]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::wmma_op("load_matrix_sync", p, static_cast<int64_t>(ldm) * 4, file, line);
  const int lane = ::simt::lane_id();
  for (int e = lane; e < 256; e += 32) {
    const int i = e / 16, j = e % 16;
    f.x[e] = l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::wmma_op("store_matrix_sync", p, static_cast<int64_t>(ldm) * 4, file, line);
  const int lane = ::simt::lane_id();
  for (int e = lane; e < 256; e += 32) {
    const int i = e / 16, j = e % 16;
    (l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[e];
  }
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  ::simt::wmma_op("fill_fragment", nullptr, 0, file, line);
  for (int e = ::simt::lane_id(); e < 256; e += 32) f.x[e] = v;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::wmma_op("mma_sync", nullptr, 0, file, line);
  for (int e = ::simt::lane_id(); e < 256; e += 32) {
    const int i = e / 16, j = e % 16;
    float acc = c.x[e];
    for (int k = 0; k < 16; ++k) acc = std::fma(a.x[i * 16 + k], b.x[k * 16 + j], acc);
    d.x[e] = acc;  // d may be c: each element is read before it is written
  }
}

}  // namespace nvcuda::wmma
