// CPU decode step: one token per sequence. The host reads image_pos directly (it is a CPU tensor),
// so text and image rows are split once and each adapter runs only over its own rows.
//
// A step is a handful of GEMVs bound by reading the weights once; BLAS calls on a few rows cost
// more in packing and thread start-up than the arithmetic (measured ~90 us per 4 x 1024 x 64 mm),
// so the products here are plain dot loops over weight rows in their own layout.
#include "cpu_ops.h"
#include "rows.h"
#include "../include/moss_index.h"

#include <algorithm>
#include <vector>

#ifndef MOSS_DECODE_BLAS_ROWS
#define MOSS_DECODE_BLAS_ROWS 8
#endif

namespace moss::cpu {

// Eight floats as one GCC vector: a ymm register in the AVX2 clone, two xmm in the baseline one.
// Explicit vectors keep the accumulators in registers (plain float arrays ended up on the stack).
typedef float v8f __attribute__((vector_size(32)));

[[gnu::always_inline]] inline v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// For one weight row w (length len) and rows b0 .. b0+RB-1 of xe: out[(b * kk + tap) * n_out] =
// sum over j = tap (mod kk) of w[j] * xe[b, j]. L lanes (a multiple of 8 and of kk) per row; RB
// rows share each load of w.
template <int L, int RB>
[[gnu::always_inline]] inline void dot_rows(const float* __restrict w, const float* __restrict xe, int64_t len,
                                            int64_t kk, float* __restrict out, int64_t n_out, int64_t b0) {
  constexpr int V = L / 8;
  v8f acc[RB][V] = {};
  const float* x = xe + b0 * len;
  int64_t j = 0;
  for (; j + L <= len; j += L) {
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      const v8f wv = load8(w + j + 8 * v);
#pragma GCC unroll 4
      for (int rb = 0; rb < RB; ++rb) acc[rb][v] += wv * load8(x + rb * len + j + 8 * v);
    }
  }
  float lanes[RB][L];
  for (int rb = 0; rb < RB; ++rb)
    for (int v = 0; v < V; ++v) __builtin_memcpy(&lanes[rb][8 * v], &acc[rb][v], sizeof(v8f));
  for (int q = 0; j + q < len; ++q)
    for (int rb = 0; rb < RB; ++rb) lanes[rb][q] += w[j + q] * x[rb * len + j + q];
  for (int rb = 0; rb < RB; ++rb)
    for (int64_t tap = 0; tap < kk; ++tap) {
      float sum = 0.0f;
      for (int64_t q = tap; q < L; q += kk) sum += lanes[rb][q];
      out[((b0 + rb) * kk + tap) * n_out] = sum;
    }
}

template <int L>
[[gnu::always_inline]] inline void row_dot_body(const float* __restrict w, const float* __restrict xe, int64_t m,
                                                int64_t len, int64_t kk, float* __restrict out, int64_t n_out) {
  constexpr int RB = L <= 16 ? 4 : 1;  // RB * L / 8 accumulators must fit the 16 vector registers
  int64_t b = 0;
  for (; b + RB <= m; b += RB) dot_rows<L, RB>(w, xe, len, kk, out, n_out, b);
  for (; b < m; ++b) dot_rows<L, 1>(w, xe, len, kk, out, n_out, b);
}

// The same body compiled twice on x86-64: for AVX2+FMA (chosen at run time) and for the baseline
// ISA the extension is built for (no -march flags, so that a cached build runs on any CPU).
template <int L>
void row_dot_base(const float* w, const float* xe, int64_t m, int64_t len, int64_t kk, float* out, int64_t n_out) {
  row_dot_body<L>(w, xe, m, len, kk, out, n_out);
}

#if defined(__x86_64__) || defined(__i386__)
template <int L>
[[gnu::target("avx2,fma")]] void row_dot_avx2(const float* w, const float* xe, int64_t m, int64_t len, int64_t kk,
                                              float* out, int64_t n_out) {
  row_dot_body<L>(w, xe, m, len, kk, out, n_out);
}

template <int L>
auto pick_row_dot() {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2 ? &row_dot_avx2<L> : &row_dot_base<L>;
}
#else
template <int L>
auto pick_row_dot() {
  return &row_dot_base<L>;
}
#endif

