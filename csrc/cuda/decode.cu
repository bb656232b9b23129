// Decode step (reference.decode_step), weight-stationary (the BGMV idea): every weight byte is read
// from memory once per step, by one block, for every row of the batch. Three stream-ordered
// launches, no host synchronisation, no host reads of device data (graph-capturable):
//   1. decode_down_kernel: block = (modality, 16 rank rows, one d_in slice). The weights are read IN
//      PLACE: text_a (r_t, d_in) and the conv weight (r, d_in, k, k) viewed as (r, d_in * k * k) are
//      contiguous along the reduction, so a warp streams two rows of its slice with 16-byte loads
//      (when the rows are 16-byte aligned; scalar loads otherwise), holds them in registers,
//      deinterleaves the k*k taps of each input in registers (the taps of a chunk sit at
//      compile-time positions) and runs every row of the batch of its modality over them (image
//      rows: image_pos >= 0 and passing the position/capacity guard; text rows: image_pos < 0).
//      The sums of each d_in slice go to an fp32 workspace. No stacked or prepared copy of any
//      weight exists: nothing to invalidate when an optimizer changes the weights, nothing to
//      refresh under a captured graph.
//   2. decode_reduce_kernel: thread (row b, channel c) adds the slices' partial sums in slice order
//      (fixed: bit-identical across runs, and independent of the rest of the batch: the split
//      depends on the shapes and the device's SM count only), then runs the ring update of
//      reference.decode_step for its channel (moss_index.h decode_* helpers) and writes z (fp32).
//   3. decode_up_kernel: block = (modality, 16 rows of B), out[b] += scale * B z[b] for every row of
//      its modality, B's rows (contiguous along r) read once with 16-byte loads, rounded once.
// The d_in split is chosen so that each modality's weights spread over at least as many blocks as
// the GPU has SMs (queried once per device and cached). tests/test_cuda_decode_static.py holds the
// cost model of this split and checks the 16-byte loads in the compiled SASS.
#include <algorithm>
#include <atomic>

#include "common.cuh"

namespace moss::cuda {
namespace {

constexpr int THREADS = 256, WARPS = THREADS / 32;
constexpr int ROWS_PER_WARP = 2;                          // weight rows a warp holds in registers
constexpr int64_t ROWS_PER_BLOCK = WARPS * ROWS_PER_WARP;  // rank rows (down) or out rows (up) per block
constexpr int ACC_FLOATS = 1024;                          // per warp: shared sums of a group of batch rows
// The down and up kernels' shared sums, as dynamic shared memory (under the 48 KB that needs no
// attribute): the SIMT harness poisons dynamic shared memory before every block, but g++ drops the
// section attribute it gives a template's static __shared__ (see gemm.cu).
constexpr int kAccBytes = WARPS * ACC_FLOATS * static_cast<int>(sizeof(float));

constexpr int gcd_of(int a, int b) { return b == 0 ? a : gcd_of(b, a % b); }

// How a warp cuts a row of KK-interleaved elements: a chunk is C consecutive elements holding G
// whole inputs (all KK taps each), loaded as C / V 16-byte vectors (VEC) or C scalars; a lane holds
// NJ chunks of each of its rows per pass (about 32 floats per row in registers).
template <typename T, int KK, bool VEC>
struct Chunking {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));
  static constexpr int C = VEC ? V / gcd_of(V, KK) * KK : KK;  // lcm(V, KK) when vectorised
  static constexpr int G = C / KK;
  static constexpr int NJ = C >= 32 ? 1 : (32 / C > 8 ? 8 : 32 / C);
};

// 16 bytes of T, loaded as one vector.
template <typename T>
struct __align__(16) Pack {
  T v[16 / sizeof(T)];
};

