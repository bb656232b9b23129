// CPU kernels of multi-scale deformable attention (ms_deform_attn) and MMFS (mmfs_attn), with the
// semantics of moss_kernels/deform_reference.py (the backend contract; MMFS.md §a, §c).
//
// Parallel over (n, h): one task owns every output row, every location/weight/logit gradient and
// the whole grad_value slice value[n, ..., h, :] of its (n, h), and walks q, (m,) l, p in a fixed
// order. No atomics, no cross-task reduction: every result is bitwise identical whatever the
// thread count. value is read in its own dtype (fp32/fp16/bf16/fp64); everything else arrives and
// is computed in acc_t (float, double for float64 values; moss_kernels/native.py converts), and
// outputs are written in full (the buffers may hold anything, NaN included). All index math is
// int64. Bilinear sampling: u = x*W - 1/2, v = y*H - 1/2, zero padding; a location outside the
// open box -1 < u < W, -1 < v < H, or not finite, contributes 0 and gets gradient 0.
//
// Registered into the extension by register_deform_attn (called from binding.cpp); each function
// checks its tensors with errors naming the argument.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <vector>

namespace moss::cpu {
namespace {

// ---------------------------------------------------------------------------- checks
std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, std::vector<int64_t> shape) {
  TORCH_CHECK_TYPE(t.defined(), "moss_kernels native: argument '", name, "' is missing");
  TORCH_CHECK_VALUE(t.device().is_cpu(), "moss_kernels native: argument '", name, "' must be on the CPU, got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "moss_kernels native: argument '", name, "' must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), "moss_kernels native: argument '", name,
                    "' must have shape ", at::IntArrayRef(shape), ", got ", shape_of(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), "moss_kernels native: argument '", name, "' must be contiguous");
}

at::ScalarType acc_type(const at::Tensor& value) {
  return value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_value(const at::Tensor& value, int64_t dims) {
  TORCH_CHECK_TYPE(value.defined(), "moss_kernels native: argument 'value' is missing");
  const auto dt = value.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   "moss_kernels native: argument 'value' must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK_VALUE(value.dim() == dims && value.is_contiguous() && value.device().is_cpu(),
                    "moss_kernels native: argument 'value' must be a contiguous ", dims, "-D CPU tensor, got ",
                    shape_of(value));
}

struct Level {
  int64_t start, h, w;
};

// Levels from spatial_shapes (L, 2) and level_start_index (L,), checked: sizes >= 1, the starts the
// exclusive cumulative sum, the total `size` (positions per image).
std::vector<Level> levels(const at::Tensor& shapes, const at::Tensor& starts, int64_t size) {
  TORCH_CHECK_VALUE(shapes.dim() == 2 && shapes.size(0) >= 1, "moss_kernels native: argument 'spatial_shapes' "
                    "must have shape (L, 2), got ", shape_of(shapes));
  const int64_t L = shapes.size(0);
  check(shapes, "spatial_shapes", at::kLong, {L, 2});
  check(starts, "level_start_index", at::kLong, {L});
  const int64_t* s = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  std::vector<Level> out;
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK_VALUE(s[2 * l] >= 1 && s[2 * l + 1] >= 1, "moss_kernels native: argument 'spatial_shapes' row ", l,
                      " = (", s[2 * l], ", ", s[2 * l + 1], ") must be >= 1");
    TORCH_CHECK_VALUE(st[l] == total, "moss_kernels native: argument 'level_start_index'[", l, "] = ", st[l],
                      ", expected the exclusive cumulative sum ", total);
    out.push_back({total, s[2 * l], s[2 * l + 1]});
    total += s[2 * l] * s[2 * l + 1];
  }
  TORCH_CHECK_VALUE(total == size, "moss_kernels native: argument 'spatial_shapes' sums to ", total,
                    " positions, but value has ", size);
  return out;
}

// ---------------------------------------------------------------------------- bilinear sampling
// The corners of one location on an h x w level. `ok` is false when the location is outside the
// open box or not finite (every comparison with NaN is false).
template <typename acc_t>
struct Bilinear {
  int64_t i0 = 0, j0 = 0;
  acc_t alpha = 0, beta = 0;
  bool ok = false;