// out[(b * kk + tap) * n_out + o] = sum_i X[b, i] * w[o, i * kk + tap] for the m rows of X
// ((m, len / kk) fp32); w: (n_out, len), any floating dtype. kk = 1 is a plain X w^T; kk = k*k
// reads a conv weight (r, d_in, k, k) in place, every tap at once.
template <int L>
static void lane_dot_impl(const at::Tensor& X, const at::Tensor& w, int64_t kk, float* out) {
  const int64_t m = X.size(0), n_out = w.size(0), len = w.numel() / std::max<int64_t>(n_out, 1);
  // Xe[b, i * kk + tap] = X[b, i]: lines up elementwise with a weight row (lane q holds tap q % kk).
  const at::Tensor Xe = kk == 1 ? X.contiguous() : X.unsqueeze(2).expand({m, len / kk, kk}).contiguous();
  const float* xe = Xe.const_data_ptr<float>();
  MOSS_DISPATCH_FLOATS(w.scalar_type(), "moss_lane_dot", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, len * m));  // len * m may be 0
    at::parallel_for(0, n_out, grain, [&](int64_t o0, int64_t o1) {
      std::vector<float> row(std::is_same_v<scalar_t, float> ? 0 : len);
      const auto row_dot = pick_row_dot<L>();
      for (int64_t o = o0; o < o1; ++o) {
        const float* wrow;
        if constexpr (std::is_same_v<scalar_t, float>) {
          wrow = wp + o * len;
        } else {
          for (int64_t j = 0; j < len; ++j) row[j] = static_cast<float>(wp[o * len + j]);
          wrow = row.data();
        }
        row_dot(wrow, xe, m, len, kk, out + o, n_out);
      }
    });
  });
}

// From this many rows on, a step is a GEMM: BLAS (after stacking a conv weight's taps) beats the
// dot loops, which stream the weights once per four rows. Measured on the 2-core AMD EPYC: 8 image
// rows (d_in 512, d_out 1376, r 64, k 2, one thread) 270 us through BLAS, 551 us through the loops;
// 4 image + 4 text rows (d 1024, two threads) 0.20 ms through the loops, 0.32 ms through BLAS.
constexpr int64_t kBlasRows = MOSS_DECODE_BLAS_ROWS;

static void lane_dot(const at::Tensor& X, const at::Tensor& weight, int64_t kk, float* out) {
  if (X.size(0) >= kBlasRows) {
    // out (m, kk * n_out) tap-major = X K_all^T, K_all = the weight's taps stacked (kk * n_out, len / kk)
    const at::Tensor K = kk == 1 ? as_f32(weight.reshape({weight.size(0), -1})) : stacked_taps(weight);
    at::Tensor dst = at::from_blob(out, {X.size(0), K.size(0)}, X.options().dtype(at::kFloat));
    at::mm_out(dst, X, K.t());
    return;
  }
  const at::Tensor w = weight.contiguous();
  switch (kk) {  // lanes: a multiple of 8 and of kk
    case 1: return lane_dot_impl<16>(X, w, kk, out);
    case 4: return lane_dot_impl<16>(X, w, kk, out);
    case 9: return lane_dot_impl<72>(X, w, kk, out);
    case 16: return lane_dot_impl<16>(X, w, kk, out);
    default: break;
  }
  // Larger kernels (k >= 5): one lane per tap, scalar but exact.
  const int64_t m = X.size(0), n_out = w.size(0), len = w.numel() / std::max<int64_t>(n_out, 1);
  const at::Tensor Xc = X.contiguous(), wf = w.to(at::kFloat);
  const float* xp = Xc.const_data_ptr<float>();
  const float* wp = wf.const_data_ptr<float>();
  at::parallel_for(0, n_out, row_grain(m * len), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t b = 0; b < m; ++b)
        for (int64_t tap = 0; tap < kk; ++tap) {
          float sum = 0.0f;
          for (int64_t i = 0; i < len / kk; ++i) sum += wp[o * len + i * kk + tap] * xp[b * (len / kk) + i];
          out[(b * kk + tap) * n_out + o] = sum;
        }
  });
}

