// The one-pass fused forward (issue 4): ONE launch for both modalities. Block b < text_tiles takes
// the 64-row tile b of the text rows, the others a tile of the image rows. Per block:
//   down: for each 64-wide chunk of the rank, an implicit GEMM over (taps x d_in): A-tile row i of
//         tap t is x[rows[sources[i, t]]] (zeros where the source is -1: the conv's top/left
//         padding is a mask, never a padded copy), B the tap's rows of the stacked weights, read
//         transposed; fp32 accumulation over all taps;
//   z:    the fp32 result goes to global (text_h / image_z, saved for the backward) and into a
//         BM x r shared-memory panel rounded to the compute type (as the split path rounds z when
//         it enters the tensor-core up-GEMM; fp32 stays fp32);
//   up:   for each 64-wide chunk of d_out, acc = panel B^T, then out[rows[i], j] += scale * acc in
//         place, rounded once (tile::store_tile, the split GEMM's own epilogue).
// The tiles, loaders (16-byte cp.async, double-buffered k loop) and tile math are tile_gemm.cuh's
// (wmma for fp16/bf16, exact fp32 FMA for fp32); x is in the compute type.
// Each output element is written by exactly one block: deterministic, no atomics.
#include <algorithm>
#include <mutex>
#include <unordered_map>

#include "tile_gemm.cuh"

