// The one binding of the native extension: checks every tensor (device, dtype, shape, strides)
// with an error naming the argument, then dispatches to the CPU kernels (csrc/cpu) or, in a CUDA
// build (MOSS_WITH_CUDA), to the torch-free CUDA kernels (csrc/cuda) through cuda_dispatch.cpp.
//
// Arguments mirror moss_kernels/reference.py forward/backward/decode_step; None is an empty
// optional. Rows of x, out and grad_out need a unit column stride; any row stride is fine.
#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <sstream>
#include <string>
#include <tuple>

#include "cpu/cpu_ops.h"
#include "cuda_dispatch.h"

// MOSS_SOURCE_HASH comes from the build as a bare token (see build_config.py).
#define MOSS_STR2(x) #x
#define MOSS_STR(x) MOSS_STR2(x)
#ifndef MOSS_SOURCE_HASH
#define MOSS_SOURCE_HASH unknown
#endif

namespace {

using OptT = c10::optional<at::Tensor>;

at::Tensor opt(const OptT& t) { return t.has_value() ? *t : at::Tensor(); }
OptT wrap(const at::Tensor& t) { return t.defined() ? OptT(t) : OptT(); }

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// Shape check; -1 in `want` matches any size.
void check_shape(const at::Tensor& t, const char* name, std::initializer_list<int64_t> want) {
  bool ok = t.dim() == static_cast<int64_t>(want.size());
  int64_t d = 0;
  for (int64_t w : want) {
    if (ok && w >= 0 && t.size(d) != w) ok = false;
    ++d;
  }
  if (!ok) {
    std::ostringstream s;
    s << "[";
    d = 0;
    for (int64_t w : want) s << (d++ ? ", " : "") << (w >= 0 ? std::to_string(w) : std::string("*"));
    s << "]";
    TORCH_CHECK_VALUE(false, "moss_kernels native: argument '", name, "' must have shape ", s.str(), ", got ",
                      shape_str(t));
  }
}

void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, "moss_kernels native: argument '", name, "' is on ", t.device(),
                    ", but x is on ", device);
}

// An activation or weight: float32/float16/bfloat16 on x's device.
void check_float(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_TYPE(t.defined(), "moss_kernels native: argument '", name, "' is missing");
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "moss_kernels native: argument '",
                   name, "' must be float32, float16 or bfloat16, got ", dt);
  check_device(t, name, device);
}

// Rows addressed through (row stride, unit column stride), as the kernels read them.
void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= 0,
                    "moss_kernels native: argument '", name,
                    "' must be 2-D with unit column stride (rows may be strided), got shape ", shape_str(t),
                    " and strides ", t.strides());
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "moss_kernels native: argument '", name, "' must be contiguous, got strides ",
                    t.strides(), " for shape ", shape_str(t));
}

// An int64 (or bool) index tensor on x's device, contiguous.
void check_index(const at::Tensor& t, const char* name, const at::Device& device,
                 at::ScalarType dtype = at::kLong) {
  TORCH_CHECK_TYPE(t.defined(), "moss_kernels native: argument '", name, "' is missing");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "moss_kernels native: argument '", name, "' must be ", dtype, ", got ",
                   t.scalar_type());
  check_device(t, name, device);
  check_contiguous(t, name);
}

// Every entry of an index tensor in [lo, hi): CPU only (on a GPU this would synchronise; the
// layout built these tables, and the CUDA kernels still skip what is out of range).
void check_range(const at::Tensor& t, const char* name, int64_t lo, int64_t hi) {
  if (!t.device().is_cpu() || t.numel() == 0) return;
  const int64_t* p = t.data_ptr<int64_t>();
  int64_t mn = p[0], mx = p[0];
  for (int64_t i = 1; i < t.numel(); ++i) {
    mn = std::min(mn, p[i]);
    mx = std::max(mx, p[i]);
  }
  TORCH_CHECK_VALUE(mn >= lo && mx < hi, "moss_kernels native: argument '", name, "' holds values in [", mn, ", ",
                    mx, "], outside [", lo, ", ", hi, ")");
}

// An int64 index table of `shape` whose entries lie in [lo, hi).
void check_table(const at::Tensor& t, const char* name, const at::Device& device,
                 std::initializer_list<int64_t> shape, int64_t lo, int64_t hi) {
  check_index(t, name, device);
  check_shape(t, name, shape);
  check_range(t, name, lo, hi);
}

