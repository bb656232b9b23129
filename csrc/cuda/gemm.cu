// The one tiled GEMM every GEMM-shaped part of the split forward and the backward runs on:
// C = alpha * A B with gathered operand rows/columns and a scattered (optionally accumulating)
// output. The tiles, loaders, k loop and tile math (tensor cores for half/bf16, exact fp32 FMA for
// float) live in tile_gemm.cuh, shared with the fused forward: 128 x 64 tiles, 8 warps, one block
// per output tile for the whole k loop: deterministic, no atomics.
//
// The kernel is instantiated per (compute type, A's element type and contiguous dimension, B's):
// the combinations cuda_dispatch.cpp passes (Combos below), whose loads are 16-byte vectors, chosen
// once per launch; anything else (calls mixing dtypes with fp32 compute, rows that are not whole
// 16-byte vectors, e.g. a rank not a multiple of 8 in half) runs the generic instantiation, which
// reads each operand's dtype once per slab and loads scalars.
#include <tuple>

#include "tile_gemm.cuh"

namespace moss::cuda {
namespace {

using tile::Any;
using tile::Src;

template <typename CT>
using GemmShape = tile::Shape<CT, 128, 4>;

// A is (m x k): mn = m; B is (k x n): mn = n. AK / BKC: whether that operand's k is its contiguous
// dimension (so shared memory holds it [mn][k]); otherwise its m / n is.
template <typename CT, typename SA, bool AK, typename SB, bool BKC>
__global__ void __launch_bounds__(GemmShape<CT>::THREADS)
    gemm_kernel(Src a, Src b, Output c) {
  using Sh = GemmShape<CT>;
  // Dynamic, not static __shared__ (under 48 KB, no attribute needed): g++ ignores the section
  // attribute the SIMT harness gives a template's static __shared__, so only dynamic shared memory
  // is poisoned before each block there.
  MOSS_DYNAMIC_SHARED(unsigned char, smem, 128);
  auto& sm = *reinterpret_cast<tile::Smem<CT, Sh, AK, BKC>*>(smem);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * Sh::BM, n0 = static_cast<int64_t>(blockIdx.y) * Sh::BN;
  tile::Loader<CT, SA, Sh::BM, Sh::BK, AK, Sh::THREADS> la;
  tile::Loader<CT, SB, Sh::BN, Sh::BK, BKC, Sh::THREADS> lb;
  la.setup(a, m0);
  lb.setup(b, n0);
  tile::TileMath<CT, Sh> math;
  math.zero();
  tile::mainloop<Sh>(math, la, lb, sm, a.k_ext, tile::StageSlab{});
  math.spill(sm.c);
  __syncthreads();
  tile::store_tile<Sh::BM, Sh::BN>(sm.c, c, m0, n0, a.mn_ext, b.mn_ext, Sh::THREADS);
}

template <typename CT, typename SA, bool AK, typename SB, bool BKC>
struct Combo {
  static bool launch(const Src& a, bool a_k, const Src& b, bool b_k, const Output& c, cudaStream_t stream) {
    if (!tile::matches<SA>(a.dtype) || !tile::matches<SB>(b.dtype) || a_k != AK || b_k != BKC) return false;
    constexpr bool kGeneric = std::is_same_v<SA, Any> && std::is_same_v<SB, Any>;
    if (!kGeneric && !(tile::vectors_fit<SA>(a, AK) && tile::vectors_fit<SB>(b, BKC))) return false;
    using Sh = GemmShape<CT>;
    const dim3 grid(static_cast<unsigned>(ceil_div(a.mn_ext, Sh::BM)), static_cast<unsigned>(ceil_div(b.mn_ext, Sh::BN)));
    static_assert(sizeof(tile::Smem<CT, Sh, AK, BKC>) <= 48 * 1024, "within the default dynamic shared memory");
    MOSS_LAUNCH(grid, Sh::THREADS, sizeof(tile::Smem<CT, Sh, AK, BKC>), stream, gemm_kernel<CT, SA, AK, SB, BKC>)(a, b, c);
    return true;
  }
};

using F = float;
using H = __half;
using B = __nv_bfloat16;
constexpr bool K = true, MN = false;
// What cuda_dispatch.cpp passes (x, weights, grad_out in the compute type, rank-space sums in fp32;
// fp16 rank-space GEMMs compute in bf16): forward down (CT, CT) and up (fp32 z, weight) with both
// operands k-contiguous; backward dB = g^T h (A m-contiguous, B n-contiguous), dh = g B and
// dx = dh A (B n-contiguous), dA = dh^T x (both mn-contiguous).
template <typename CT>
struct Combos;
template <>
struct Combos<F> {
  using type = std::tuple<Combo<F, F, K, F, K>, Combo<F, F, MN, F, MN>, Combo<F, F, K, F, MN>>;
};
template <>
struct Combos<H> {
  using type = std::tuple<Combo<H, H, K, H, K>, Combo<H, H, K, H, MN>>;
};
template <>
struct Combos<B> {
  using type = std::tuple<Combo<B, B, K, B, K>, Combo<B, F, K, B, K>, Combo<B, F, K, H, K>, Combo<B, B, MN, F, MN>,
                          Combo<B, H, MN, F, MN>, Combo<B, B, K, B, MN>, Combo<B, F, MN, B, MN>,
                          Combo<B, F, MN, H, MN>, Combo<B, F, K, B, MN>, Combo<B, F, K, H, MN>>;
};

template <typename CT>
void launch(const Src& a, const Src& b, const Output& c, cudaStream_t stream) {
  // Which dimension each operand streams along: k where k is contiguous, else its m / n where
  // that is; neither (or gathered): k, through the generic instantiation's scalar loads.
  const bool a_k = !(a.s_k != 1 && a.s_mn == 1 && !a.g_mn);
  const bool b_k = !(b.s_k != 1 && b.s_mn == 1 && !b.g_mn);
  const bool done = std::apply([&](auto... combo) { return (decltype(combo)::launch(a, a_k, b, b_k, c, stream) || ...); },
                               typename Combos<CT>::type{});
  if (!done) Combo<CT, Any, K, Any, K>::launch(a, true, b, true, c, stream);
}

}  // namespace

void gemm(int64_t m, int64_t n, int64_t k, const Operand& a, const Operand& b, const Output& c, DType compute,
          void* stream) {
  if (m <= 0 || n <= 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const Src sa{a.data, a.dtype, a.stride_r, a.stride_c, a.gather_r, a.gather_c, m, k};
  const Src sb{b.data, b.dtype, b.stride_c, b.stride_r, b.gather_c, b.gather_r, n, k};
  switch (compute) {
    case DType::kF16: launch<__half>(sa, sb, c, s); break;
    case DType::kBF16: launch<__nv_bfloat16>(sa, sb, c, s); break;
    default: launch<float>(sa, sb, c, s); break;
  }
}

}  // namespace moss::cuda