namespace moss::cuda {
namespace {

template <typename CT>
using FusedShape = tile::Shape<CT, 64, 2>;  // 64 rows, 4 warps
constexpr int BM = 64, BN = 64, THREADS = 128;
static_assert(FusedShape<float>::BM == BM && FusedShape<__half>::THREADS == THREADS && FusedShape<float>::BN == BN,
              "one shape for every compute type");
static_assert(BM == kFusedRowsPerBlock, "moss_cuda.h promises the dispatch this tile height");

__host__ __device__ __forceinline__ int64_t round_up(int64_t v, int64_t m) { return ceil_div(v, m) * m; }

template <typename CT>
using FusedSmem = tile::Smem<CT, FusedShape<CT>, true, true>;

// Shared memory layout: tile region | source row of each tile row (BM int64) | z panel BM x ldp.
// The tile region keeps the footprint of the single-buffered 64 x 32 slabs it replaced (the
// double-buffered stages of FusedSmem fit in it), so the ranks the fused path takes and the limits
// the dispatch and its tests rely on stay as they were. The panel is as wide as the rank rounded
// up to BN (zeros past r), plus PAD (wmma's ldm rule).
template <typename CT>
constexpr int64_t tiles_bytes() {
  return (BM * (32 + tile::PAD) + 32 * (BN + tile::PAD)) * static_cast<int64_t>(sizeof(CT)) +
         BM * (BN + tile::PAD_C) * static_cast<int64_t>(sizeof(float));
}
static_assert(static_cast<int64_t>(sizeof(FusedSmem<float>)) <= tiles_bytes<float>() &&
                  static_cast<int64_t>(sizeof(FusedSmem<__half>)) <= tiles_bytes<__half>(),
              "the stages fit the tile region");
template <typename CT>
constexpr int64_t panel_offset() {
  return tiles_bytes<CT>() + BM * static_cast<int64_t>(sizeof(int64_t));
}
template <typename CT>
int64_t smem_bytes(int64_t r_max) {
  return panel_offset<CT>() + BM * (round_up(r_max, BN) + tile::PAD) * static_cast<int64_t>(sizeof(CT));
}

// VEC: the weights are in the compute type and every row of x and of the weights starts 16-byte
// aligned, so the tiles load as 16-byte vectors (cp.async); else the scalar instantiation (x in
// the compute type, the weights' dtype read per slab: fp32 compute takes half weights), chosen
// once per launch.
template <typename CT, bool VEC>
__global__ void __launch_bounds__(THREADS) fused_forward_kernel(FusedForwardArgs a, int64_t text_tiles) {
  using Sh = FusedShape<CT>;
  using SX = std::conditional_t<VEC, CT, tile::Scalar<CT>>;  // x is in the compute type
  // fp32 compute may take half weights (the dtype read per slab); half compute has them in CT
  using SW = std::conditional_t<VEC, CT, std::conditional_t<std::is_same_v<CT, float>, tile::Any, tile::Scalar<CT>>>;
  MOSS_DYNAMIC_SHARED(unsigned char, smem, 128);
  auto& sm = *reinterpret_cast<FusedSmem<CT>*>(smem);
  auto* src_row = reinterpret_cast<int64_t*>(smem + tiles_bytes<CT>());
  CT* panel = reinterpret_cast<CT*>(smem + panel_offset<CT>());

  // Pick the modality field by field: a reference to a.text or a.image chosen at run time would
  // make the compiler copy the parameter struct to local memory.
  const bool text = static_cast<int64_t>(blockIdx.x) < text_tiles;
  const int64_t* rows = text ? a.text.rows : a.image.rows;
  const int64_t n = text ? a.text.n : a.image.n;
  const int64_t* sources = text ? a.text.sources : a.image.sources;
  const int64_t kk = text ? a.text.kk : a.image.kk;
  const void* down = text ? a.text.down : a.image.down;
  const DType down_dtype = text ? a.text.down_dtype : a.image.down_dtype;
  const void* up = text ? a.text.up : a.image.up;
  const DType up_dtype = text ? a.text.up_dtype : a.image.up_dtype;
  const int64_t r = text ? a.text.r : a.image.r;
  float* z = text ? a.text.z : a.image.z;
  const int64_t m0 = (text ? static_cast<int64_t>(blockIdx.x) : static_cast<int64_t>(blockIdx.x) - text_tiles) * BM;
  const int ldp = static_cast<int>(round_up(r, BN)) + tile::PAD;
  const int64_t d_in = a.d_in;

  tile::TileMath<CT, Sh> math;
  tile::Loader<CT, SX, BM, Sh::BK, true, THREADS> lx;
  tile::Loader<CT, SW, BN, Sh::BK, true, THREADS> lw;
  // x rows through the source-row table (mn_ext: the table covers the tile's BM rows)
  const tile::Src xs{a.x, a.compute, a.ldx, 1, nullptr, nullptr, m0 + BM, d_in};
  // ---- down: z[m0 : m0 + BM, c0 : c0 + BN] = sum over taps t of x[src(i, t)] down[t * r + c0 + j]^T
  for (int64_t c0 = 0; c0 < r; c0 += BN) {
    math.zero();
    for (int64_t t = 0; t < kk; ++t) {
      // The x row each tile row reads for this tap (-1: padding or past the last row), looked up
      // once per tap instead of once per loaded element.
      if (threadIdx.x < BM) {
        const int64_t gi = m0 + threadIdx.x;
        int64_t src = -1;
        if (gi < n) {
          const int64_t s = sources ? sources[gi * kk + t] : gi;
          src = s >= 0 ? rows[s] : -1;
        }
        src_row[threadIdx.x] = src;
      }
      __syncthreads();
      lx.setup_rows(xs, m0, [&](int64_t gi) { return src_row[gi - m0]; });
      // B(p, j) = down[(t * r + c0 + j) * d_in + p]: the tap's rows, k-contiguous; they stop at the
      // tap's last rank row (t + 1) * r.
      lw.setup(tile::Src{down, down_dtype, d_in, 1, nullptr, nullptr, (t + 1) * r, d_in}, t * r + c0);
      tile::mainloop<Sh>(math, lx, lw, sm, d_in, tile::StageSlab{});
    }
    math.spill(sm.c);
    __syncthreads();
    for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
      const int i = e / BN, j = e % BN;
      const int64_t gi = m0 + i, gj = c0 + j;
      const float v = sm.c[i][j];
      // zeros past r: the up-GEMM's last k slab may read them (0 * weight, never 0 * garbage)
      panel[i * ldp + c0 + j] = from_float<CT>(gj < r ? v : 0.0f);
      if (gi < n && gj < r) z[gi * r + gj] = v;
    }
    __syncthreads();
  }
  // ---- up: out[rows[m0 + i], n0 + j] += scale * (panel up^T)[i, j], rounded once
  const Output o{a.out, a.out_dtype, a.ld_out, rows, true, a.scale};
  tile::NoLoad none;
  for (int64_t n0 = 0; n0 < a.d_out; n0 += BN) {
    math.zero();
    // B(p, j) = up[(n0 + j) * r + p] (up's rows, k-contiguous)
    lw.setup(tile::Src{up, up_dtype, r, 1, nullptr, nullptr, a.d_out, r}, n0);
    // The panel's address from `smem` itself (not the captured `panel`), so that nvcc keeps the
    // shared-memory address space (wmma's LDSM, not generic loads).
    tile::mainloop<Sh>(math, none, lw, sm, r, [&](int64_t s, const auto&) {
      return tile::RowPanel<CT>{reinterpret_cast<const CT*>(smem + panel_offset<CT>()) + s * Sh::BK, ldp};
    });
    math.spill(sm.c);
    __syncthreads();
    tile::store_tile<BM, BN>(sm.c, o, m0, n0, n, a.d_out, THREADS);
    __syncthreads();
  }
}

int64_t tiles_of(const FusedModality& m) { return m.n > 0 && m.r > 0 ? ceil_div(m.n, BM) : 0; }

int64_t rank_of(const FusedModality& m) { return tiles_of(m) > 0 ? m.r : 0; }

// Raises the kernel's dynamic shared memory limit to `bytes` on `device`, calling the runtime only
// when a larger size than any granted before is asked for (not on every launch: a host call on the
// forward's hot path). The attribute belongs to the function on the current device: both
// instantiations (vector and scalar loads) get it.
template <typename CT>
bool grant_smem(int device, int64_t bytes) {
  static std::mutex mutex;
  static std::unordered_map<int, int64_t> granted;  // device -> largest size granted so far
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = granted.find(device);
  if (it != granted.end() && it->second >= bytes) return true;
  if (cudaFuncSetAttribute(fused_forward_kernel<CT, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes)) != cudaSuccess ||
      cudaFuncSetAttribute(fused_forward_kernel<CT, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes)) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the split path runs instead
    return false;
  }
  granted[device] = bytes;
  return true;
}