// A 1-D int64 list of row indices into a tensor of `n` rows.
void check_row_list(const at::Tensor& t, const char* name, const at::Device& device, int64_t n) {
  check_table(t, name, device, {-1}, 0, n);
}

// A floating tensor on `device`, contiguous, of `shape`, float32 where `fp32` (the rank-space rows
// z / h saved by the forward) or any floating dtype (a state's ring of pending sums).
void check_buffer(const at::Tensor& t, const char* name, const at::Device& device,
                  std::initializer_list<int64_t> shape, bool fp32) {
  TORCH_CHECK_TYPE(fp32 ? t.scalar_type() == at::kFloat : t.is_floating_point(), "moss_kernels native: argument '",
                   name, "' must be ", fp32 ? "float32" : "floating", ", got ", t.scalar_type());
  check_device(t, name, device);
  check_contiguous(t, name);
  check_shape(t, name, shape);
}

struct Adapters {
  at::Tensor ta, tb, w, ib;
  int64_t r_t = 0, r = 0, k = 0, d_out = -1;
};

// text_a (r_t, d_in) + text_b (d_out, r_t) and image_weight (r, d_in, k, k) + image_b (d_out, r),
// each pair present or absent together, sharing d_out.
Adapters check_adapters(const OptT& text_a, const OptT& text_b, const OptT& image_weight, const OptT& image_b,
                        int64_t d_in, int64_t d_out, const at::Device& dev) {
  Adapters a{opt(text_a), opt(text_b), opt(image_weight), opt(image_b)};
  TORCH_CHECK_VALUE(a.ta.defined() == a.tb.defined(), "moss_kernels native: arguments 'text_a' and 'text_b' must be "
                    "given together");
  TORCH_CHECK_VALUE(a.w.defined() == a.ib.defined(), "moss_kernels native: arguments 'image_weight' and 'image_b' "
                    "must be given together");
  if (a.ta.defined()) {
    check_float(a.ta, "text_a", dev);
    check_float(a.tb, "text_b", dev);
    check_shape(a.ta, "text_a", {-1, d_in});
    a.r_t = a.ta.size(0);
    check_shape(a.tb, "text_b", {d_out, a.r_t});
  }
  if (a.w.defined()) {
    check_float(a.w, "image_weight", dev);
    check_float(a.ib, "image_b", dev);
    check_shape(a.w, "image_weight", {-1, d_in, -1, -1});
    a.r = a.w.size(0);
    a.k = a.w.size(2);
    TORCH_CHECK_VALUE(a.k >= 1 && a.w.size(3) == a.k, "moss_kernels native: argument 'image_weight' must have a "
                      "square kernel (r, d_in, k, k), got ", shape_str(a.w));
    check_shape(a.ib, "image_b", {d_out, a.r});
  }
  return a;
}

// A tensor the kernels write in place: no two of its elements may share memory (an expand()ed
// tensor would be written racily on a GPU), nor may it overlap x.
void check_writable(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "moss_kernels native: argument '", name,
                    "' has elements that share memory (strides ", t.strides(), "); give one with distinct elements");
  const auto status = t.numel() && x.numel() ? at::get_overlap_status(t, x) : at::MemOverlapStatus::No;
  TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
                    "moss_kernels native: argument '", name, "' shares memory with x");
}

void check_x_out(const at::Tensor& x, const at::Tensor& out, const char* out_name) {
  check_float(x, "x", x.device());
  check_rows(x, "x");
  check_float(out, out_name, x.device());
  check_rows(out, out_name);
  // Zero-width rows would reach divisions by the row width in the kernels' work splitting.
  TORCH_CHECK_VALUE(x.size(1) >= 1, "moss_kernels native: argument 'x' must have at least one feature, got shape ",
                    shape_str(x));
  TORCH_CHECK_VALUE(out.size(1) >= 1, "moss_kernels native: argument '", out_name,
                    "' must have at least one column (d_out >= 1), got shape ", shape_str(out));
  if (std::string(out_name) == "out") check_writable(out, out_name, x);
}