void decode_step(const at::Tensor& x, at::Tensor& out, const at::Tensor& text_a, const at::Tensor& text_b,
                 const at::Tensor& image_weight, const at::Tensor& image_b, double scale, at::Tensor& pending,
                 const at::Tensor& image_pos, const at::Tensor& height, const at::Tensor& width) {
  const float s = static_cast<float>(scale);
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t batch = x.size(0), d_in = x.size(1), d_out = out.size(1);
  const int64_t* pos = image_pos.data_ptr<int64_t>();
  const int64_t* hh = height.data_ptr<int64_t>();
  const int64_t* ww = width.data_ptr<int64_t>();
  std::vector<int64_t> txt, img;
  for (int64_t b = 0; b < batch; ++b) (pos[b] >= 0 ? img : txt).push_back(b);

  if (text_a.defined() && !txt.empty()) {
    const int64_t n = static_cast<int64_t>(txt.size());
    at::Tensor X = at::empty({n, d_in}, f32);
    gather_rows(x, txt.data(), n, X.data_ptr<float>(), 1.0f);
    at::Tensor h = at::empty({n, text_a.size(0)}, f32);
    lane_dot(X, text_a, 1, h.data_ptr<float>());
    at::Tensor d = at::empty({n, d_out}, f32);
    lane_dot(h, text_b, 1, d.data_ptr<float>());
    scatter_add_rows(out, txt.data(), n, d.data_ptr<float>(), d_out, s);
  }
  if (!image_weight.defined() || img.empty()) return;
  const int64_t r = image_weight.size(0), k = image_weight.size(2), kk = k * k;
  const int64_t n = static_cast<int64_t>(img.size()), capacity = pending.size(1);
  for (int64_t b : img) {
    // Overflow-free forms of p < H * W and (k-1)(W+1) <= capacity.
    TORCH_CHECK_VALUE(ww[b] > 0 && hh[b] > 0 && pos[b] / ww[b] < hh[b],
                      "moss_lora_step: image_pos[", b, "] = ", pos[b], " is beyond the ", hh[b], "x", ww[b], " image");
    TORCH_CHECK_VALUE(k == 1 || ww[b] <= capacity / (k - 1) - 1, "moss_lora_step: pending capacity ", capacity,
                      " is below the slots a width-", ww[b], " image needs (row ", b, ")");
  }
  at::Tensor X = at::empty({n, d_in}, f32);
  gather_rows(x, img.data(), n, X.data_ptr<float>(), 1.0f);
  at::Tensor T = at::empty({n, kk * r}, f32);  // every tap of each image token, tap-major
  lane_dot(X, image_weight, kk, T.data_ptr<float>());
  at::Tensor Z = at::empty({n, r}, f32);
  float* tp = T.data_ptr<float>();
  float* zp = Z.data_ptr<float>();
  MOSS_DISPATCH_FLOATS(pending.scalar_type(), "moss_decode_ring", [&] {
    scalar_t* ring = pending.data_ptr<scalar_t>();
    // Rows own disjoint rings: parallel over rows, sequential read -> reset -> add within one.
    at::parallel_for(0, n, row_grain(kk * r), [&](int64_t b0, int64_t e0) {
      for (int64_t i = b0; i < e0; ++i) {
        const int64_t b = img[i], p = pos[b];
        const float* taps = tp + i * kk * r;
        float* z = zp + i * r;
        std::copy(taps + (kk - 1) * r, taps + kk * r, z);
        const int64_t own = decode_own_slot(k, p, ww[b]);
        if (own < 0) continue;
        scalar_t* row = ring + b * capacity * r;
        scalar_t* mine = row + own * r;
        if (p > 0)  // token 0 has no earlier contributor: its slot may hold an earlier image's leftovers
          for (int64_t c = 0; c < r; ++c) z[c] += static_cast<float>(mine[c]);
        std::fill(mine, mine + r, scalar_t(0));
        for (int64_t tap = 0; tap + 1 < kk; ++tap) {
          const int64_t slot = decode_target_slot(k, tap, p, hh[b], ww[b]);
          if (slot < 0) continue;
          scalar_t* dst = row + slot * r;
          const float* src = taps + tap * r;
          if (decode_first_writer(k, tap, p, ww[b])) {
            for (int64_t c = 0; c < r; ++c) dst[c] = static_cast<scalar_t>(src[c]);
          } else {
            for (int64_t c = 0; c < r; ++c) dst[c] = static_cast<scalar_t>(static_cast<float>(dst[c]) + src[c]);
          }
        }
      }
    });
  });
  at::Tensor d = at::empty({n, d_out}, f32);
  lane_dot(Z, image_b, 1, d.data_ptr<float>());
  scatter_add_rows(out, img.data(), n, d.data_ptr<float>(), d_out, s);
}

}  // namespace moss::cpu
