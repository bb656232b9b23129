// The torch side of the CUDA kernels (CUDA builds only): tensors -> raw pointers, sizes and the
// current stream, then the launch sequence of each job. The binding has checked every tensor.
//
// Forward, fused (cuda/fused_forward.cu, the default wherever it applies): one launch for both
// modalities, gather + conv-down over all taps with masked padding + up-projection + in-place add.
// Forward, split (with a pending state: the ring writes need the per-tap P; ranks the fused kernel
// cannot hold; or set_cuda_forward_path("split")): [text] h = x_t A_t^T; out[text] += s h B_t^T.
// [image] P = x_i K_all^T (all taps, one GEMM, rows gathered in the loads); z = masked shifts of P
// (+ state reads, then writes); out[image] += s z B_i^T (up-projection fused with the scatter-add).
// Backward: dz = s g B_i written into dP's own-tap column; dP's other taps gathered via
// conv_targets; dK_all = dP^T x_i; dx_i = dP K_all; dB_i = s g^T z; text likewise.
#include "cuda_dispatch.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "include/moss_cuda.h"
#include "include/moss_index.h"

namespace moss::dispatch {
namespace {

using moss::cuda::DType;
using moss::cuda::Operand;
using moss::cuda::Output;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    case at::kFloat: return DType::kF32;
    default: TORCH_CHECK_TYPE(false, "moss_kernels native (CUDA): unsupported dtype ", t.scalar_type());
  }
}

// Row-major matrix operand (rows optionally gathered).
Operand rows_of(const at::Tensor& t, const at::Tensor& gather = at::Tensor()) {
  return {t.data_ptr(), dtype_of(t), t.stride(0), 1, gather.defined() ? gather.data_ptr<int64_t>() : nullptr,
          nullptr};
}

// The transpose of a row-major matrix (its rows become columns; optionally gathered).
Operand transposed(const at::Tensor& t, const at::Tensor& gather = at::Tensor()) {
  return {t.data_ptr(), dtype_of(t), 1, t.stride(0), nullptr,
          gather.defined() ? gather.data_ptr<int64_t>() : nullptr};
}

Output store(const at::Tensor& t, float alpha = 1.0f, const at::Tensor& rows = at::Tensor(), bool add = false,
             int64_t col0 = 0) {
  auto* base = static_cast<char*>(t.data_ptr()) + col0 * t.element_size();
  return {base, dtype_of(t), t.stride(0), rows.defined() ? rows.data_ptr<int64_t>() : nullptr, add, alpha};
}

at::Tensor stacked_taps(const at::Tensor& w) {
  const int64_t r = w.size(0), d_in = w.size(1), k = w.size(2);
  return w.permute({2, 3, 0, 1}).reshape({k * k * r, d_in}).contiguous();
}

void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch() { C10_CUDA_CHECK(cudaGetLastError()); }

// The one mixed-dtype policy of every backend (README "dtypes"): MMA operands are rounded to a half
// type only when x and every weight given share it; any mix computes with fp32 operands (the
// values as given, nothing rounded), always with fp32 accumulation.
DType compute_of(const at::Tensor& x, std::initializer_list<at::Tensor> others) {
  for (const at::Tensor& t : others)
    if (t.defined() && t.scalar_type() != x.scalar_type()) return DType::kF32;
  return dtype_of(x);
}

// The compute type of a GEMM with a fp32 rank-space operand (h, z, dh, dP): rank-space sums of fp16
// inputs pass fp16's 65504 long before the outputs do, so they are rounded to bf16 (fp32's range)
// instead (triton_kernels._common.rank_dot).
DType rank_compute(DType compute) { return compute == DType::kF16 ? DType::kBF16 : compute; }