  Bilinear(acc_t x, acc_t y, int64_t h, int64_t w) {
    const acc_t u = x * static_cast<acc_t>(w) - acc_t(0.5), v = y * static_cast<acc_t>(h) - acc_t(0.5);
    ok = u > acc_t(-1) && u < static_cast<acc_t>(w) && v > acc_t(-1) && v < static_cast<acc_t>(h);
    if (!ok) return;
    const acc_t fu = std::floor(u), fv = std::floor(v);
    j0 = static_cast<int64_t>(fu);
    i0 = static_cast<int64_t>(fv);
    alpha = u - fu;
    beta = v - fv;
  }
};

// acc[0:D] += a * Samp(level, x, y). `level` points at value[..., start_l, h, 0]; rows `ld` apart.
template <typename scalar_t, typename acc_t>
inline void sample_add(const scalar_t* level, int64_t ld, int64_t h, int64_t w, acc_t x, acc_t y, acc_t a,
                       int64_t D, acc_t* acc) {
  const Bilinear<acc_t> b(x, y, h, w);
  if (!b.ok) return;
  for (int c = 0; c < 4; ++c) {
    const int64_t i = b.i0 + (c >> 1), j = b.j0 + (c & 1);
    if (i < 0 || i >= h || j < 0 || j >= w) continue;
    const acc_t wa = (c & 1) ? b.alpha : 1 - b.alpha, wb = (c >> 1) ? b.beta : 1 - b.beta;
    const acc_t aw = a * wa * wb;
    const scalar_t* p = level + (i * w + j) * ld;
    for (int64_t d = 0; d < D; ++d) acc[d] += aw * static_cast<acc_t>(p[d]);
  }
}

// The gradients of one sample with weight a and output gradient g[0:D]: returns <g, Samp> in
// *g_samp, dL/dx, dL/dy in *g_x, *g_y, and adds a * w_corner * g into the grad rows `gv` (the
// same layout as `level`, in acc_t).
template <typename scalar_t, typename acc_t>
inline void sample_backward(const scalar_t* level, acc_t* gv, int64_t ld, int64_t h, int64_t w, acc_t x, acc_t y,
                            acc_t a, const acc_t* g, int64_t D, acc_t* g_samp, acc_t* g_x, acc_t* g_y) {
  *g_samp = *g_x = *g_y = 0;
  const Bilinear<acc_t> b(x, y, h, w);
  if (!b.ok) return;
  acc_t gs = 0, d_alpha = 0, d_beta = 0;
  for (int c = 0; c < 4; ++c) {
    const int64_t i = b.i0 + (c >> 1), j = b.j0 + (c & 1);
    if (i < 0 || i >= h || j < 0 || j >= w) continue;
    const acc_t wa = (c & 1) ? b.alpha : 1 - b.alpha, wb = (c >> 1) ? b.beta : 1 - b.beta;
    const int64_t off = (i * w + j) * ld;
    const scalar_t* p = level + off;
    acc_t* q = gv + off;
    const acc_t aw = a * wa * wb;
    acc_t dot = 0;
    // A vectorized reduction in an order fixed at compile time: the same bits on every run and
    // thread count (a task's sums never depend on the schedule).
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += g[d] * static_cast<acc_t>(p[d]);
    for (int64_t d = 0; d < D; ++d) q[d] += aw * g[d];
    gs += wa * wb * dot;
    d_alpha += ((c & 1) ? wb : -wb) * dot;
    d_beta += ((c >> 1) ? wa : -wa) * dot;
  }
  *g_samp = gs;
  *g_x = a * d_alpha * static_cast<acc_t>(w);
  *g_y = a * d_beta * static_cast<acc_t>(h);
}

// Zeroes the grad_value slice [.., s, h, :] for s < rows (rows `ld` apart) of one task.
template <typename acc_t>
inline void zero_rows(acc_t* gv, int64_t rows, int64_t ld, int64_t D) {
  for (int64_t s = 0; s < rows; ++s) std::fill(gv + s * ld, gv + s * ld + D, acc_t(0));
}

#define MOSS_DEFORM_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// (n, h) tasks per parallel_for chunk: enough samples x channels (~64K) to amortise a fork; small
// calls run on the calling thread. Only the split changes, never a task's result.
inline int64_t task_grain(int64_t samples_per_task, int64_t D) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, samples_per_task * D));
}

// ---------------------------------------------------------------------------- ms_deform_attn
struct MsdaShape {
  int64_t N, S, H, D, Lq, L, P;
};

