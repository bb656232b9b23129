// The one tiled GEMM every GEMM-shaped part of the split forward and the backward runs on:
// C = alpha * A B with gathered operand rows/columns and a scattered (optionally accumulating)
// output. The tiles and their math (tensor cores for half/bf16, exact fp32 FMA for float) live in
// tile_gemm.cuh, shared with the fused forward. One block owns one output tile for the whole k
// loop: deterministic, no atomics.
#include "tile_gemm.cuh"

namespace moss::cuda {
namespace {

using tile::BK;
using tile::BM;
using tile::BN;
using tile::load_tile;
using tile::PAD;
using tile::THREADS;
using tile::TileMath;
using tile::Tiles;

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
  tile::store_tile(tiles, c, m0, n0, m, n);
}

template <typename CT>
void launch(int64_t m, int64_t n, int64_t k, const Operand& a, const Operand& b, const Output& c,
            cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(m, BM)), static_cast<unsigned>(ceil_div(n, BN)));
  MOSS_LAUNCH(grid, THREADS, 0, stream, gemm_kernel<CT>)(m, n, k, a, b, c);
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
