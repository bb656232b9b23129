// The r-wide parts of the rank-space identity: masked shifts (forward z, state writes), state
// reads, and the backward's tap gather. Grid-stride loops over (token, channel), 64-bit indices;
// each output element is written by exactly one thread (no atomics).
#include "common.cuh"

namespace moss::cuda {
namespace {

constexpr int THREADS = 256;

// out[t, c] = sum over taps with src[t, tap] >= 0 of P[src, tap * r + c] (+ keep[t] * old value
// at out_rows[t], when out_rows is given: the state write).
__global__ void __launch_bounds__(THREADS) shift_sum_kernel(const float* __restrict__ P,
                                                            const int64_t* __restrict__ sources, int64_t n,
                                                            int64_t kk, int64_t r, float* __restrict__ out,
                                                            const int64_t* __restrict__ out_rows,
                                                            const bool* __restrict__ keep) {
  const int64_t total = n * r;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / r, c = e % r;
    float sum = 0.0f;
    for (int64_t tap = 0; tap < kk; ++tap) {
      const int64_t s = sources[t * kk + tap];
      if (s >= 0) sum += P[(s * kk + tap) * r + c];
    }
    const int64_t row = out_rows ? out_rows[t] : t;
    if (keep && keep[t]) sum += out[row * r + c];
    out[row * r + c] = sum;
  }
}

__global__ void __launch_bounds__(THREADS) state_read_kernel(float* __restrict__ z, const float* __restrict__ pending,
                                                             const int64_t* __restrict__ tokens,
                                                             const int64_t* __restrict__ slots, int64_t n,
                                                             int64_t r) {
  const int64_t total = n * r;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / r, c = e % r;
    z[tokens[i] * r + c] += pending[slots[i] * r + c];
  }
}

__global__ void __launch_bounds__(THREADS) fill_taps_kernel(float* __restrict__ dP, const int64_t* __restrict__ targets,
                                                            int64_t n, int64_t kk, int64_t r) {
  const int64_t per_token = (kk - 1) * r, total = n * per_token;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / per_token, tap = (e % per_token) / r, c = e % r;
    const int64_t u = targets[t * kk + tap];
    // reads only own-tap columns, writes only the others: no ordering between threads needed
    dP[(t * kk + tap) * r + c] = u >= 0 ? dP[(u * kk + kk - 1) * r + c] : 0.0f;
  }
}

}  // namespace

void shift_sum(const float* P, const int64_t* sources, int64_t n, int64_t kk, int64_t r, float* z, void* stream) {
  if (n <= 0) return;
  MOSS_LAUNCH(grid_for(n * r, THREADS), THREADS, 0, static_cast<cudaStream_t>(stream), shift_sum_kernel)(
      P, sources, n, kk, r, z, nullptr, nullptr);
}

void state_update(const float* P, float* z, int64_t kk, int64_t r, float* pending, const int64_t* read_tokens,
                  const int64_t* read_slots, int64_t n_read, const int64_t* write_slots, const int64_t* write_sources,
                  const bool* write_keep, int64_t n_write, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  // Every read before any write: a slot read by this call may be rewritten by it.
  if (n_read > 0)
    MOSS_LAUNCH(grid_for(n_read * r, THREADS), THREADS, 0, s, state_read_kernel)(z, pending, read_tokens, read_slots,
                                                                             n_read, r);
  if (n_write > 0)
    MOSS_LAUNCH(grid_for(n_write * r, THREADS), THREADS, 0, s, shift_sum_kernel)(P, write_sources, n_write, kk, r,
                                                                             pending, write_slots, write_keep);
}

void fill_taps(float* dP, const int64_t* targets, int64_t n, int64_t kk, int64_t r, void* stream) {
  if (n <= 0 || kk <= 1) return;
  MOSS_LAUNCH(grid_for(n * (kk - 1) * r, THREADS), THREADS, 0, static_cast<cudaStream_t>(stream),
              fill_taps_kernel)(dP, targets, n, kk, r);
}

}  // namespace moss::cuda