// The C elements of one chunk, as fp32 (16-byte loads when VEC: the caller checked the alignment).
template <typename T, int C, bool VEC>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, float (&dst)[C]) {
  if constexpr (VEC) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int v = 0; v < C / V; ++v) {
      const Pack<T> pk = reinterpret_cast<const Pack<T>*>(p)[v];
#pragma unroll
      for (int e = 0; e < V; ++e) dst[v * V + e] = to_float(pk.v[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < C; ++e) dst[e] = to_float(p[e]);
  }
}

constexpr int pow2_ceil(int n) { return n <= 1 ? 1 : 2 * pow2_ceil((n + 1) / 2); }

// Warp sums of N (a power of two <= 32) values at once, a transposing butterfly: at each step a lane
// keeps half of its values and trades the other half with its partner, so N sums take
// N - 1 + log2(32 / N) shuffles instead of 5 N. Afterwards v[0] of lane l is the sum of value
// sum_index<N>(l) over the warp (lanes that differ only below bit log2(32 / N) hold the same sum).
template <int N, int OFF = 16>
__device__ __forceinline__ void transpose_sum(float* v, int lane) {
  if constexpr (OFF > 0) {
    if constexpr (N > 1) {
      constexpr int H = N / 2;
      const bool upper = (lane & OFF) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const float send = upper ? v[i] : v[i + H];
        const float keep = upper ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
      }
      transpose_sum<H, OFF / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], OFF);
      transpose_sum<1, OFF / 2>(v, lane);
    }
  }
}

// Which of the N sums lane `lane` holds after transpose_sum<N>: the upper half at every step it
// took the upper lane's side.
template <int N>
__device__ __forceinline__ int sum_index(int lane) {
  int idx = 0;
#pragma unroll
  for (int h = N / 2, off = 16; h >= 1; h /= 2, off /= 2)
    if (lane & off) idx += h;
  return idx;
}

// One warp's share of a weight-stationary GEMV over a batch: rows [row0, row0 + ROWS_PER_WARP) of w
// (row stride ld elements; input i of a row holds its KK taps at [i * KK, (i + 1) * KK)) over the
// chunks [q0, q1) of the reduction, against row b of x (x + b * ldx, inputs contiguous) for every b
// with active(b). The weights of a pass stay in registers while a group of up to 64 batch rows
// (fewer where KK is large: ACC_FLOATS / (ROWS_PER_WARP * KK)) runs over them; the
// ROWS_PER_WARP * KK sums of a row b are reduced over the warp together (transpose_sum), and those
// of a group of batch rows gather in this warp's shared `acc`, each slot written and read by the one
// lane that owns that sum; emit(b, row, tap, sum) is called once per active row and sum when the
// slice is done.
template <typename TW, typename TX, int KK, bool VEC, typename Active, typename Emit>
__device__ void warp_rows_dot(const TW* __restrict__ w, int64_t ld, int64_t n_rows, int64_t row0, int64_t q0,
                              int64_t q1, const TX* __restrict__ x, int64_t ldx, int64_t batch, Active active,
                              Emit emit, float* acc) {
  using CK = Chunking<TW, KK, VEC>;
  constexpr int C = CK::C, G = CK::G, NJ = CK::NJ, R = ROWS_PER_WARP, N = R * KK, NP = pow2_ceil(N);
  static_assert(NP <= 32, "a warp reduces at most 32 sums at once");
  constexpr int64_t GROUP = ACC_FLOATS / N < 64 ? ACC_FLOATS / N : 64;  // batch rows per group (a bit mask)
  const int lane = threadIdx.x % 32;
  const int mine = sum_index<NP>(lane);  // the sum (row mine / KK, tap mine % KK) this lane ends with
  const bool owner = lane % (32 / NP) == 0 && mine < N;
  for (int64_t g0 = 0; g0 < batch; g0 += GROUP) {
    const int64_t g1 = batch - g0 < GROUP ? batch : g0 + GROUP;
    uint64_t rows = 0;  // the group's active rows, decided once (not once per pass)
    for (int64_t b = g0; b < g1; ++b)
      if (active(b)) rows |= uint64_t{1} << (b - g0);
    int64_t qp = q0;
    do {  // at least one pass: an empty slice emits zeros
      float wr[R][NJ][C];
#pragma unroll
      for (int rr = 0; rr < R; ++rr)
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          const int64_t q = qp + lane + 32 * j, row = row0 + rr;
          if (q < q1 && row < n_rows) {
            load_chunk<TW, C, VEC>(w + row * ld + q * C, wr[rr][j]);
          } else {
#pragma unroll
            for (int e = 0; e < C; ++e) wr[rr][j][e] = 0.0f;
          }
        }
      for (int64_t b = g0; b < g1; ++b) {
        if (!((rows >> (b - g0)) & 1)) continue;  // uniform across the warp
        float s[NP];  // s[rr * KK + t]; padded to a power of two with zeros
#pragma unroll
        for (int i = 0; i < NP; ++i) s[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          const int64_t q = qp + lane + 32 * j;
          if (q >= q1) continue;
          float xv[G];
#pragma unroll
          for (int u = 0; u < G; ++u) xv[u] = to_float(x[b * ldx + q * G + u]);
#pragma unroll
          for (int rr = 0; rr < R; ++rr)
#pragma unroll
            for (int e = 0; e < C; ++e)
              s[rr * KK + e % KK] = fmaf(xv[e / KK], wr[rr][j][e], s[rr * KK + e % KK]);
        }
        transpose_sum<NP>(s, lane);
        if (owner) {
          float& slot = acc[(b - g0) * N + mine];
          slot = qp == q0 ? s[0] : slot + s[0];
        }
      }
      qp += 32 * NJ;
    } while (qp < q1);
    if (owner && row0 + mine / KK < n_rows)
      for (int64_t b = g0; b < g1; ++b)
        if ((rows >> (b - g0)) & 1) emit(b, row0 + mine / KK, mine % KK, acc[(b - g0) * N + mine]);
  }
}