// value (N, S, H, D); loc (N, Lq, H, L, P, 2), att (N, Lq, H, L, P) in acc_t.
MsdaShape check_msda(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& att, int64_t L) {
  check_value(value, 4);
  TORCH_CHECK_VALUE(loc.dim() == 6, "moss_kernels native: argument 'sampling_locations' must be 6-D, got ",
                    shape_of(loc));
  MsdaShape s{value.size(0), value.size(1), value.size(2), value.size(3), loc.size(1), L, loc.size(4)};
  const auto acc = acc_type(value);
  check(loc, "sampling_locations", acc, {s.N, s.Lq, s.H, L, s.P, 2});
  check(att, "attention_weights", acc, {s.N, s.Lq, s.H, L, s.P});
  return s;
}

// value (N, S, H, D); loc (N, Lq, H, L, P, 2), att (N, Lq, H, L, P) in acc_t; out (N, Lq, H*D) in
// value's dtype, written in full.
void ms_deform_forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& loc, const at::Tensor& att, at::Tensor out) {
  check_value(value, 4);
  const auto lv = levels(spatial_shapes, level_start_index, value.size(1));
  const MsdaShape sh = check_msda(value, loc, att, static_cast<int64_t>(lv.size()));
  const int64_t N = sh.N, S = sh.S, H = sh.H, D = sh.D, Lq = sh.Lq, L = sh.L, P = sh.P;
  const auto acc = acc_type(value);
  check(out, "out", value.scalar_type(), {N, Lq, H * D});
  MOSS_DEFORM_DISPATCH(value.scalar_type(), "moss_ms_deform_forward", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* V = value.const_data_ptr<scalar_t>();
    const acc_t* X = loc.const_data_ptr<acc_t>();
    const acc_t* A = att.const_data_ptr<acc_t>();
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * H, task_grain(Lq * L * P, D), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> buf(D);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / H, hh = t % H;
        const scalar_t* Vnh = V + (n * S * H + hh) * D;
        for (int64_t q = 0; q < Lq; ++q) {
          std::fill(buf.begin(), buf.end(), acc_t(0));
          const int64_t row = (n * Lq + q) * H + hh;  // (n, q, h)
          for (int64_t l = 0; l < L; ++l) {
            const Level& e = lv[l];
            for (int64_t p = 0; p < P; ++p) {
              const int64_t k = row * L * P + l * P + p;
              sample_add(Vnh + e.start * H * D, H * D, e.h, e.w, X[2 * k], X[2 * k + 1], A[k], D, buf.data());
            }
          }
          scalar_t* o = O + row * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(buf[d]);
        }
      }
    });
  });
}

