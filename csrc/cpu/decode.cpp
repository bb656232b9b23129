// CPU decode step: one token per sequence. The host reads image_pos directly (it is a CPU tensor),
// so text and image rows are split once and each adapter runs only over its own rows.
//
// A step is a handful of GEMVs bound by reading the weights once. The conv's down-projection reads
// the weight in its own (r, d_in, k, k) layout, every tap at once, with the dot loops below (no
// restacked copy per call, none cached either: nothing to invalidate when the weights change).
// Plain linear products (text adapter, up-projections) with fp32 weights go to BLAS, which reads
// them in place too (measured on a Xeon, one thread: 2 x 1024 x 64 in 5 us through MKL, 20 us
// through the dot loops, whose per-row horizontal sums dominate on rows of length r).
#include "cpu_ops.h"
#include "rows.h"
#include "../include/moss_index.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifndef MOSS_DECODE_BLAS_ROWS
#define MOSS_DECODE_BLAS_ROWS 32
#endif

namespace moss::cpu {

// One weight row w (length len) against the expanded rows xe: lane q of a vector of L consecutive
// elements holds tap q % kk (L is a multiple of kk), so the taps stay apart until the end.
//
// The kernel streams the weights once (the step is bound by their bytes): O weight rows and RB
// rows of xe per pass, O x RB x NV vector accumulators in registers (enough independent FMA chains
// to hide their latency; one accumulator per row was latency-bound). Each load of a weight vector
// serves RB rows and each load of xe serves O weight rows.
template <typename V>
[[gnu::always_inline]] inline V loadv(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <typename V, int NV, int O, int RB>
[[gnu::always_inline]] inline void dot_block(const float* __restrict w, int64_t ldw, const float* __restrict xe,
                                             int64_t len, int64_t kk, float* __restrict out, int64_t n_out,
                                             int64_t o0, int64_t b0) {
  constexpr int W = sizeof(V) / sizeof(float), L = W * NV;
  V acc[RB][O][NV] = {};
  const float* x = xe + b0 * len;
  int64_t j = 0;
  for (; j + L <= len; j += L) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      V wv[O];
#pragma GCC unroll 8
      for (int q = 0; q < O; ++q) wv[q] = loadv<V>(w + q * ldw + j + W * v);
#pragma GCC unroll 8
      for (int rb = 0; rb < RB; ++rb) {
        const V xv = loadv<V>(x + rb * len + j + W * v);
#pragma GCC unroll 8
        for (int q = 0; q < O; ++q) acc[rb][q][v] += wv[q] * xv;
      }
    }
  }
  float lanes[RB][O][L];
  for (int rb = 0; rb < RB; ++rb)
    for (int q = 0; q < O; ++q)
      for (int v = 0; v < NV; ++v) __builtin_memcpy(&lanes[rb][q][W * v], &acc[rb][q][v], sizeof(V));
  for (int64_t t = 0; j + t < len; ++t)
    for (int rb = 0; rb < RB; ++rb)
      for (int q = 0; q < O; ++q) lanes[rb][q][t] += w[q * ldw + j + t] * x[rb * len + j + t];
  for (int rb = 0; rb < RB; ++rb)
    for (int q = 0; q < O; ++q)
      for (int64_t tap = 0; tap < kk; ++tap) {
        float sum = 0.0f;
        for (int64_t l = tap; l < L; l += kk) sum += lanes[rb][q][l];
        out[((b0 + rb) * kk + tap) * n_out + o0 + q] = sum;
      }
}

// Weight rows [o0, o0 + O) against rows [b, m) of xe: blocks of RB rows, the remainder as one block
// of fewer rows (m = 2 is one pass over the weights, not two).
template <typename V, int NV, int O, int RB>
[[gnu::always_inline]] inline void dot_rows_of(const float* w, int64_t ldw, const float* xe, int64_t b, int64_t m,
                                               int64_t len, int64_t kk, float* out, int64_t n_out, int64_t o0) {
  for (; b + RB <= m; b += RB) dot_block<V, NV, O, RB>(w, ldw, xe, len, kk, out, n_out, o0, b);
  if constexpr (RB > 1)
    if (b < m) dot_rows_of<V, NV, O, RB - 1>(w, ldw, xe, b, m, len, kk, out, n_out, o0);
}

// O * RB * NV accumulators plus O + 1 loaded vectors within the vector registers: 16 in AVX2
// (blocks of 4 weight rows x 2 rows), 32 in AVX-512 (8 x 2).
template <typename V, int O, int NV>
constexpr int kRowBlock = O * NV > 8 * sizeof(V) / 32 ? 1 : 2;

