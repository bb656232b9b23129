// CPU backward, deterministic (no atomics, weight gradients summed block by block in a fixed
// order). The conv's transpose gathers dz through conv_targets: dP[t, tap] = dz[targets[t, tap]],
// dK_all = dP^T x_img, dx_img = dP K_all. dz is written straight into dP's own-tap column (tap
// k*k-1 of token t targets t itself), so dz is never a separate buffer.
#include "cpu_ops.h"
#include "rows.h"

namespace moss::cpu {

// Fills dP[t, tap] (tap < kk-1) from the own-tap column: dP[targets[t, tap], kk-1] or 0.
static void gather_taps(float* dP, const int64_t* targets, int64_t n, int64_t kk, int64_t r) {
  at::parallel_for(0, n, row_grain(kk * r), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      for (int64_t tap = 0; tap + 1 < kk; ++tap) {
        float* o = dP + (t * kk + tap) * r;
        const int64_t u = targets[t * kk + tap];
        if (u < 0) {
          std::fill(o, o + r, 0.0f);
        } else {
          const float* src = dP + (u * kk + kk - 1) * r;
          std::copy(src, src + r, o);
        }
      }
    }
  });
}

// One adapter's backward over `rows`, given its down-projection weight as a (R, d_in) matrix
// `down` and dR (n, R): text R = r_t, dR = g B_t; image R = k*k*r, dR = dP (needs every dz first,
// hence after up_backward).  d_down = dR^T x[rows];  dx[rows] = dR down.
static void down_backward(const at::Tensor& x, const int64_t* rows, int64_t n, const at::Tensor& dR,
                          const at::Tensor& down, at::Tensor& d_down, at::Tensor* dx) {
  bool first = true;  // beta = 0 on the first block: d_down starts uninitialised
  for_row_blocks(x, rows, n, [&](const at::Tensor& xb, const RowBlock& b, bool scratch) {
    const at::Tensor dRb = dR.narrow(0, b.b0, b.nb);
    d_down.addmm_(dRb.t(), xb, first ? 0.0 : 1.0);
    first = false;
    if (!dx) return;
    if (!scratch) {  // a direct run of fp32 rows: dx's rows are written in place
      at::Tensor dst = dx->narrow(0, b.first, b.nb);
      at::mm_out(dst, dRb, down);
      return;
    }
    at::Tensor xbuf = xb;  // the gathered x block is consumed: its buffer takes dx's block
    at::mm_out(xbuf, dRb, down);
    scatter_rows(*dx, rows + b.b0, b.nb, xbuf.data_ptr<float>(), x.size(1));
  });
}

// d_up = scale g[rows]^T h,  dR_cols = scale g[rows] up  (dR_cols may be a column slice of a wider
// matrix). Direct runs of a fp32 gradient are read in place; the rest is gathered (and scaled).
static void up_backward(const at::Tensor& grad, const int64_t* rows, int64_t n, const at::Tensor& h,
                        const at::Tensor& up, float scale, at::Tensor& d_up, at::Tensor& dR_cols) {
  const int64_t d_out = grad.size(1), blk = block_rows(d_out);
  at::Tensor gbuf;
  bool first = true;
  for (const RowBlock& b : plan_row_blocks(rows, n, blk, direct_ok(grad))) {
    at::Tensor dst = dR_cols.narrow(0, b.b0, b.nb);
    const at::Tensor hb = h.narrow(0, b.b0, b.nb);
    const double beta = first ? 0.0 : 1.0;
    first = false;
    if (b.direct) {
      const at::Tensor gb = grad.narrow(0, b.first, b.nb);
      d_up.addmm_(gb.t(), hb, beta, scale);
      at::addmm_out(dst, dst, gb, up, 0.0, scale);  // beta = 0: dst's old contents are ignored
      continue;
    }
    if (!gbuf.defined()) gbuf = at::empty({std::min(n, blk), d_out}, grad.options().dtype(at::kFloat));
    at::Tensor gb = gbuf.narrow(0, 0, b.nb);
    gather_rows(grad, rows + b.b0, b.nb, gb.data_ptr<float>(), scale);
    d_up.addmm_(gb.t(), hb, beta);
    at::mm_out(dst, gb, up);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& text_rows, const at::Tensor& image_rows,
    const at::Tensor& conv_targets, const at::Tensor& text_a, const at::Tensor& text_b,
    const at::Tensor& image_weight, const at::Tensor& image_b, const at::Tensor& text_h, const at::Tensor& image_z,
    double scale, bool needs_x) {
  const float s = static_cast<float>(scale);
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t N = x.size(0), d_in = x.size(1), n_t = text_rows.numel(), n_i = image_rows.numel();
  at::Tensor dx;
  if (needs_x) {
    // Rows no adapter covers get zero; skip the zero fill when both adapters cover every row.
    const bool covered = text_a.defined() && image_weight.defined() && n_t + n_i == N;
    dx = covered ? at::empty({N, d_in}, x.options()) : at::zeros({N, d_in}, x.options());
  }
  at::Tensor d_ta, d_tb, d_w, d_ib;
  if (text_a.defined()) {
    at::Tensor A = as_f32(text_a);
    // Without rows the gradients are zero; with rows the first block's GEMM overwrites them.
    d_ta = n_t > 0 ? at::empty(A.sizes(), f32) : at::zeros(A.sizes(), f32);
    d_tb = n_t > 0 ? at::empty(text_b.sizes(), f32) : at::zeros(text_b.sizes(), f32);
    if (n_t > 0) {
      const int64_t* rows = text_rows.data_ptr<int64_t>();
      at::Tensor dh = at::empty({n_t, A.size(0)}, f32);
      up_backward(grad_out, rows, n_t, text_h, as_f32(text_b), s, d_tb, dh);
      down_backward(x, rows, n_t, dh, A, d_ta, needs_x ? &dx : nullptr);
    }
    d_ta = d_ta.to(text_a.scalar_type());
    d_tb = d_tb.to(text_b.scalar_type());
  }
  if (image_weight.defined()) {
    const int64_t r = image_weight.size(0), k = image_weight.size(2), kk = k * k;
    at::Tensor dK = n_i > 0 ? at::empty({kk * r, d_in}, f32) : at::zeros({kk * r, d_in}, f32);
    d_ib = n_i > 0 ? at::empty(image_b.sizes(), f32) : at::zeros(image_b.sizes(), f32);
    if (n_i > 0) {
      const int64_t* rows = image_rows.data_ptr<int64_t>();
      at::Tensor dP = at::empty({n_i, kk * r}, f32);
      at::Tensor own = dP.narrow(1, (kk - 1) * r, r);  // dz lands in the own-tap column
      up_backward(grad_out, rows, n_i, image_z, as_f32(image_b), s, d_ib, own);
      gather_taps(dP.data_ptr<float>(), conv_targets.data_ptr<int64_t>(), n_i, kk, r);
      down_backward(x, rows, n_i, dP, stacked_taps(image_weight), dK, needs_x ? &dx : nullptr);
    }
    d_w = unstack_taps(dK, image_weight);
    d_ib = d_ib.to(image_b.scalar_type());
  }
  return {dx, d_ta, d_tb, d_w, d_ib};
}

}  // namespace moss::cpu
