// CPU kernels of the native backend. Arguments follow moss_kernels/reference.py (forward, backward,
// decode_step); an undefined at::Tensor stands for Python's None. The binding checked every tensor.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace moss::cpu {

// The state part of a forward call (reference.forward's `pending` and `state_index`); all
// undefined when the call has no state.
struct StateArgs {
  at::Tensor pending;        // (slots, r) any floating dtype, contiguous; updated in place
  at::Tensor read_tokens;    // (n_read,) int64
  at::Tensor read_slots;     // (n_read,) int64
  at::Tensor write_slots;    // (n_write,) int64
  at::Tensor write_sources;  // (n_write, k*k) int64, -1 = none
  at::Tensor write_keep;     // (n_write,) bool
};

// Accumulates scale * delta into `out` (N, d_out); returns (text_h (n_text, r_t), image_z (n_image, r)),
// fp32, undefined where the adapter is absent or has no rows.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, at::Tensor& out, const at::Tensor& text_rows,
                                           const at::Tensor& image_rows, const at::Tensor& conv_sources,
                                           const at::Tensor& text_a, const at::Tensor& text_b,
                                           const at::Tensor& image_weight, const at::Tensor& image_b, double scale,
                                           const StateArgs& state);

// (dx, d_text_a, d_text_b, d_image_weight, d_image_b): dx in x's dtype (undefined unless needs_x),
// weight gradients in each weight's dtype (undefined where the adapter is absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& text_rows, const at::Tensor& image_rows,
    const at::Tensor& conv_targets, const at::Tensor& text_a, const at::Tensor& text_b,
    const at::Tensor& image_weight, const at::Tensor& image_b, const at::Tensor& text_h, const at::Tensor& image_z,
    double scale, bool needs_x);

// One token per sequence: out (batch, d_out) += scale * delta, pending (batch, capacity, r) updated.
void decode_step(const at::Tensor& x, at::Tensor& out, const at::Tensor& text_a, const at::Tensor& text_b,
                 const at::Tensor& image_weight, const at::Tensor& image_b, double scale, at::Tensor& pending,
                 const at::Tensor& image_pos, const at::Tensor& height, const at::Tensor& width);

}  // namespace moss::cpu