// The split of one modality's down-projection: `rows` rank rows in tiles of ROWS_PER_BLOCK, the
// reduction in `chunks` chunks cut into `slices` slices of `per` chunks; block = tile * slices + slice.
struct DownSplit {
  int64_t rows, chunks, slices, per, blocks;
};

// What the three launches need beyond DecodeArgs (computed on the host from the shapes, the
// alignment and the SM count; never from device data). Workspace offsets in floats.
struct DecodePlan {
  DownSplit text, image;
  bool vec_down, vec_up;
  int64_t up_text_blocks, up_image_blocks;
  int64_t text_part, image_part, z, rz, flags, floats;
};

// A row of the batch takes the image adapter: an image token inside its image whose ring fits the
// state (overflow-free forms of p < H * W and (k-1)(W+1) <= capacity); other image rows are left
// untouched, as in reference.decode_step.
template <int K>
__device__ __forceinline__ bool image_row(const DecodeArgs& a, int64_t b) {
  const int64_t p = a.image_pos[b];
  if (p < 0) return false;
  const int64_t H = a.height[b], W = a.width[b];
  return W > 0 && H > 0 && p / W < H && (K == 1 || W <= a.capacity / (K > 1 ? K - 1 : 1) - 1);
}

template <typename T, int K, bool VEC>
__global__ void __launch_bounds__(THREADS, 1) decode_down_kernel(DecodeArgs a, DecodePlan p) {
  constexpr int KK = K * K;
  MOSS_DYNAMIC_SHARED(float, acc, 16);  // WARPS * ACC_FLOATS floats (kAccBytes)
  const int warp = threadIdx.x / 32;
  int64_t blk = blockIdx.x;
  const bool image = blk >= p.text.blocks;
  if (image) blk -= p.text.blocks;
  const DownSplit& d = image ? p.image : p.text;
  const int64_t tile = blk / d.slices, slice = blk % d.slices;
  const int64_t row0 = tile * ROWS_PER_BLOCK + warp * ROWS_PER_WARP;
  if (row0 >= d.rows) return;  // warps are independent: no block barrier anywhere
  const int64_t q0 = slice * d.per, q1 = q0 + d.per < d.chunks ? q0 + d.per : d.chunks;
  const T* x = static_cast<const T*>(a.x);
  float* ws = a.workspace;
  if (image) {
    float* part = ws + p.image_part;
    const auto emit = [&](int64_t b, int64_t c, int t, float v) {
      part[((slice * a.batch + b) * KK + t) * a.r + c] = v;
    };
    warp_rows_dot<T, T, KK, VEC>(static_cast<const T*>(a.image_weight), a.d_in * KK, a.r, row0, q0, q1, x, a.ldx,
                                 a.batch, [&](int64_t b) { return image_row<K>(a, b); }, emit,
                                 acc + warp * ACC_FLOATS);
  } else {
    float* part = ws + p.text_part;
    const auto emit = [&](int64_t b, int64_t c, int, float v) { part[(slice * a.batch + b) * a.r_text + c] = v; };
    warp_rows_dot<T, T, 1, VEC>(static_cast<const T*>(a.text_a), a.d_in, a.r_text, row0, q0, q1, x, a.ldx, a.batch,
                                [&](int64_t b) { return a.image_pos[b] < 0; }, emit, acc + warp * ACC_FLOATS);
  }
}

