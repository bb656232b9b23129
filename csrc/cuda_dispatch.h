// The torch side of the CUDA kernels: turns checked tensors into the raw pointers and sizes of
// include/moss_cuda.h and launches on the current stream. Compiled only in CUDA builds
// (MOSS_WITH_CUDA); otherwise these entry points say why a CUDA tensor cannot run here.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <string>
#include <tuple>

#include "include/moss_cuda.h"

namespace moss::dispatch {

// Whether a call on `device` runs the CPU kernels (csrc/cpu). In the SIMT harness's test build
// (MOSS_SIMT, tests/simt/torch_ext.py, never installed) every call runs the CUDA launch sequences
// below on CPU tensors, the kernels executed by the harness.
#ifdef MOSS_SIMT
inline bool cpu_kernels(const at::Device&) { return false; }
#else
inline bool cpu_kernels(const at::Device& device) { return device.is_cpu(); }
#endif

#ifdef MOSS_WITH_CUDA
inline bool with_cuda() { return true; }

std::tuple<at::Tensor, at::Tensor> cuda_forward(const at::Tensor& x, at::Tensor& out, const at::Tensor& text_rows,
                                                const at::Tensor& image_rows, const at::Tensor& conv_sources,
                                                const at::Tensor& text_a, const at::Tensor& text_b,
                                                const at::Tensor& image_weight, const at::Tensor& image_b,
                                                double scale, const at::Tensor& pending,
                                                const at::Tensor& read_tokens, const at::Tensor& read_slots,
                                                const at::Tensor& write_slots, const at::Tensor& write_sources,
                                                const at::Tensor& write_keep);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& text_rows, const at::Tensor& image_rows,
    const at::Tensor& conv_targets, const at::Tensor& text_a, const at::Tensor& text_b,
    const at::Tensor& image_weight, const at::Tensor& image_b, const at::Tensor& text_h, const at::Tensor& image_z,
    double scale, bool needs_x);

void cuda_decode_step(const at::Tensor& x, at::Tensor& out, const at::Tensor& text_a, const at::Tensor& text_b,
                      const at::Tensor& image_weight, const at::Tensor& image_b, double scale, at::Tensor& pending,
                      const at::Tensor& image_pos, const at::Tensor& height, const at::Tensor& width);
#else
inline bool with_cuda() { return false; }

[[noreturn]] inline void no_cuda() {
  TORCH_CHECK(false, "moss_kernels native: this build has no CUDA kernels (torch without CUDA or no nvcc at build "
              "time); rebuild with MOSS_KERNELS_FORCE_BUILD=1 on a machine with both");
}

template <typename... A>
std::tuple<at::Tensor, at::Tensor> cuda_forward(const A&...) { no_cuda(); }

template <typename... A>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_backward(const A&...) { no_cuda(); }

template <typename... A>
void cuda_decode_step(const A&...) { no_cuda(); }
#endif

// Which CUDA forward runs (process-wide; set through _C.set_cuda_forward_path): kAuto = the fused
// one-pass kernel where it applies (no pending state, ranks and shared memory within its limits)
// and its row tiles fill every SM at least once, else the split path; kFused = the fused kernel or
// an error saying why it cannot run; kSplit = always the split path (down-GEMM, shifts, up-GEMM).
enum class ForwardPath : int { kAuto = 0, kFused = 1, kSplit = 2 };

inline std::atomic<int>& forward_path_flag() {
  static std::atomic<int> flag{static_cast<int>(ForwardPath::kAuto)};
  return flag;
}
inline ForwardPath forward_path() { return static_cast<ForwardPath>(forward_path_flag().load()); }
inline std::string forward_path_name() {
  switch (forward_path()) {
    case ForwardPath::kFused: return "fused";
    case ForwardPath::kSplit: return "split";
    default: return "auto";
  }
}
inline void set_forward_path(const std::string& path) {
  ForwardPath p = ForwardPath::kAuto;
  if (path == "auto") {
    p = ForwardPath::kAuto;
  } else if (path == "fused") {
    p = ForwardPath::kFused;
  } else if (path == "split") {
    p = ForwardPath::kSplit;
  } else {
    TORCH_CHECK_VALUE(false, "moss_kernels native: argument 'path' must be 'auto', 'fused' or 'split', got '", path,
                      "'");
  }
  forward_path_flag().store(static_cast<int>(p));
}

// Largest kernel size k the CUDA kernels are instantiated for (the CPU kernels take any k).
inline int64_t max_cuda_kernel_size() { return moss::cuda::kMaxKernelSize; }

}  // namespace moss::dispatch