// grad (N, Lq, H*D) in acc_t; writes grad_value (N, S, H, D), grad_loc, grad_att in acc_t, in full.
void ms_deform_backward(const at::Tensor& grad, const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& loc, const at::Tensor& att,
                        at::Tensor grad_value, at::Tensor grad_loc, at::Tensor grad_att) {
  check_value(value, 4);
  const auto lv = levels(spatial_shapes, level_start_index, value.size(1));
  const MsdaShape sh = check_msda(value, loc, att, static_cast<int64_t>(lv.size()));
  const int64_t N = sh.N, S = sh.S, H = sh.H, D = sh.D, Lq = sh.Lq, L = sh.L, P = sh.P;
  const auto acc = acc_type(value);
  check(grad, "grad_out", acc, {N, Lq, H * D});
  check(grad_value, "grad_value", acc, {N, S, H, D});
  check(grad_loc, "grad_locations", acc, {N, Lq, H, L, P, 2});
  check(grad_att, "grad_weights", acc, {N, Lq, H, L, P});
  MOSS_DEFORM_DISPATCH(value.scalar_type(), "moss_ms_deform_backward", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* V = value.const_data_ptr<scalar_t>();
    const acc_t* X = loc.const_data_ptr<acc_t>();
    const acc_t* A = att.const_data_ptr<acc_t>();
    const acc_t* G = grad.const_data_ptr<acc_t>();
    acc_t* GV = grad_value.mutable_data_ptr<acc_t>();
    acc_t* GX = grad_loc.mutable_data_ptr<acc_t>();
    acc_t* GA = grad_att.mutable_data_ptr<acc_t>();
    at::parallel_for(0, N * H, task_grain(Lq * L * P + S, D), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / H, hh = t % H;
        const int64_t base = (n * S * H + hh) * D;
        zero_rows(GV + base, S, H * D, D);
        for (int64_t q = 0; q < Lq; ++q) {
          const int64_t row = (n * Lq + q) * H + hh;
          const acc_t* g = G + row * D;
          for (int64_t l = 0; l < L; ++l) {
            const Level& e = lv[l];
            const int64_t lvl = base + e.start * H * D;
            for (int64_t p = 0; p < P; ++p) {
              const int64_t k = row * L * P + l * P + p;
              sample_backward(V + lvl, GV + lvl, H * D, e.h, e.w, X[2 * k], X[2 * k + 1], A[k], g, D, &GA[k],
                              &GX[2 * k], &GX[2 * k + 1]);
            }
          }
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------- mmfs_attn
// The per-query view of `visible`: int64 ranges (N, Lq, 2) or a bool mask (N, Lq, M).
struct Visibility {
  const int64_t* ranges = nullptr;
  const bool* mask = nullptr;
  int64_t M = 0;

  Visibility(const at::Tensor& visible, int64_t N, int64_t Lq, int64_t M_) : M(M_) {
    if (visible.scalar_type() == at::kBool) {
      check(visible, "visible", at::kBool, {N, Lq, M});
      mask = visible.const_data_ptr<bool>();
    } else {
      check(visible, "visible", at::kLong, {N, Lq, 2});
      ranges = visible.const_data_ptr<int64_t>();
      for (int64_t i = 0; i < N * Lq; ++i) {
        TORCH_CHECK_VALUE(ranges[2 * i] >= 0 && ranges[2 * i] <= ranges[2 * i + 1] && ranges[2 * i + 1] <= M,
                          "moss_kernels native: argument 'visible' holds the range [", ranges[2 * i], ", ",
                          ranges[2 * i + 1], ") at query ", i, ", outside 0 <= lo <= hi <= M = ", M);
      }
    }
  }
  // Calls fn(m) for every image the query (n, q) sees, in increasing m.
  template <typename Fn>
  void each(int64_t nq, Fn&& fn) const {
    if (ranges) {
      for (int64_t m = ranges[2 * nq]; m < ranges[2 * nq + 1]; ++m) fn(m);
    } else {
      for (int64_t m = 0; m < M; ++m)
        if (mask[nq * M + m]) fn(m);
    }
  }
};

struct MmfsShape {
  int64_t N, M, S, H, D, Lq, L, P;
};

MmfsShape check_mmfs(const at::Tensor& value, const at::Tensor& ref, const at::Tensor& off, const at::Tensor& logits,
                     const at::Tensor& scale, int64_t L) {
  check_value(value, 5);
  MmfsShape s{value.size(0), value.size(1), value.size(2), value.size(3), value.size(4), 0, L, 0};
  TORCH_CHECK_VALUE(off.dim() == 6, "moss_kernels native: argument 'sampling_offsets' must be 6-D, got ",
                    shape_of(off));
  s.Lq = off.size(1);
  s.P = off.size(4);
  const auto acc = acc_type(value);
  check(ref, "reference_points", acc, {s.N, s.Lq, 2});
  check(off, "sampling_offsets", acc, {s.N, s.Lq, s.H, s.M, s.P, 2});
  check(logits, "attention_logits", acc, {s.N, s.Lq, s.H, s.M, L, s.P});
  check(scale, "offset_scale", acc, {L, 2});
  return s;
}

// value (N, M, S, H, D); reference_points (N, Lq, 2), offsets (N, Lq, H, M, P, 2), logits
// (N, Lq, H, M, L, P), offset_scale (L, 2) in acc_t. Writes out (N, Lq, H*D) in value's dtype and
// lse (N, Lq, H) in acc_t (-inf where nothing is visible and sink == 0; the output is then 0).
void mmfs_forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& ref, const at::Tensor& off, const at::Tensor& logits, const at::Tensor& visible,
                  const at::Tensor& scale, double sink, at::Tensor out, at::Tensor lse) {
  check_value(value, 5);
  const auto lv = levels(spatial_shapes, level_start_index, value.size(2));
  const MmfsShape s = check_mmfs(value, ref, off, logits, scale, static_cast<int64_t>(lv.size()));
  const Visibility vis(visible, s.N, s.Lq, s.M);
  TORCH_CHECK_VALUE(sink >= 0 && std::isfinite(sink), "moss_kernels native: argument 'sink' must be >= 0, got ", sink);
  check(out, "out", value.scalar_type(), {s.N, s.Lq, s.H * s.D});
  check(lse, "lse", acc_type(value), {s.N, s.Lq, s.H});
  const int64_t N = s.N, M = s.M, S = s.S, H = s.H, D = s.D, Lq = s.Lq, L = s.L, P = s.P;
  MOSS_DEFORM_DISPATCH(value.scalar_type(), "moss_mmfs_forward", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* V = value.const_data_ptr<scalar_t>();
    const acc_t* R = ref.const_data_ptr<acc_t>();
    const acc_t* OFF = off.const_data_ptr<acc_t>();
    const acc_t* Z = logits.const_data_ptr<acc_t>();
    const acc_t* K = scale.const_data_ptr<acc_t>();
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    acc_t* LSE = lse.mutable_data_ptr<acc_t>();
    const acc_t sk = static_cast<acc_t>(sink);
    const acc_t log_sink = sink > 0 ? std::log(sk) : -std::numeric_limits<acc_t>::infinity();
    at::parallel_for(0, N * H, task_grain(Lq * M * L * P, D), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> buf(D);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / H, hh = t % H;
        for (int64_t q = 0; q < Lq; ++q) {
          const int64_t nq = n * Lq + q, row = nq * H + hh;
          const acc_t* z = Z + row * M * L * P;
          // the joint softmax over visible (m, l, p), started at the sink: max, then sum
          acc_t mx = log_sink;
          vis.each(nq, [&](int64_t m) {
            for (int64_t i = m * L * P; i < (m + 1) * L * P; ++i) mx = std::max(mx, z[i]);
          });
          std::fill(buf.begin(), buf.end(), acc_t(0));
          acc_t lse_v = -std::numeric_limits<acc_t>::infinity();
          if (mx > -std::numeric_limits<acc_t>::infinity()) {
            acc_t sum = sk * std::exp(-mx);
            vis.each(nq, [&](int64_t m) {
              for (int64_t i = m * L * P; i < (m + 1) * L * P; ++i) sum += std::exp(z[i] - mx);
            });
            lse_v = mx + std::log(sum);
            const acc_t rx = R[2 * nq], ry = R[2 * nq + 1];
            vis.each(nq, [&](int64_t m) {
              const scalar_t* Vm = V + ((n * M + m) * S * H + hh) * D;
              const acc_t* o = OFF + (row * M + m) * P * 2;
              for (int64_t l = 0; l < L; ++l) {
                const Level& e = lv[l];
                for (int64_t p = 0; p < P; ++p) {
                  const acc_t a = std::exp(z[(m * L + l) * P + p] - lse_v);
                  sample_add(Vm + e.start * H * D, H * D, e.h, e.w, rx + o[2 * p] * K[2 * l],
                             ry + o[2 * p + 1] * K[2 * l + 1], a, D, buf.data());
                }
              }
            });
          }
          LSE[row] = lse_v;
          scalar_t* dst = O + row * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(buf[d]);
        }
      }
    });
  });
}