template <typename V, int NV>
[[gnu::always_inline]] inline void dot_body(const float* w, int64_t ldw, int64_t rows, const float* xe, int64_t m,
                                            int64_t len, int64_t kk, float* out, int64_t n_out, int64_t o0) {
  // Weight rows per pass: more rows in flight keep more of the memory system busy (measured on a
  // Xeon, one thread, 40 cold 64 x 4096 weights: 19 GB/s with 4 rows, 24 GB/s with 8).
  constexpr int O = NV == 1 ? 4 * sizeof(V) / 32 : 1;
  int64_t o = 0;
  for (; o + O <= rows; o += O)
    dot_rows_of<V, NV, O, kRowBlock<V, O, NV>>(w + o * ldw, ldw, xe, 0, m, len, kk, out, n_out, o0 + o);
  for (; o < rows; ++o) dot_rows_of<V, NV, 1, kRowBlock<V, 1, NV>>(w + o * ldw, ldw, xe, 0, m, len, kk, out, n_out, o0 + o);
}

// The same body compiled for each ISA (chosen at run time) and for the baseline ISA the extension is
// built for (no -march flags, so that a cached build runs on any CPU). NV vectors per lane group:
// L = lanes per vector x NV must be a multiple of kk.
using DotFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t,
                       int64_t);
typedef float v8f __attribute__((vector_size(32)));

template <int NV>
void dot_base(const float* w, int64_t ldw, int64_t rows, const float* xe, int64_t m, int64_t len, int64_t kk,
              float* out, int64_t n_out, int64_t o0) {
  dot_body<v8f, NV>(w, ldw, rows, xe, m, len, kk, out, n_out, o0);
}

#if defined(__x86_64__) || defined(__i386__)
typedef float v16f __attribute__((vector_size(64)));

template <int NV>
[[gnu::target("avx2,fma")]] void dot_avx2(const float* w, int64_t ldw, int64_t rows, const float* xe, int64_t m,
                                          int64_t len, int64_t kk, float* out, int64_t n_out, int64_t o0) {
  dot_body<v8f, NV>(w, ldw, rows, xe, m, len, kk, out, n_out, o0);
}

template <int NV>
[[gnu::target("avx512f,fma")]] void dot_avx512(const float* w, int64_t ldw, int64_t rows, const float* xe,
                                               int64_t m, int64_t len, int64_t kk, float* out, int64_t n_out,
                                               int64_t o0) {
  dot_body<v16f, NV>(w, ldw, rows, xe, m, len, kk, out, n_out, o0);
}
#endif

// The widest vector ISA to use: 2 = AVX-512, 1 = AVX2+FMA, 0 = the baseline build. MOSS_CPU_ISA
// ("avx2" or "baseline") caps it, so that the tests run every clone on one machine.
inline int vector_isa() {
  static const int isa = [] {
    int best = 0;
#if defined(__x86_64__) || defined(__i386__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = __builtin_cpu_supports("avx512f") ? 2 : 1;
#endif
    const char* cap = std::getenv("MOSS_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) best = std::min(best, 1);
    if (cap != nullptr && std::strcmp(cap, "baseline") == 0) best = 0;
    return best;
  }();
  return isa;
}

// The kernel for kk taps per lane group, or null (k >= 5 takes the scalar loop).
inline DotFn pick_dot(int64_t kk) {
  const int isa = vector_isa();
#if defined(__x86_64__) || defined(__i386__)
  if (isa == 2 && (kk == 1 || kk == 4 || kk == 16)) return &dot_avx512<1>;  // 16 lanes
  if (isa == 2 && kk == 9) return &dot_avx512<9>;                            // 144 lanes
  if (isa >= 1 && (kk == 1 || kk == 4)) return &dot_avx2<1>;
  if (isa >= 1 && kk == 16) return &dot_avx2<2>;
  if (isa >= 1 && kk == 9) return &dot_avx2<9>;  // 72 lanes
#endif
  if (kk == 1 || kk == 4) return &dot_base<1>;
  if (kk == 16) return &dot_base<2>;
  if (kk == 9) return &dot_base<9>;
  return nullptr;
}

// out[(b * kk + tap) * n_out + o] = sum_i X[b, i] * w[o, i * kk + tap] for the m rows of X
// ((m, len / kk) fp32, contiguous); w: (n_out, len), any floating dtype. kk = 1 is a plain X w^T;
// kk = k*k reads a conv weight (r, d_in, k, k) in place, every tap at once (nothing is restacked).
static void lane_dot_impl(const at::Tensor& X, const at::Tensor& w, int64_t kk, DotFn dot, float* out) {
  const int64_t m = X.size(0), n_out = w.size(0), len = w.numel() / std::max<int64_t>(n_out, 1);
  // xe[b, i * kk + tap] = X[b, i]: lines up elementwise with a weight row (lane q holds tap q % kk).
  std::vector<float> expanded(kk == 1 ? 0 : m * len);
  const float* xp = X.const_data_ptr<float>();
  for (int64_t i = 0; kk > 1 && i < m * (len / kk); ++i) std::fill_n(expanded.data() + i * kk, kk, xp[i]);
  const float* xe = kk == 1 ? xp : expanded.data();
  constexpr int64_t kRowsPerChunk = 16;  // weight rows converted (half/bf16) and swept per chunk
  MOSS_DISPATCH_FLOATS(w.scalar_type(), "moss_lane_dot", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, len * m));  // len * m may be 0
    at::parallel_for(0, n_out, std::max(grain, kRowsPerChunk), [&](int64_t o0, int64_t o1) {
      std::vector<float> rows(std::is_same_v<scalar_t, float> ? 0 : kRowsPerChunk * len);
      for (int64_t c0 = o0; c0 < o1; c0 += kRowsPerChunk) {
        const int64_t nr = std::min(kRowsPerChunk, o1 - c0);
        const float* wrows;
        if constexpr (std::is_same_v<scalar_t, float>) {
          wrows = reinterpret_cast<const float*>(wp + c0 * len);  // (compiled for every dtype, run for fp32)
        } else {
          for (int64_t j = 0; j < nr * len; ++j) rows[j] = static_cast<float>(wp[c0 * len + j]);
          wrows = rows.data();
        }
        dot(wrows, len, nr, xe, m, len, kk, out, n_out, c0);
      }
    });
  });
}