std::tuple<OptT, OptT> forward(const at::Tensor& x, at::Tensor out, const at::Tensor& text_rows,
                               const at::Tensor& image_rows, const at::Tensor& conv_sources, const OptT& text_a,
                               const OptT& text_b, const OptT& image_weight, const OptT& image_b, double scale,
                               const OptT& pending, const OptT& read_tokens, const OptT& read_slots,
                               const OptT& write_slots, const OptT& write_sources, const OptT& write_keep) {
  check_x_out(x, out, "out");
  const auto dev = x.device();
  const int64_t N = x.size(0), d_in = x.size(1);
  check_shape(out, "out", {N, -1});
  const Adapters a = check_adapters(text_a, text_b, image_weight, image_b, d_in, out.size(1), dev);
  check_row_list(text_rows, "text_rows", dev, N);
  check_row_list(image_rows, "image_rows", dev, N);
  const int64_t n_i = image_rows.size(0), kk = a.k * a.k;
  moss::cpu::StateArgs st;
  if (a.w.defined()) {
    check_table(conv_sources, "conv_sources", dev, {n_i, kk}, -1, n_i);
  }
  if (pending.has_value()) {
    TORCH_CHECK_VALUE(a.w.defined(), "moss_kernels native: argument 'pending' needs 'image_weight'");
    st.pending = *pending;
    check_buffer(st.pending, "pending", dev, {-1, a.r}, false);
    const int64_t slots = st.pending.size(0);
    st.read_tokens = opt(read_tokens);
    st.read_slots = opt(read_slots);
    st.write_slots = opt(write_slots);
    st.write_sources = opt(write_sources);
    st.write_keep = opt(write_keep);
    check_table(st.read_tokens, "read_tokens", dev, {-1}, 0, n_i);
    check_table(st.read_slots, "read_slots", dev, {st.read_tokens.size(0)}, 0, slots);
    check_table(st.write_slots, "write_slots", dev, {-1}, 0, slots);
    const int64_t n_w = st.write_slots.size(0);
    check_table(st.write_sources, "write_sources", dev, {n_w, kk}, -1, n_i);
    check_index(st.write_keep, "write_keep", dev, at::kBool);
    check_shape(st.write_keep, "write_keep", {n_w});
  }
  if (moss::dispatch::cpu_kernels(dev)) {
    auto [th, iz] = moss::cpu::forward(x, out, text_rows, image_rows, conv_sources, a.ta, a.tb, a.w, a.ib, scale, st);
    return {wrap(th), wrap(iz)};
  }
  auto [th, iz] = moss::dispatch::cuda_forward(x, out, text_rows, image_rows, conv_sources, a.ta, a.tb, a.w, a.ib,
                                               scale, st.pending, st.read_tokens, st.read_slots, st.write_slots,
                                               st.write_sources, st.write_keep);
  return {wrap(th), wrap(iz)};
}

std::tuple<OptT, OptT, OptT, OptT, OptT> backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                  const at::Tensor& text_rows, const at::Tensor& image_rows,
                                                  const at::Tensor& conv_targets, const OptT& text_a,
                                                  const OptT& text_b, const OptT& image_weight, const OptT& image_b,
                                                  const OptT& text_h, const OptT& image_z, double scale,
                                                  bool needs_x) {
  check_x_out(x, grad_out, "grad_out");
  const auto dev = x.device();
  const int64_t N = x.size(0), d_in = x.size(1);
  check_shape(grad_out, "grad_out", {N, -1});
  const Adapters a = check_adapters(text_a, text_b, image_weight, image_b, d_in, grad_out.size(1), dev);
  check_row_list(text_rows, "text_rows", dev, N);
  check_row_list(image_rows, "image_rows", dev, N);
  const int64_t n_t = text_rows.size(0), n_i = image_rows.size(0);
  at::Tensor th = opt(text_h), iz = opt(image_z);
  if (a.ta.defined() && n_t > 0) {
    TORCH_CHECK_VALUE(th.defined(), "moss_kernels native: argument 'text_h' is required with text rows");
    check_buffer(th, "text_h", dev, {n_t, a.r_t}, true);
  }
  if (a.w.defined() && n_i > 0) {
    TORCH_CHECK_VALUE(iz.defined(), "moss_kernels native: argument 'image_z' is required with image rows");
    check_buffer(iz, "image_z", dev, {n_i, a.r}, true);
    check_table(conv_targets, "conv_targets", dev, {n_i, a.k * a.k}, -1, n_i);
  }
  auto grads = moss::dispatch::cpu_kernels(dev)
                   ? moss::cpu::backward(grad_out, x, text_rows, image_rows, conv_targets, a.ta, a.tb, a.w, a.ib,
                                         th, iz, scale, needs_x)
                   : moss::dispatch::cuda_backward(grad_out, x, text_rows, image_rows, conv_targets, a.ta, a.tb,
                                                   a.w, a.ib, th, iz, scale, needs_x);
  return {wrap(std::get<0>(grads)), wrap(std::get<1>(grads)), wrap(std::get<2>(grads)), wrap(std::get<3>(grads)),
          wrap(std::get<4>(grads))};
}