// grad (N, Lq, H*D) and lse (N, Lq, H) in acc_t. Writes in acc_t, in full: grad_value
// (N, M, S, H, D), grad_ref_heads (N, Lq, H, 2) (dL/dr per head; the caller sums the heads in a
// fixed order), grad_off (N, Lq, H, M, P, 2), grad_logits (N, Lq, H, M, L, P).
void mmfs_backward(const at::Tensor& grad, const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& ref, const at::Tensor& off,
                   const at::Tensor& logits, const at::Tensor& visible, const at::Tensor& scale, double sink,
                   const at::Tensor& lse, at::Tensor grad_value, at::Tensor grad_ref_heads, at::Tensor grad_off,
                   at::Tensor grad_logits) {
  check_value(value, 5);
  const auto lv = levels(spatial_shapes, level_start_index, value.size(2));
  const MmfsShape s = check_mmfs(value, ref, off, logits, scale, static_cast<int64_t>(lv.size()));
  const Visibility vis(visible, s.N, s.Lq, s.M);
  const int64_t N = s.N, M = s.M, S = s.S, H = s.H, D = s.D, Lq = s.Lq, L = s.L, P = s.P;
  const auto acc = acc_type(value);
  check(grad, "grad_out", acc, {N, Lq, H * D});
  check(lse, "lse", acc, {N, Lq, H});
  check(grad_value, "grad_value", acc, {N, M, S, H, D});
  check(grad_ref_heads, "grad_reference_points", acc, {N, Lq, H, 2});
  check(grad_off, "grad_offsets", acc, {N, Lq, H, M, P, 2});
  check(grad_logits, "grad_logits", acc, {N, Lq, H, M, L, P});
  (void)sink;  // enters through lse
  MOSS_DEFORM_DISPATCH(value.scalar_type(), "moss_mmfs_backward", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* V = value.const_data_ptr<scalar_t>();
    const acc_t* R = ref.const_data_ptr<acc_t>();
    const acc_t* OFF = off.const_data_ptr<acc_t>();
    const acc_t* Z = logits.const_data_ptr<acc_t>();
    const acc_t* K = scale.const_data_ptr<acc_t>();
    const acc_t* G = grad.const_data_ptr<acc_t>();
    const acc_t* LSE = lse.const_data_ptr<acc_t>();
    acc_t* GV = grad_value.mutable_data_ptr<acc_t>();
    acc_t* GR = grad_ref_heads.mutable_data_ptr<acc_t>();
    acc_t* GO = grad_off.mutable_data_ptr<acc_t>();
    acc_t* GZ = grad_logits.mutable_data_ptr<acc_t>();
    at::parallel_for(0, N * H, task_grain(Lq * M * L * P + M * S, D), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / H, hh = t % H;
        for (int64_t m = 0; m < M; ++m) zero_rows(GV + ((n * M + m) * S * H + hh) * D, S, H * D, D);
        for (int64_t q = 0; q < Lq; ++q) {
          const int64_t nq = n * Lq + q, row = nq * H + hh;
          const acc_t* z = Z + row * M * L * P;
          const acc_t* g = G + row * D;
          const acc_t lse_v = LSE[row];
          acc_t* gz = GZ + row * M * L * P;
          acc_t* go = GO + row * M * P * 2;
          std::fill(gz, gz + M * L * P, acc_t(0));  // invisible entries: 0
          std::fill(go, go + M * P * 2, acc_t(0));
          acc_t grx = 0, gry = 0, delta = 0;
          const acc_t rx = R[2 * nq], ry = R[2 * nq + 1];
          vis.each(nq, [&](int64_t m) {
            const int64_t vbase = ((n * M + m) * S * H + hh) * D;
            const acc_t* o = OFF + (row * M + m) * P * 2;
            for (int64_t l = 0; l < L; ++l) {
              const Level& e = lv[l];
              const int64_t lvl = vbase + e.start * H * D;
              for (int64_t p = 0; p < P; ++p) {
                const int64_t i = (m * L + l) * P + p;
                const acc_t a = std::exp(z[i] - lse_v);
                acc_t gx, gy;
                sample_backward(V + lvl, GV + lvl, H * D, e.h, e.w, rx + o[2 * p] * K[2 * l],
                                ry + o[2 * p + 1] * K[2 * l + 1], a, g, D, &gz[i], &gx, &gy);
                delta += a * gz[i];
                go[(m * P + p) * 2] += gx * K[2 * l];
                go[(m * P + p) * 2 + 1] += gy * K[2 * l + 1];
                grx += gx;
                gry += gy;
              }
            }
          });
          // dL/dz = A * (<g, Samp> - delta), delta = sum_visible A * <g, Samp>
          vis.each(nq, [&](int64_t m) {
            for (int64_t i = m * L * P; i < (m + 1) * L * P; ++i) gz[i] = std::exp(z[i] - lse_v) * (gz[i] - delta);
          });
          GR[2 * row] = grx;
          GR[2 * row + 1] = gry;
        }
      }
    });
  });
}

}  // namespace

void register_deform_attn(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("ms_deform_forward", &ms_deform_forward, "ms_deform_attn forward into out (deform_reference.py)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("out"));
  m.def("ms_deform_backward", &ms_deform_backward, "ms_deform_attn gradients into the given buffers",
        py::arg("grad_out"), py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("grad_value"),
        py::arg("grad_locations"), py::arg("grad_weights"));
  m.def("mmfs_forward", &mmfs_forward, "mmfs_attn forward into out and lse (deform_reference.py)", py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("reference_points"),
        py::arg("sampling_offsets"), py::arg("attention_logits"), py::arg("visible"), py::arg("offset_scale"),
        py::arg("sink"), py::arg("out"), py::arg("lse"));
  m.def("mmfs_backward", &mmfs_backward, "mmfs_attn gradients into the given buffers", py::arg("grad_out"),
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("reference_points"),
        py::arg("sampling_offsets"), py::arg("attention_logits"), py::arg("visible"), py::arg("offset_scale"),
        py::arg("sink"), py::arg("lse"), py::arg("grad_value"), py::arg("grad_reference_points"),
        py::arg("grad_offsets"), py::arg("grad_logits"));
}

}  // namespace moss::cpu
