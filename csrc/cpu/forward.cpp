// CPU forward: the rank-space identity (README, "How it is built"). Image rows: P = x_img K_all^T as one GEMM
// (gathered in cache-sized blocks), z = masked r-wide shifts of P, out += scale * z B_i^T. Text
// rows: h = x_txt A_t^T, out += scale * h B_t^T. Pending sums of a state are read before any is
// written (a slot read by this call may be rewritten by it).
#include "cpu_ops.h"
#include "rows.h"

namespace moss::cpu {

// dst (n, m) fp32 = x[rows] @ wT, wT: (d_in, m) fp32 (a transposed view is fine: BLAS transposes).
static void down_project(const at::Tensor& x, const int64_t* rows, int64_t n, const at::Tensor& wT,
                         at::Tensor& dst) {
  for_row_blocks(x, rows, n, [&](const at::Tensor& xb, const RowBlock& b, bool) {
    at::Tensor dst_b = dst.narrow(0, b.b0, b.nb);
    at::mm_out(dst_b, xb, wT);
  });
}

// out[rows] += scale * (h @ bT): straight into out's rows for direct runs, else through a fp32
// delta buffer of at most block_rows(d_out) rows.
static void up_project_add(at::Tensor& out, const int64_t* rows, const at::Tensor& h, const at::Tensor& bT,
                           float scale) {
  const int64_t n = h.size(0), d_out = out.size(1), blk = block_rows(d_out);
  at::Tensor buf;
  for (const RowBlock& b : plan_row_blocks(rows, n, blk, direct_ok(out))) {
    const at::Tensor hb = h.narrow(0, b.b0, b.nb);
    if (b.direct) {
      out.narrow(0, b.first, b.nb).addmm_(hb, bT, 1.0, scale);
      continue;
    }
    if (!buf.defined()) buf = at::empty({std::min(n, blk), d_out}, h.options());
    at::Tensor db = buf.narrow(0, 0, b.nb);
    at::mm_out(db, hb, bT);
    scatter_add_rows(out, rows + b.b0, b.nb, db.data_ptr<float>(), d_out, scale);
  }
}

// z[t] = sum over taps with sources[t, tap] >= 0 of P[sources[t, tap], tap]: the masked r-wide
// shifts. P: (n_src, kk, r) fp32; z: (n, r) fp32.
static void shift_sum(const float* P, const int64_t* sources, int64_t n, int64_t kk, int64_t r, float* z) {
  at::parallel_for(0, n, row_grain(kk * r), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* o = z + t * r;
      std::fill(o, o + r, 0.0f);
      for (int64_t tap = 0; tap < kk; ++tap) {
        const int64_t s = sources[t * kk + tap];
        if (s < 0) continue;
        const float* p = P + (s * kk + tap) * r;
        for (int64_t c = 0; c < r; ++c) o[c] += p[c];
      }
    }
  });
}

static void state_update(const float* P, float* z, int64_t kk, int64_t r, const StateArgs& st) {
  at::Tensor pend = st.pending;
  const int64_t n_read = st.read_tokens.numel(), n_write = st.write_slots.numel();
  const int64_t* rt = st.read_tokens.data_ptr<int64_t>();
  const int64_t* rs = st.read_slots.data_ptr<int64_t>();
  const int64_t* ws = st.write_slots.data_ptr<int64_t>();
  const bool* keep = st.write_keep.data_ptr<bool>();
  // What this call leaves: the taps of its tokens that reach each written position.
  at::Tensor left = at::empty({n_write, r}, at::kFloat);
  float* lp = left.data_ptr<float>();
  shift_sum(P, st.write_sources.data_ptr<int64_t>(), n_write, kk, r, lp);
  MOSS_DISPATCH_FLOATS(pend.scalar_type(), "moss_state_update", [&] {
    scalar_t* pp = pend.data_ptr<scalar_t>();
    // Phase 1: tokens continuing an image add what earlier calls left for them (distinct tokens).
    at::parallel_for(0, n_read, row_grain(r), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        float* o = z + rt[i] * r;
        const scalar_t* s = pp + rs[i] * r;
        for (int64_t c = 0; c < r; ++c) o[c] += static_cast<float>(s[c]);
      }
    });
    // Phase 2 (after every read): rewrite the slots of the positions this call leaves sums for.
    at::parallel_for(0, n_write, row_grain(r), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        scalar_t* s = pp + ws[i] * r;
        const float* l = lp + i * r;
        for (int64_t c = 0; c < r; ++c)
          s[c] = static_cast<scalar_t>(l[c] + (keep[i] ? static_cast<float>(s[c]) : 0.0f));
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, at::Tensor& out, const at::Tensor& text_rows,
                                           const at::Tensor& image_rows, const at::Tensor& conv_sources,
                                           const at::Tensor& text_a, const at::Tensor& text_b,
                                           const at::Tensor& image_weight, const at::Tensor& image_b, double scale,
                                           const StateArgs& state) {
  const float s = static_cast<float>(scale);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor text_h, image_z;
  const int64_t n_t = text_rows.numel(), n_i = image_rows.numel();
  if (text_a.defined() && n_t > 0) {
    const int64_t* rows = text_rows.data_ptr<int64_t>();
    text_h = at::empty({n_t, text_a.size(0)}, f32);
    down_project(x, rows, n_t, as_f32(text_a).t(), text_h);
    up_project_add(out, rows, text_h, as_f32(text_b).t(), s);
  }
  if (image_weight.defined() && n_i > 0) {
    const int64_t r = image_weight.size(0), k = image_weight.size(2), kk = k * k;
    const int64_t* rows = image_rows.data_ptr<int64_t>();
    at::Tensor P = at::empty({n_i, kk * r}, f32);
    down_project(x, rows, n_i, stacked_taps(image_weight).t(), P);
    image_z = at::empty({n_i, r}, f32);
    shift_sum(P.data_ptr<float>(), conv_sources.data_ptr<int64_t>(), n_i, kk, r, image_z.data_ptr<float>());
    if (state.pending.defined()) state_update(P.data_ptr<float>(), image_z.data_ptr<float>(), kk, r, state);
    up_project_add(out, rows, image_z, as_f32(image_b).t(), s);
  }
  return {text_h, image_z};
}

}  // namespace moss::cpu
