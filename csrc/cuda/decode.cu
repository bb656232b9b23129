// Decode step: one block per sequence (one token each), graph-capturable (no host sync).
// Text rows: h = A_t x, out += scale * B_t h. Image rows: all k*k taps of x against the conv
// weight read in its own (r, d_in, k, k) layout (a warp per output channel, lanes reading k*k
// consecutive elements: coalesced, taps in registers), then the ring update of reference.decode_step
// (thread c owns channel c of every slot: no races), then out += scale * B_i z.
// Batch rows are few and the work is GEMV-shaped, so no tensor cores here.
#include "common.cuh"

namespace moss::cuda {
namespace {

constexpr int THREADS = 256, WARPS = THREADS / 32;

// dst[tap * n_out + o] = sum_i x[i] * w[o, i * KK + tap], a warp per output row o.
template <typename T, int KK>
__device__ void taps_gemv(const T* __restrict__ x, const T* __restrict__ w, int64_t d_in, int64_t n_out,
                          float* __restrict__ dst) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t o = warp; o < n_out; o += WARPS) {
    const T* row = w + o * d_in * KK;
    float acc[KK];
#pragma unroll
    for (int t = 0; t < KK; ++t) acc[t] = 0.0f;
    for (int64_t i = lane; i < d_in; i += 32) {
      const float xi = to_float(x[i]);
#pragma unroll
      for (int t = 0; t < KK; ++t) acc[t] = fmaf(xi, to_float(row[i * KK + t]), acc[t]);
    }
#pragma unroll
    for (int t = 0; t < KK; ++t) {
      const float s = warp_sum(acc[t]);
      if (lane == 0) dst[t * n_out + o] = s;
    }
  }
}

// out[o] = round(out[o] + scale * sum_c w[o, c] * v[c]), a warp per output o.
template <typename T>
__device__ void up_add(const float* __restrict__ v, const T* __restrict__ w, int64_t r, int64_t d_out, float scale,
                       T* __restrict__ out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t o = warp; o < d_out; o += WARPS) {
    float acc = 0.0f;
    for (int64_t c = lane; c < r; c += 32) acc = fmaf(v[c], to_float(w[o * r + c]), acc);
    acc = warp_sum(acc);
    if (lane == 0) out[o] = from_float<T>(to_float(out[o]) + scale * acc);
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(THREADS) decode_kernel(DecodeArgs a) {
  constexpr int KK = K * K;
  MOSS_DYNAMIC_SHARED(float, smem, 16);  // taps (KK * r) then z (r); text rows reuse it for h (r_text)
  const int64_t b = blockIdx.x;
  const T* x = static_cast<const T*>(a.x) + b * a.ldx;
  T* out = static_cast<T*>(a.out) + b * a.d_out;
  const int64_t p = a.image_pos[b];
  if (p < 0) {
    if (a.text_a == nullptr) return;
    taps_gemv<T, 1>(x, static_cast<const T*>(a.text_a), a.d_in, a.r_text, smem);
    __syncthreads();
    up_add<T>(smem, static_cast<const T*>(a.text_b), a.r_text, a.d_out, a.scale, out);
    return;
  }
  if (a.image_weight == nullptr) return;
  const int64_t r = a.r, H = a.height[b], W = a.width[b];
  // Never index past the ring (overflow-free forms of p < H * W and (k-1)(W+1) <= capacity).
  if (W <= 0 || H <= 0 || p / W >= H || (K > 1 && W > a.capacity / (K > 1 ? K - 1 : 1) - 1)) return;
  float* taps = smem;
  float* z = smem + KK * r;
  taps_gemv<T, KK>(x, static_cast<const T*>(a.image_weight), a.d_in, r, taps);
  __syncthreads();
  float* ring = a.pending + b * a.capacity * r;
  const int64_t own = decode_own_slot(K, p, W);
  for (int64_t c = threadIdx.x; c < r; c += THREADS) {
    float v = taps[(KK - 1) * r + c];
    if (own >= 0) {
      if (p > 0) v += ring[own * r + c];  // token 0: the slot may hold an earlier image's leftovers
      ring[own * r + c] = 0.0f;
#pragma unroll
      for (int tap = 0; tap < KK - 1; ++tap) {
        const int64_t slot = decode_target_slot(K, tap, p, H, W);
        if (slot < 0) continue;
        const float t = taps[tap * r + c];
        ring[slot * r + c] = decode_first_writer(K, tap, p, W) ? t : ring[slot * r + c] + t;
      }
    }
    z[c] = v;
  }
  __syncthreads();
  up_add<T>(z, static_cast<const T*>(a.image_b), r, a.d_out, a.scale, out);
}

template <typename T, int K>
void launch(const DecodeArgs& a, cudaStream_t stream) {
  const int64_t floats = std::max<int64_t>(K * K * a.r + a.r, a.r_text);
  MOSS_LAUNCH(static_cast<unsigned>(a.batch), THREADS, floats * sizeof(float), stream, decode_kernel<T, K>)(a);
}

template <typename T>
void launch_k(const DecodeArgs& a, cudaStream_t stream) {
  switch (a.k) {
    case 1: return launch<T, 1>(a, stream);
    case 2: return launch<T, 2>(a, stream);
    case 3: return launch<T, 3>(a, stream);
    default: return launch<T, 4>(a, stream);
  }
}

}  // namespace

void decode_step(const DecodeArgs& a, void* stream) {
  if (a.batch <= 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::kF16: return launch_k<__half>(a, s);
    case DType::kBF16: return launch_k<__nv_bfloat16>(a, s);
    default: return launch_k<float>(a, s);
  }
}

}  // namespace moss::cuda