// Thread (b, c): the slices' sums in slice order, then (image rows) the ring update of
// reference.decode_step for channel c (the thread owns channel c of every slot of row b: no races).
template <int K>
__global__ void __launch_bounds__(THREADS) decode_reduce_kernel(DecodeArgs a, DecodePlan p) {
  constexpr int KK = K * K;
  const int64_t per_row = ceil_div(p.rz, THREADS);
  const int64_t b = blockIdx.x / per_row, c = (blockIdx.x % per_row) * THREADS + threadIdx.x;
  const float* ws = a.workspace;
  float* z = a.workspace + p.z + b * p.rz;
  const bool text_row = a.image_pos[b] < 0;
  const bool taken = text_row ? p.text.blocks > 0 : p.image.blocks > 0 && image_row<K>(a, b);
  if (c == 0) a.workspace[p.flags + b] = taken ? 1.0f : 0.0f;  // which rows decode_up_kernel adds to
  if (!taken) return;
  if (text_row) {
    if (c >= a.r_text) return;
    const float* part = ws + p.text_part;
    float h = 0.0f;
    for (int64_t s = 0; s < p.text.slices; ++s) h += part[(s * a.batch + b) * a.r_text + c];
    z[c] = h;
    return;
  }
  if (c >= a.r) return;
  const int64_t r = a.r, pos = a.image_pos[b], H = a.height[b], W = a.width[b];
  const float* part = ws + p.image_part;
  float taps[KK];
#pragma unroll
  for (int t = 0; t < KK; ++t) taps[t] = 0.0f;
  for (int64_t s = 0; s < p.image.slices; ++s)
#pragma unroll
    for (int t = 0; t < KK; ++t) taps[t] += part[((s * a.batch + b) * KK + t) * r + c];
  float v = taps[KK - 1];
  float* ring = a.pending + b * a.capacity * r;
  const int64_t own = decode_own_slot(K, pos, W);
  if (own >= 0) {
    if (pos > 0) v += ring[own * r + c];  // token 0: the slot may hold an earlier image's leftovers
    ring[own * r + c] = 0.0f;
#pragma unroll
    for (int tap = 0; tap < KK - 1; ++tap) {
      const int64_t slot = decode_target_slot(K, tap, pos, H, W);
      if (slot < 0) continue;
      ring[slot * r + c] = decode_first_writer(K, tap, pos, W) ? taps[tap] : ring[slot * r + c] + taps[tap];
    }
  }
  z[c] = v;
}

