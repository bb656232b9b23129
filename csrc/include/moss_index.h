// Index math shared by the CPU and CUDA kernels (torch-free, __host__ __device__ inline).
//
// A k x k causal conv on an H x W raster grid, in the rank-space form of SPEC §1: tap
// t = a * k + b of token p = i * W + j reads the token di = k-1-a rows and dj = k-1-b columns back
// (tap k*k-1 is the token itself). Decoding keeps a ring of L = (k-1)(W+1) pending r-wide sums per
// sequence; slot p mod L holds what earlier tokens left for token p.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOSS_HD __host__ __device__ __forceinline__
#else
#define MOSS_HD inline
#endif

namespace moss {

// Rows back that tap `tap` of a k x k kernel reads.
MOSS_HD int64_t tap_rows_back(int64_t k, int64_t tap) { return k - 1 - tap / k; }
// Columns back that tap `tap` of a k x k kernel reads.
MOSS_HD int64_t tap_cols_back(int64_t k, int64_t tap) { return k - 1 - tap % k; }

// Pending sums a sequence needs inside a `width`-wide image (layout.ring_size).
MOSS_HD int64_t ring_size(int64_t k, int64_t width) { return (k - 1) * (width + 1); }

// Decode step: where tap `tap` of image token p leaves its contribution, as a ring slot of the
// token it lands on, or -1 when that token is outside the grid (or k == 1: no ring).
MOSS_HD int64_t decode_target_slot(int64_t k, int64_t tap, int64_t p, int64_t height, int64_t width) {
  const int64_t L = ring_size(k, width);
  if (L <= 0) return -1;
  const int64_t di = tap_rows_back(k, tap), dj = tap_cols_back(k, tap);
  const int64_t i = p / width, j = p % width;
  if (i >= height - di || j + dj >= width) return -1;  // i + di >= height, without overflow
  return (p % L + di * width + dj) % L;
}

// Decode step: whether token p is the first, in raster order, whose taps reach the token that tap
// `tap` lands on (moss_kernels.layout.first_contributor). That token writes the slot instead of
// adding to it, and token 0 reads nothing, so a ring never needs a reset between images: whatever
// an earlier image (finished or left) still had pending is never added to a new one.
MOSS_HD bool decode_first_writer(int64_t k, int64_t tap, int64_t p, int64_t width) {
  const int64_t di = tap_rows_back(k, tap), dj = tap_cols_back(k, tap);
  return (di == k - 1 || p / width == 0) && (dj == k - 1 || p % width == 0);
}

// Decode step: the ring slot token p reads (and resets), or -1 without a ring.
MOSS_HD int64_t decode_own_slot(int64_t k, int64_t p, int64_t width) {
  const int64_t L = ring_size(k, width);
  return L > 0 ? p % L : -1;
}

// Integer ceil division for launch geometry and tiling.
MOSS_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace moss