// One modality of the fused forward; absent (n = r = 0) when the adapter or its rows are.
cuda::FusedModality fused_modality(const at::Tensor& rows, const at::Tensor& sources, int64_t kk,
                                   const at::Tensor& down, const at::Tensor& up, const at::Tensor& z) {
  cuda::FusedModality m{};
  if (!z.defined()) return m;
  m.rows = rows.data_ptr<int64_t>();
  m.n = rows.numel();
  m.sources = sources.defined() ? sources.data_ptr<int64_t>() : nullptr;
  m.kk = kk;
  m.down = down.data_ptr();
  m.down_dtype = dtype_of(down);
  m.up = up.data_ptr();
  m.up_dtype = dtype_of(up);
  m.r = z.size(1);
  m.z = z.data_ptr<float>();
  return m;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cuda_forward(const at::Tensor& x, at::Tensor& out, const at::Tensor& text_rows,
                                                const at::Tensor& image_rows, const at::Tensor& conv_sources,
                                                const at::Tensor& text_a, const at::Tensor& text_b,
                                                const at::Tensor& image_weight, const at::Tensor& image_b,
                                                double scale, const at::Tensor& pending,
                                                const at::Tensor& read_tokens, const at::Tensor& read_slots,
                                                const at::Tensor& write_slots, const at::Tensor& write_sources,
                                                const at::Tensor& write_keep) {
  const c10::cuda::CUDAGuard guard(x.device());
  const DType compute = compute_of(x, {text_a, text_b, image_weight, image_b});
  const auto f32 = x.options().dtype(at::kFloat);
  const float s = static_cast<float>(scale);
  const int64_t d_in = x.size(1), d_out = out.size(1), n_t = text_rows.numel(), n_i = image_rows.numel();
  at::Tensor text_h, image_z;
  const bool text = text_a.defined() && n_t > 0, image = image_weight.defined() && n_i > 0;
  const auto path = forward_path();
  // "auto" takes the fused kernel wherever it applies, whatever the number of rows: choosing by the
  // batch's row count would make a sequence's bits depend on what else is in the batch (the two
  // paths round and reduce differently). The fused kernel reads x in the compute type, so a mixed
  // call (compute fp32, x half) runs the split path.
  // fp16 runs the split path too: the fused kernel rounds its z panel to the compute type.
  const bool fusable = compute == dtype_of(x) && compute != DType::kF16;
  TORCH_CHECK(path != ForwardPath::kFused || fusable, "moss_kernels native (CUDA): the fused forward path cannot "
              "run float16, or a call whose weights' dtypes differ from x's; use set_cuda_forward_path('auto')");
  if (fusable && (path == ForwardPath::kFused || path == ForwardPath::kAuto)) {
    TORCH_CHECK(path != ForwardPath::kFused || !pending.defined(), "moss_kernels native (CUDA): the fused forward "
                "path cannot continue a pending state (chunked prefill runs the split path); use "
                "set_cuda_forward_path('auto')");
    if (!pending.defined()) {
      // Weights as contiguous row-major matrices; the conv taps stacked (kk * r, d_in).
      const at::Tensor A = text ? text_a.contiguous() : at::Tensor(), Bt = text ? text_b.contiguous() : at::Tensor();
      const at::Tensor K = image ? stacked_taps(image_weight) : at::Tensor();
      const at::Tensor Bi = image ? image_b.contiguous() : at::Tensor();
      const int64_t kk = image ? image_weight.size(2) * image_weight.size(3) : 1;
      // Every element of text_h / image_z is written by the kernel (empty, not zeros).
      at::Tensor th = text ? at::empty({n_t, A.size(0)}, f32) : at::Tensor();
      at::Tensor iz = image ? at::empty({n_i, image_weight.size(0)}, f32) : at::Tensor();
      cuda::FusedForwardArgs args{};
      args.compute = compute;
      args.x = x.data_ptr();
      args.ldx = x.stride(0);
      args.d_in = d_in;
      args.out = out.data_ptr();
      args.out_dtype = dtype_of(out);
      args.ld_out = out.stride(0);
      args.d_out = d_out;
      args.scale = s;
      args.text = fused_modality(text_rows, at::Tensor(), 1, A, Bt, th);
      args.image = fused_modality(image_rows, conv_sources, kk, K, Bi, iz);
      const char* why = "";
      if (cuda::fused_forward(args, stream(), &why)) {
        check_launch();
        return {th, iz};
      }
      TORCH_CHECK(path != ForwardPath::kFused, "moss_kernels native (CUDA): the fused forward path cannot run this "
                  "call: ", why, "; use set_cuda_forward_path('auto') to fall back to the split path");
    }
  }
  if (text) {
    const at::Tensor A = text_a.contiguous(), B = text_b.contiguous();
    const int64_t rt = A.size(0);
    text_h = at::empty({n_t, rt}, f32);
    cuda::gemm(n_t, rt, d_in, rows_of(x, text_rows), transposed(A), store(text_h), compute, stream());
    cuda::gemm(n_t, d_out, rt, rows_of(text_h), transposed(B), store(out, s, text_rows, true), rank_compute(compute),
               stream());
    check_launch();
  }
  if (image) {
    const int64_t r = image_weight.size(0), kk = image_weight.size(2) * image_weight.size(3);
    const at::Tensor K = stacked_taps(image_weight), B = image_b.contiguous();
    const at::Tensor P = at::empty({n_i, kk * r}, f32);
    cuda::gemm(n_i, kk * r, d_in, rows_of(x, image_rows), transposed(K), store(P), compute, stream());
    image_z = at::empty({n_i, r}, f32);
    cuda::shift_sum(P.data_ptr<float>(), conv_sources.data_ptr<int64_t>(), n_i, kk, r, image_z.data_ptr<float>(),
                    stream());
    if (pending.defined()) {
      at::Tensor pf = pending.scalar_type() == at::kFloat ? pending : pending.to(at::kFloat);
      cuda::state_update(P.data_ptr<float>(), image_z.data_ptr<float>(), kk, r, pf.data_ptr<float>(),
                         read_tokens.data_ptr<int64_t>(), read_slots.data_ptr<int64_t>(), read_tokens.numel(),
                         write_slots.data_ptr<int64_t>(), write_sources.data_ptr<int64_t>(),
                         write_keep.data_ptr<bool>(), write_slots.numel(), stream());
      if (!pf.is_same(pending)) pending.copy_(pf);  // a non-fp32 ring went through a fp32 copy
    }
    cuda::gemm(n_i, d_out, r, rows_of(image_z), transposed(B), store(out, s, image_rows, true), rank_compute(compute),
               stream());
    check_launch();
  }
  return {text_h, image_z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& text_rows, const at::Tensor& image_rows,
    const at::Tensor& conv_targets, const at::Tensor& text_a, const at::Tensor& text_b,
    const at::Tensor& image_weight, const at::Tensor& image_b, const at::Tensor& text_h, const at::Tensor& image_z,
    double scale, bool needs_x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const DType compute = compute_of(x, {grad_out, text_a, text_b, image_weight, image_b});
  const auto f32 = x.options().dtype(at::kFloat);
  const float s = static_cast<float>(scale);
  const int64_t N = x.size(0), d_in = x.size(1), d_out = grad_out.size(1);
  const int64_t n_t = text_rows.numel(), n_i = image_rows.numel();
  at::Tensor dx;
  if (needs_x) {
    const bool covered = text_a.defined() && image_weight.defined() && n_t + n_i == N;
    dx = covered ? at::empty({N, d_in}, x.options()) : at::zeros({N, d_in}, x.options());
  }
  at::Tensor d_ta, d_tb, d_w, d_ib;
  if (text_a.defined()) {
    const at::Tensor A = text_a.contiguous(), B = text_b.contiguous();
    const int64_t rt = A.size(0);
    d_ta = at::zeros({rt, d_in}, f32);
    d_tb = at::zeros({d_out, rt}, f32);
    if (n_t > 0) {
      const at::Tensor dh = at::empty({n_t, rt}, f32);
      const DType rc = rank_compute(compute);
      cuda::gemm(d_out, rt, n_t, transposed(grad_out, text_rows), rows_of(text_h), store(d_tb, s), rc, stream());
      cuda::gemm(n_t, rt, d_out, rows_of(grad_out, text_rows), rows_of(B), store(dh, s), compute, stream());
      cuda::gemm(rt, d_in, n_t, transposed(dh), rows_of(x, text_rows), store(d_ta), rc, stream());
      if (needs_x) cuda::gemm(n_t, d_in, rt, rows_of(dh), rows_of(A), store(dx, 1.0f, text_rows), rc, stream());
      check_launch();
    }
    d_ta = d_ta.to(text_a.scalar_type());
    d_tb = d_tb.to(text_b.scalar_type());
  }
  if (image_weight.defined()) {
    const int64_t r = image_weight.size(0), k = image_weight.size(2), kk = k * k;
    at::Tensor dK = at::zeros({kk * r, d_in}, f32);
    d_ib = at::zeros({d_out, r}, f32);
    if (n_i > 0) {
      const at::Tensor K = stacked_taps(image_weight), B = image_b.contiguous();
      const at::Tensor dP = at::empty({n_i, kk * r}, f32);
      const DType rc = rank_compute(compute);
      cuda::gemm(d_out, r, n_i, transposed(grad_out, image_rows), rows_of(image_z), store(d_ib, s), rc, stream());
      cuda::gemm(n_i, r, d_out, rows_of(grad_out, image_rows), rows_of(B), store(dP, s, {}, false, (kk - 1) * r),
                 compute, stream());
      cuda::fill_taps(dP.data_ptr<float>(), conv_targets.data_ptr<int64_t>(), n_i, kk, r, stream());
      cuda::gemm(kk * r, d_in, n_i, transposed(dP), rows_of(x, image_rows), store(dK), rc, stream());
      if (needs_x) cuda::gemm(n_i, d_in, kk * r, rows_of(dP), rows_of(K), store(dx, 1.0f, image_rows), rc,
                              stream());
      check_launch();
    }
    d_w = dK.view({k, k, r, d_in}).permute({2, 3, 0, 1}).to(image_weight.scalar_type()).contiguous();
    d_ib = d_ib.to(image_b.scalar_type());
  }
  return {dx, d_ta, d_tb, d_w, d_ib};
}

void cuda_decode_step(const at::Tensor& x, at::Tensor& out, const at::Tensor& text_a, const at::Tensor& text_b,
                      const at::Tensor& image_weight, const at::Tensor& image_b, double scale, at::Tensor& pending,
                      const at::Tensor& image_pos, const at::Tensor& height, const at::Tensor& width) {
  const c10::cuda::CUDAGuard guard(x.device());
  // The kernel reads x and the weights in one dtype and a fp32 ring. That dtype is x's when every
  // weight shares it, else fp32 (compute_of: a mix is never rounded to half); convert where needed.
  const at::ScalarType ct =
      compute_of(x, {text_a, text_b, image_weight, image_b}) == dtype_of(x) ? x.scalar_type() : at::kFloat;
  const auto as_c = [&](const at::Tensor& t) { return t.defined() ? t.to(ct).contiguous() : t; };
  const at::Tensor xc = x.scalar_type() == ct ? x : x.to(ct).contiguous();
  const at::Tensor ta = as_c(text_a), tb = as_c(text_b), w = as_c(image_weight), ib = as_c(image_b);
  // The kernel writes row b at b * d_out: a row-strided out goes through a contiguous copy (to()
  // alone would return the strided tensor itself when the dtype already matches).
  at::Tensor target = out.scalar_type() == ct && out.is_contiguous() ? out : out.to(ct).contiguous();
  const bool image = w.defined();
  at::Tensor ring = image && pending.scalar_type() != at::kFloat ? pending.to(at::kFloat) : pending;
  cuda::DecodeArgs a{};
  a.dtype = dtype_of(xc);
  a.x = xc.data_ptr();
  a.ldx = xc.stride(0);
  a.out = target.data_ptr();
  a.batch = x.size(0);
  a.d_in = x.size(1);
  a.d_out = out.size(1);
  a.text_a = ta.defined() ? ta.data_ptr() : nullptr;
  a.text_b = tb.defined() ? tb.data_ptr() : nullptr;
  a.r_text = ta.defined() ? ta.size(0) : 0;
  a.image_weight = image ? w.data_ptr() : nullptr;
  a.image_b = image ? ib.data_ptr() : nullptr;
  a.r = image ? w.size(0) : 0;
  a.k = image ? w.size(2) : 1;
  a.scale = static_cast<float>(scale);
  a.pending = image ? ring.data_ptr<float>() : nullptr;
  a.capacity = image ? ring.size(1) : 0;
  a.image_pos = image_pos.data_ptr<int64_t>();
  a.height = height.data_ptr<int64_t>();
  a.width = width.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(a.k <= cuda::kMaxKernelSize, "moss_kernels native (CUDA): decode takes kernel sizes up to ",
                    cuda::kMaxKernelSize, ", got ", a.k);
  // Weight-stationary (cuda/decode.cu): the weights are read in place (no stacked copy), any rank;
  // the fp32 scratch (d_in partial sums, z) comes from the caching allocator, so capture-safe.
  const at::Tensor workspace = at::empty({cuda::decode_workspace_floats(a)}, x.options().dtype(at::kFloat));
  a.workspace = workspace.data_ptr<float>();
  cuda::decode_step(a, stream());
  check_launch();
  if (!ring.is_same(pending)) pending.copy_(ring);
  if (!target.is_same(out)) out.copy_(target);
}

}  // namespace moss::dispatch
