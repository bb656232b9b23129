// The tile machinery shared by the tiled GEMM (gemm.cu) and the fused forward (fused_forward.cu):
// 64 x 64 output tiles, 32-deep k slabs, 4 warps. Templated over the compute type CT: half/bf16
// run tensor cores (wmma m16n16k16, fp32 accumulation), float runs FMA units (exact fp32, no tf32).
#pragma once

#include <mma.h>

#include "common.cuh"

namespace moss::cuda::tile {

constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128;
constexpr int PAD = 8;  // keeps wmma's ldm a multiple of 16 bytes and spreads smem banks
constexpr int PAD_C = 4;

template <typename CT>
struct __align__(32) Tiles {
  CT a[BM][BK + PAD];
  CT b[BK][BN + PAD];
  float c[BM][BN + PAD_C];
};

// Loads a ROWS x COLS tile into dst, converted to CT: element (i, j) is
// data[row_of(r0 + i) * stride_r + col_of(c0 + j) * stride_c], zero where r0 + i >= rows,
// c0 + j >= cols or row_of gives a negative row (a masked-out source: the conv's zero padding).
// Consecutive threads walk whichever index is contiguous in memory (coalescing).
template <int ROWS, int COLS, int LD, typename CT, typename RowOf, typename ColOf>
__device__ __forceinline__ void load_tile_mapped(CT (*dst)[LD], const void* data, DType dtype, int64_t stride_r,
                                                 int64_t stride_c, RowOf row_of, ColOf col_of, int64_t r0,
                                                 int64_t c0, int64_t rows, int64_t cols) {
  const bool cols_fast = stride_c == 1;
  for (int e = threadIdx.x; e < ROWS * COLS; e += THREADS) {
    const int i = cols_fast ? e / COLS : e % ROWS;
    const int j = cols_fast ? e % COLS : e / ROWS;
    const int64_t gi = r0 + i, gj = c0 + j;
    float v = 0.0f;
    if (gi < rows && gj < cols) {
      const int64_t ri = row_of(gi);
      if (ri >= 0) v = load_as_float(data, dtype, ri * stride_r + col_of(gj) * stride_c);
    }
    dst[i][j] = from_float<CT>(v);
  }
}

// The same for an Operand (rows/columns optionally gathered).
template <int ROWS, int COLS, int LD, typename CT>
__device__ __forceinline__ void load_tile(CT (*dst)[LD], const Operand& op, int64_t r0, int64_t c0, int64_t rows,
                                          int64_t cols) {
  load_tile_mapped<ROWS, COLS, LD>(
      dst, op.data, op.dtype, op.stride_r, op.stride_c,
      [&](int64_t gi) { return op.gather_r ? op.gather_r[gi] : gi; },
      [&](int64_t gj) { return op.gather_c ? op.gather_c[gj] : gj; }, r0, c0, rows, cols);
}

// Tile math per compute type: accumulate one BK slab of A (BM x BK, row-major, leading dimension
// lda) times B (BK x BN, leading dimension ldb), both in shared memory; then spill the
// accumulators to an fp32 BM x BN tile (Tiles::c).
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
  // a, b: 32-byte aligned, lda/ldb multiples of 8 elements (wmma's requirements).
  __device__ __forceinline__ void step(const CT* a, int lda, const CT* b, int ldb) {
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      FragA fa[2];
      FragB fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(fa[i], a + (wm + 16 * i) * lda + ks, lda);
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(fb[j], b + ks * ldb + wn + 16 * j, ldb);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void step(const Tiles<CT>& t) { step(&t.a[0][0], BK + PAD, &t.b[0][0], BN + PAD); }
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
  __device__ __forceinline__ void step(const float* a, int lda, const float* b, int ldb) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      float av[4], bv[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = a[(4 * ty + i) * lda + kk];
#pragma unroll
      for (int j = 0; j < 8; ++j) bv[j] = b[kk * ldb + tx + 8 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void step(const Tiles<float>& t) { step(&t.a[0][0], BK + PAD, &t.b[0][0], BN + PAD); }
  __device__ __forceinline__ void spill(Tiles<float>& t) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) t.c[4 * ty + i][tx + 8 * j] = acc[i][j];
  }
};

// Epilogue: the spilled BM x BN tile at (m0, n0) of an m x n product into c: scatter rows, scale,
// optionally add into what is there, round once.
template <typename CT>
__device__ __forceinline__ void store_tile(const Tiles<CT>& t, const Output& c, int64_t m0, int64_t n0, int64_t m,
                                           int64_t n) {
  for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
    const int i = e / BN, j = e % BN;
    const int64_t gi = m0 + i, gj = n0 + j;
    if (gi >= m || gj >= n) continue;
    const int64_t row = c.rows ? c.rows[gi] : gi;
    const int64_t off = row * c.ld + gj;
    float v = c.alpha * t.c[i][j];
    if (c.accumulate) v += load_as_float(c.data, c.dtype, off);
    store_from_float(c.data, c.dtype, off, v);
  }
}

}  // namespace moss::cuda::tile