// out[b, o] = round(out[b, o] + scale * B[o, :] z[b]) for rows o of this block and every row b of
// its modality that decode_reduce_kernel took.
template <typename T, bool VEC>
__global__ void __launch_bounds__(THREADS, 1) decode_up_kernel(DecodeArgs a, DecodePlan p) {
  MOSS_DYNAMIC_SHARED(float, acc, 16);  // WARPS * ACC_FLOATS floats (kAccBytes)
  const int warp = threadIdx.x / 32;
  int64_t blk = blockIdx.x;
  const bool image = blk >= p.up_text_blocks;
  if (image) blk -= p.up_text_blocks;
  const int64_t row0 = blk * ROWS_PER_BLOCK + warp * ROWS_PER_WARP;
  if (row0 >= a.d_out) return;
  const int64_t r = image ? a.r : a.r_text;
  const int64_t chunks = VEC ? r / Chunking<T, 1, VEC>::G : r;
  const T* w = static_cast<const T*>(image ? a.image_b : a.text_b);
  T* out = static_cast<T*>(a.out);
  const auto emit = [&](int64_t b, int64_t o, int, float v) {
    out[b * a.d_out + o] = from_float<T>(to_float(out[b * a.d_out + o]) + a.scale * v);
  };
  const float* flags = a.workspace + p.flags;
  const auto active = [&](int64_t b) { return (a.image_pos[b] >= 0) == image && flags[b] != 0.0f; };
  warp_rows_dot<T, float, 1, VEC>(w, r, a.d_out, row0, 0, chunks, a.workspace + p.z, p.rz, a.batch, active, emit,
                                  acc + warp * ACC_FLOATS);
}

// SMs of the current device, queried once per device and cached (not a stream operation: legal
// while a graph is being captured, and never repeated after the first step).
int64_t sm_count() {
  constexpr int kDevices = 64;
  static std::atomic<int> cached[kDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices) {
    (void)cudaGetLastError();
    return 1;
  }
  int n = cached[device].load(std::memory_order_relaxed);
  if (n > 0) return n;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = 1;
  }
  cached[device].store(n, std::memory_order_relaxed);
  return n;
}

// Rows of `elems` elements of T at `p` (null: absent) that 16-byte vectors can read.
template <typename T>
bool rows_aligned(const void* p, int64_t elems) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (elems * static_cast<int64_t>(sizeof(T))) % 16 == 0);
}

// Spreads `rows` weight rows x `inputs` reduction inputs over at least `sms` blocks: tiles of
// ROWS_PER_BLOCK rows, and as many d_in slices as it takes (never slices of fewer than 32 chunks,
// so that every lane of a pass has work, and never more than needed: each slice's partial sums
// cost workspace traffic).
DownSplit down_split(int64_t rows, int64_t inputs, int64_t per_chunk, int64_t sms) {
  DownSplit d{rows, per_chunk > 0 ? inputs / per_chunk : 0, 1, 0, 0};
  if (rows <= 0) return DownSplit{0, 0, 1, 0, 0};
  const int64_t tiles = ceil_div(rows, ROWS_PER_BLOCK);
  const int64_t most = d.chunks > 32 ? ceil_div(d.chunks, 32) : 1;
  d.slices = std::min(std::max<int64_t>(ceil_div(sms, tiles), 1), most);
  d.per = std::max<int64_t>(ceil_div(d.chunks, d.slices), 1);
  d.slices = std::max<int64_t>(ceil_div(d.chunks, d.per), 1);
  d.blocks = tiles * d.slices;
  return d;
}

