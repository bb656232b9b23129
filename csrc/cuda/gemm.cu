// The one tiled GEMM every GEMM-shaped part of the forward and backward runs on:
// C = alpha * A B with gathered operand rows/columns and a scattered (optionally accumulating)
// output. 64 x 64 output tiles, 32-deep k slabs, 4 warps. Templated over the compute type:
// half/bf16 use tensor cores (wmma m16n16k16, fp32 accumulation), float uses FMA units (exact fp32,
// no tf32). One block owns one output tile for the whole k loop: deterministic, no atomics.
#include <mma.h>

#include "common.cuh"

namespace moss::cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128;
constexpr int PAD = 8;    // keeps wmma's ldm a multiple of 16 bytes and spreads smem banks
constexpr int PAD_C = 4;

template <typename CT>
struct __align__(32) Tiles {
  CT a[BM][BK + PAD];
  CT b[BK][BN + PAD];
  float c[BM][BN + PAD_C];
};

// Loads a ROWS x COLS tile of `op` starting at (r0, c0) into dst, converted to CT, zero outside
// (rows, cols). Consecutive threads walk whichever index is contiguous in memory (coalescing).
template <int ROWS, int COLS, int LD, typename CT>
__device__ __forceinline__ void load_tile(CT (*dst)[LD], const Operand& op, int64_t r0, int64_t c0, int64_t rows,
                                          int64_t cols) {
  const bool cols_fast = op.stride_c == 1;
  for (int e = threadIdx.x; e < ROWS * COLS; e += THREADS) {
    const int i = cols_fast ? e / COLS : e % ROWS;
    const int j = cols_fast ? e % COLS : e / ROWS;
    const int64_t gi = r0 + i, gj = c0 + j;
    float v = 0.0f;
    if (gi < rows && gj < cols) {
      const int64_t ri = op.gather_r ? op.gather_r[gi] : gi;
      const int64_t cj = op.gather_c ? op.gather_c[gj] : gj;
      v = load_as_float(op.data, op.dtype, ri * op.stride_r + cj * op.stride_c);
    }
    dst[i][j] = from_float<CT>(v);
  }
}

// Tile math per compute type: accumulate one BK slab, then spill the accumulators to tiles.c.
template <typename CT>
struct TileMath {  // half / bf16: tensor cores; warp w owns the 32 x 32 quarter (w / 2, w % 2)
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, CT, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, CT, nvcuda::wmma::row_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  FragC acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }
  __device__ __forceinline__ void step(const Tiles<CT>& t) {
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      FragA fa[2];
      FragB fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(fa[i], &t.a[wm + 16 * i][ks], BK + PAD);
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(fb[j], &t.b[ks][wn + 16 * j], BN + PAD);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void spill(Tiles<CT>& t) {
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(&t.c[wm + 16 * i][wn + 16 * j], acc[i][j], BN + PAD_C,
                                        nvcuda::wmma::mem_row_major);
  }
};

template <>
struct TileMath<float> {  // fp32: each thread owns 4 rows x 8 columns (columns strided by 8)
  float acc[4][8];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  }
  __device__ __forceinline__ void step(const Tiles<float>& t) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = t.a[4 * ty + i][kk];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = t.b[kk][tx + 8 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void spill(Tiles<float>& t) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) t.c[4 * ty + i][tx + 8 * j] = acc[i][j];
  }
};

template <typename CT>
__global__ void __launch_bounds__(THREADS) gemm_kernel(int64_t m, int64_t n, int64_t k, Operand a, Operand b,
                                                       Output c) {
  __shared__ Tiles<CT> tiles;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;
  TileMath<CT> math;
  math.zero();
  for (int64_t k0 = 0; k0 < k; k0 += BK) {
    load_tile<BM, BK, BK + PAD>(tiles.a, a, m0, k0, m, k);
    load_tile<BK, BN, BN + PAD>(tiles.b, b, k0, n0, k, n);
    __syncthreads();
    math.step(tiles);
    __syncthreads();
  }
  math.spill(tiles);
  __syncthreads();
  // Epilogue: scatter rows, scale, optionally add into what is there, round once.
  for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
    const int i = e / BN, j = e % BN;
    const int64_t gi = m0 + i, gj = n0 + j;
    if (gi >= m || gj >= n) continue;
    const int64_t row = c.rows ? c.rows[gi] : gi;
    const int64_t off = row * c.ld + gj;
    float v = c.alpha * tiles.c[i][j];
    if (c.accumulate) v += load_as_float(c.data, c.dtype, off);
    store_from_float(c.data, c.dtype, off, v);
  }
}

template <typename CT>
void launch(int64_t m, int64_t n, int64_t k, const Operand& a, const Operand& b, const Output& c,
            cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(m, BM)), static_cast<unsigned>(ceil_div(n, BN)));
  gemm_kernel<CT><<<grid, THREADS, 0, stream>>>(m, n, k, a, b, c);
}

}  // namespace

void gemm(int64_t m, int64_t n, int64_t k, const Operand& a, const Operand& b, const Output& c, DType compute,
          void* stream) {
  if (m <= 0 || n <= 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (compute) {
    case DType::kF16: launch<__half>(m, n, k, a, b, c, s); break;
    case DType::kBF16: launch<__nv_bfloat16>(m, n, k, a, b, c, s); break;
    default: launch<float>(m, n, k, a, b, c, s); break;
  }
}

}  // namespace moss::cuda