// From this many rows on, a step is a GEMM: BLAS (after stacking a conv weight's taps, a copy per
// call that the rows amortise) beats the dot loops, which re-read each block of weight rows from L2
// once per two rows. Measured on a Xeon, one thread, 40 cold image layers (d 1024, r 64, k 2):
// 4 / 8 / 16 / 32 / 64 rows in 205 / 260 / 378 / 610 / 1057 us through the loops, 382 / 430 / 426
// / 555 / 750 us through BLAS.
constexpr int64_t kBlasRows = MOSS_DECODE_BLAS_ROWS;

static void lane_dot(const at::Tensor& X, const at::Tensor& weight, int64_t kk, float* out) {
  if (X.size(0) >= kBlasRows || (kk == 1 && weight.scalar_type() == at::kFloat)) {  // see the file comment
    // out (m, kk * n_out) tap-major = X K_all^T, K_all = the weight's taps stacked (kk * n_out, len / kk)
    const at::Tensor K = kk == 1 ? as_f32(weight.reshape({weight.size(0), -1})) : stacked_taps(weight);
    at::Tensor dst = at::from_blob(out, {X.size(0), K.size(0)}, X.options().dtype(at::kFloat));
    at::mm_out(dst, X, K.t());
    return;
  }
  const at::Tensor w = weight.contiguous();
  if (const DotFn dot = pick_dot(kk)) return lane_dot_impl(X, w, kk, dot, out);
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
  // The rows of one modality as a contiguous fp32 (n, d_in) matrix: x itself when it is all of x's
  // rows and x is fp32 and contiguous (the common decode case: a batch wholly in text or in an
  // image), otherwise gathered into `buf`.
  const auto modality_rows = [&](const std::vector<int64_t>& rows, at::Tensor buf) {
    const int64_t n = static_cast<int64_t>(rows.size());
    if (n == batch && x.scalar_type() == at::kFloat && x.is_contiguous()) return x;
    gather_rows(x, rows.data(), n, buf.data_ptr<float>(), 1.0f);
    return buf;
  };

  if (text_a.defined() && !txt.empty()) {
    const int64_t n = static_cast<int64_t>(txt.size()), rt = text_a.size(0);
    at::Tensor work = at::empty({n * (d_in + rt + d_out)}, f32);  // X | h | delta
    const at::Tensor X = modality_rows(txt, work.narrow(0, 0, n * d_in).view({n, d_in}));
    at::Tensor h = work.narrow(0, n * d_in, n * rt).view({n, rt});
    lane_dot(X, text_a, 1, h.data_ptr<float>());
    float* d = work.data_ptr<float>() + n * (d_in + rt);
    lane_dot(h, text_b, 1, d);
    scatter_add_rows(out, txt.data(), n, d, d_out, s);
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
  // X | every tap of each image token, tap-major (T) | z | delta
  at::Tensor work = at::empty({n * (d_in + kk * r + r + d_out)}, f32);
  const at::Tensor X = modality_rows(img, work.narrow(0, 0, n * d_in).view({n, d_in}));
  float* tp = work.data_ptr<float>() + n * d_in;
  lane_dot(X, image_weight, kk, tp);
  at::Tensor Z = work.narrow(0, n * (d_in + kk * r), n * r).view({n, r});
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
  float* d = zp + n * r;
  lane_dot(Z, image_b, 1, d);
  scatter_add_rows(out, img.data(), n, d, d_out, s);
}

}  // namespace moss::cpu