template <typename T, int K, bool VEC>
DecodePlan plan_with(const DecodeArgs& a, int64_t sms) {
  DecodePlan p{};
  p.vec_down = VEC;
  const bool text = a.text_a != nullptr && a.r_text > 0, image = a.image_weight != nullptr && a.r > 0;
  p.text = down_split(text ? a.r_text : 0, a.d_in, Chunking<T, 1, VEC>::G, sms);
  p.image = down_split(image ? a.r : 0, a.d_in, Chunking<T, K * K, VEC>::G, sms);
  p.vec_up = rows_aligned<T>(text ? a.text_b : nullptr, a.r_text) && rows_aligned<T>(image ? a.image_b : nullptr, a.r);
  const int64_t up_blocks = ceil_div(a.d_out, ROWS_PER_BLOCK);
  p.up_text_blocks = text && a.d_out > 0 ? up_blocks : 0;
  p.up_image_blocks = image && a.d_out > 0 ? up_blocks : 0;
  p.rz = ceil_div(std::max(text ? a.r_text : 0, image ? a.r : 0), 4) * 4;  // 16-byte aligned z rows
  p.text_part = 0;
  p.image_part = p.text_part + (text ? p.text.slices * a.batch * a.r_text : 0);
  p.z = p.image_part + (image ? p.image.slices * a.batch * K * K * a.r : 0);
  p.flags = p.z + a.batch * p.rz;
  p.floats = p.flags + a.batch;
  return p;
}

template <typename T, int K>
DecodePlan plan_of(const DecodeArgs& a) {
  const bool vec = rows_aligned<T>(a.text_a, a.d_in) && rows_aligned<T>(a.image_weight, a.d_in * K * K);
  return vec ? plan_with<T, K, true>(a, sm_count()) : plan_with<T, K, false>(a, sm_count());
}

template <typename T, int K>
void launch(const DecodeArgs& a, cudaStream_t stream) {
  const DecodePlan p = plan_of<T, K>(a);
  const int64_t down = p.text.blocks + p.image.blocks, up = p.up_text_blocks + p.up_image_blocks;
  if (down == 0 || p.rz == 0) return;
  if (p.vec_down)
    MOSS_LAUNCH(static_cast<unsigned>(down), THREADS, kAccBytes, stream, decode_down_kernel<T, K, true>)(a, p);
  else
    MOSS_LAUNCH(static_cast<unsigned>(down), THREADS, kAccBytes, stream, decode_down_kernel<T, K, false>)(a, p);
  MOSS_LAUNCH(static_cast<unsigned>(a.batch * ceil_div(p.rz, THREADS)), THREADS, 0, stream,
              decode_reduce_kernel<K>)(a, p);
  if (up == 0) return;
  if (p.vec_up)
    MOSS_LAUNCH(static_cast<unsigned>(up), THREADS, kAccBytes, stream, decode_up_kernel<T, true>)(a, p);
  else
    MOSS_LAUNCH(static_cast<unsigned>(up), THREADS, kAccBytes, stream, decode_up_kernel<T, false>)(a, p);
}

template <typename T, typename F>
auto with_k(const DecodeArgs& a, F&& f) {
  switch (a.k) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

template <typename F>
auto with_types(const DecodeArgs& a, F&& f) {
  switch (a.dtype) {
    case DType::kF16: return with_k<__half>(a, [&](auto k) { return f(__half{}, k); });
    case DType::kBF16: return with_k<__nv_bfloat16>(a, [&](auto k) { return f(__nv_bfloat16{}, k); });
    default: return with_k<float>(a, [&](auto k) { return f(float{}, k); });
  }
}

}  // namespace

int64_t decode_workspace_floats(const DecodeArgs& a) {
  if (a.batch <= 0) return 0;
  return with_types(a, [&](auto t, auto k) { return plan_of<decltype(t), decltype(k)::value>(a).floats; });
}

void decode_step(const DecodeArgs& a, void* stream) {
  if (a.batch <= 0) return;
  with_types(a, [&](auto t, auto k) { launch<decltype(t), decltype(k)::value>(a, static_cast<cudaStream_t>(stream)); });
}

}  // namespace moss::cuda