template <typename CT>
bool launch(const FusedForwardArgs& a, cudaStream_t stream, const char** why) {
  const int64_t text_tiles = tiles_of(a.text), blocks = text_tiles + tiles_of(a.image);
  const auto other_dtype = [&](const FusedModality& m) {
    return tiles_of(m) > 0 && (m.down_dtype != a.compute || m.up_dtype != a.compute);
  };
  if (!std::is_same_v<CT, float> && (other_dtype(a.text) || other_dtype(a.image))) {
    if (why) *why = "half compute needs the weights in x's dtype";
    return false;
  }
  const int64_t bytes = smem_bytes<CT>(std::max(rank_of(a.text), rank_of(a.image)));
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    if (why) *why = "the device's shared memory limit could not be queried";
    return false;
  }
  if (bytes > kFusedSmemLimit || bytes > optin) {
    if (why) *why = "the rank needs more shared memory than a block gets (fp32 takes ranks up to 448)";
    return false;
  }
  if (blocks > 0x7fffffff) {
    if (why) *why = "too many row tiles for one grid";
    return false;
  }
  if (!grant_smem<CT>(device, bytes)) {
    if (why) *why = "cudaFuncSetAttribute refused the shared memory size";
    return false;
  }
  // 16-byte vectors where the weights are in the compute type and every row of x and of the
  // weights starts 16-byte aligned; else scalar loads (the weights' dtype read per slab).
  const auto fits = [](const void* p, int64_t ld) {
    return tile::vectors_fit<CT>(tile::Src{p, DType::kF32, ld, 1, nullptr, nullptr, 0, 0}, true);
  };
  const auto modality_fits = [&](const FusedModality& m) {
    return tiles_of(m) == 0 || (m.down_dtype == a.compute && m.up_dtype == a.compute && fits(m.down, a.d_in) &&
                                fits(m.up, m.r));
  };
  if (fits(a.x, a.ldx) && modality_fits(a.text) && modality_fits(a.image))
    MOSS_LAUNCH(static_cast<unsigned>(blocks), THREADS, static_cast<size_t>(bytes), stream,
                fused_forward_kernel<CT, true>)(a, text_tiles);
  else
    MOSS_LAUNCH(static_cast<unsigned>(blocks), THREADS, static_cast<size_t>(bytes), stream,
                fused_forward_kernel<CT, false>)(a, text_tiles);
  return true;
}

}  // namespace

int64_t fused_forward_smem_bytes(const FusedForwardArgs& args) {
  if (tiles_of(args.text) + tiles_of(args.image) == 0) return 0;
  const int64_t r = std::max(rank_of(args.text), rank_of(args.image));
  switch (args.compute) {
    case DType::kF16: return smem_bytes<__half>(r);
    case DType::kBF16: return smem_bytes<__nv_bfloat16>(r);
    default: return smem_bytes<float>(r);
  }
}

bool fused_forward(const FusedForwardArgs& args, void* stream, const char** why) {
  if (tiles_of(args.text) + tiles_of(args.image) == 0) return true;  // nothing to do
  if (rank_of(args.text) > kMaxFusedRank || rank_of(args.image) > kMaxFusedRank) {
    if (why) *why = "a rank is above 512";
    return false;
  }
  auto s = static_cast<cudaStream_t>(stream);
  switch (args.compute) {
    case DType::kF16: return launch<__half>(args, s, why);
    case DType::kBF16: return launch<__nv_bfloat16>(args, s, why);
    default: return launch<float>(args, s, why);
  }
}

}  // namespace moss::cuda