void decode_step(const at::Tensor& x, at::Tensor out, const OptT& text_a, const OptT& text_b,
                 const OptT& image_weight, const OptT& image_b, double scale, at::Tensor pending,
                 const at::Tensor& image_pos, const at::Tensor& height, const at::Tensor& width) {
  check_x_out(x, out, "out");
  const auto dev = x.device();
  const int64_t batch = x.size(0);
  check_shape(out, "out", {batch, -1});
  const Adapters a = check_adapters(text_a, text_b, image_weight, image_b, x.size(1), out.size(1), dev);
  check_index(image_pos, "image_pos", dev);
  check_shape(image_pos, "image_pos", {batch});
  check_index(height, "height", dev);
  check_shape(height, "height", {batch});
  check_index(width, "width", dev);
  check_shape(width, "width", {batch});
  TORCH_CHECK_TYPE(pending.is_floating_point(), "moss_kernels native: argument 'pending' must be floating, got ",
                   pending.scalar_type());
  check_device(pending, "pending", dev);
  if (a.w.defined()) {
    check_contiguous(pending, "pending");
    check_shape(pending, "pending", {batch, -1, a.r});
  }
  if (moss::dispatch::cpu_kernels(dev)) {
    moss::cpu::decode_step(x, out, a.ta, a.tb, a.w, a.ib, scale, pending, image_pos, height, width);
  } else {
    moss::dispatch::cuda_decode_step(x, out, a.ta, a.tb, a.w, a.ib, scale, pending, image_pos, height, width);
  }
}

}  // namespace

namespace moss::cpu { void register_deform_attn(pybind11::module_& m); }  // cpu/deform_attn.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moss_kernels native backend (CPU kernels; CUDA kernels when built with CUDA)";
  m.def("forward", &forward, "rank-space forward; accumulates into out (see reference.forward)", py::arg("x"),
        py::arg("out"), py::arg("text_rows"), py::arg("image_rows"), py::arg("conv_sources"), py::arg("text_a"),
        py::arg("text_b"), py::arg("image_weight"), py::arg("image_b"), py::arg("scale"),
        py::arg("pending") = py::none(), py::arg("read_tokens") = py::none(), py::arg("read_slots") = py::none(),
        py::arg("write_slots") = py::none(), py::arg("write_sources") = py::none(),
        py::arg("write_keep") = py::none());
  m.def("backward", &backward, "gradients (dx, d_text_a, d_text_b, d_image_weight, d_image_b)", py::arg("grad_out"),
        py::arg("x"), py::arg("text_rows"), py::arg("image_rows"), py::arg("conv_targets"), py::arg("text_a"),
        py::arg("text_b"), py::arg("image_weight"), py::arg("image_b"), py::arg("text_h"), py::arg("image_z"),
        py::arg("scale"), py::arg("needs_x"));
  m.def("decode_step", &decode_step, "one token per sequence; updates pending in place", py::arg("x"),
        py::arg("out"), py::arg("text_a"), py::arg("text_b"), py::arg("image_weight"), py::arg("image_b"),
        py::arg("scale"), py::arg("pending"), py::arg("image_pos"), py::arg("height"), py::arg("width"));
  m.def("with_cuda", &moss::dispatch::with_cuda, "whether the CUDA kernels were compiled in");
  m.def("max_cuda_kernel_size", &moss::dispatch::max_cuda_kernel_size, "largest k the CUDA kernels take");
  m.def("set_cuda_forward_path", &moss::dispatch::set_forward_path,
        "which CUDA forward runs, process-wide: 'auto' (fused where it applies), 'fused' or 'split'", py::arg("path"));
  m.def("cuda_forward_path", &moss::dispatch::forward_path_name, "the CUDA forward path set ('auto' by default)");
  moss::cpu::register_deform_attn(m);  // ms_deform_* and mmfs_* (multi-scale deformable attention)
  m.attr("torch_version") = TORCH_VERSION;
  m.attr("source_hash") = MOSS_STR(MOSS_SOURCE_HASH);
}
