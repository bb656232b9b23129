// Row gather/scatter helpers for the CPU kernels: convert between any floating dtype and fp32
// work buffers, with OpenMP (at::parallel_for) over rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace moss::cpu {

// Rows per gather+GEMM block for rows `width` floats wide: about 8M floats (32 MiB), at least 256
// rows. Few large GEMMs beat many cache-sized ones here: every BLAS call is a fork/join of its
// threads, which on a busy 2-core machine costs more than the cache misses it would save
// (measured: 8 GEMMs of 256 rows took 5x one GEMM of 2048 rows with 2 threads under load).
inline int64_t block_rows(int64_t width) { return std::max<int64_t>(256, (int64_t{1} << 23) / std::max<int64_t>(width, 1)); }

// Grain for at::parallel_for over rows `width` floats wide: 64K elements (256 KiB of fp32, tens of
// microseconds) per chunk, so loops smaller than that run serially on the calling thread. A fork is
// cheap on idle cores but, when other processes hold the cores, every join waits for a descheduled
// thread; the thread count itself is torch's (at::parallel_for follows torch.set_num_threads).
inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(width, 1)); }

#define MOSS_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// dst[i, :] = scale * float(src[rows[i], :]), i < n. src: (N, d) any floating dtype, unit column
// stride, any row stride; dst: fp32 (n, d) contiguous.
inline void gather_rows(const at::Tensor& src, const int64_t* rows, int64_t n, float* dst, float scale) {
  const int64_t d = src.size(1), ld = src.stride(0);
  MOSS_DISPATCH_FLOATS(src.scalar_type(), "moss_gather_rows", [&] {
    const scalar_t* base = src.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(d), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* s = base + rows[i] * ld;
        float* o = dst + i * d;
        for (int64_t c = 0; c < d; ++c) o[c] = scale * static_cast<float>(s[c]);
      }
    });
  });
}

// Rows of a layout come in long runs of consecutive tokens (an image, the text between images).
// A run at least this long is handed to BLAS in place, as a strided view, when the tensor is fp32:
// no gather copy in, no scatter copy out. Shorter runs are gathered together into one block (a GEMM
// on a handful of rows costs a fork/join of the BLAS threads for almost no work).
constexpr int64_t kMinDirectRun = 64;

// A block of rows[b0, b0 + nb): `direct` blocks are the consecutive tokens first, first + 1, ...
struct RowBlock {
  int64_t b0, nb, first;
  bool direct;
};

// Splits rows[0, n) into direct runs (when allow_direct) and gathered blocks of at most `blk`
// rows, in order (weight gradients summed block by block stay deterministic).
inline std::vector<RowBlock> plan_row_blocks(const int64_t* rows, int64_t n, int64_t blk, bool allow_direct) {
  std::vector<RowBlock> plan;
  int64_t pending = 0;  // start of the rows not yet in a block (all in short runs)
  const auto flush = [&](int64_t end) {  // gathered blocks for rows[pending, end)
    for (int64_t b0 = pending; b0 < end; b0 += blk) plan.push_back({b0, std::min(blk, end - b0), -1, false});
    pending = end;
  };
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && rows[j] == rows[j - 1] + 1) ++j;
    if (allow_direct && j - i >= kMinDirectRun) {
      flush(i);
      plan.push_back({i, j - i, rows[i], true});
      pending = j;
    }
    i = j;
  }
  flush(n);
  return plan;
}

// BLAS may read or write these rows in place: fp32 with unit column stride.
inline bool direct_ok(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.stride(1) == 1; }

// Calls fn(xb, block, scratch) on each block of x[rows]: direct blocks get a view of x's rows
// (scratch = false: fn must not write it); the others get them gathered into one fp32 buffer of
// at most block_rows(d_in) rows (scratch = true: fn may overwrite it).
template <typename Fn>
inline void for_row_blocks(const at::Tensor& x, const int64_t* rows, int64_t n, Fn&& fn) {
  const int64_t d_in = x.size(1), blk = block_rows(d_in);
  const auto plan = plan_row_blocks(rows, n, blk, direct_ok(x));
  at::Tensor buf;
  for (const RowBlock& b : plan) {
    if (b.direct) {
      at::Tensor xb = x.narrow(0, b.first, b.nb);
      fn(xb, b, false);
      continue;
    }
    if (!buf.defined()) buf = at::empty({std::min(n, blk), d_in}, x.options().dtype(at::kFloat));
    at::Tensor xb = buf.narrow(0, 0, b.nb);
    gather_rows(x, rows + b.b0, b.nb, xb.data_ptr<float>(), 1.0f);
    fn(xb, b, true);
  }
}

// out[rows[i], :] = round(float(out[rows[i], :]) + scale * delta[i, :]): one rounding per element,
// as the reference's `_add_rows`. delta: fp32 rows with leading dimension ld.
inline void scatter_add_rows(at::Tensor& out, const int64_t* rows, int64_t n, const float* delta, int64_t ld,
                             float scale) {
  const int64_t d = out.size(1), ldo = out.stride(0);
  MOSS_DISPATCH_FLOATS(out.scalar_type(), "moss_scatter_add_rows", [&] {
    scalar_t* base = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(d), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        scalar_t* o = base + rows[i] * ldo;
        const float* s = delta + i * ld;
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(static_cast<float>(o[c]) + scale * s[c]);
      }
    });
  });
}

// dst[rows[i], :] = src[i, :] converted to dst's dtype. dst: contiguous (N, d).
inline void scatter_rows(at::Tensor& dst, const int64_t* rows, int64_t n, const float* src, int64_t ld) {
  const int64_t d = dst.size(1), ldd = dst.stride(0);
  MOSS_DISPATCH_FLOATS(dst.scalar_type(), "moss_scatter_rows", [&] {
    scalar_t* base = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(d), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        scalar_t* o = base + rows[i] * ldd;
        const float* s = src + i * ld;
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(s[c]);
      }
    });
  });
}

// A fp32 contiguous copy of a weight (no copy when it already is one).
inline at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// (r, d_in, k, k) conv weight -> K_all (k*k*r, d_in) fp32, tap a*k+b major (reference.stacked_taps),
// in one pass that reads each w[c] row once and writes k*k sequential streams (a permute+copy
// through ATen walks w with stride k*k and was the largest non-GEMM cost of a decode step).
inline at::Tensor stacked_taps(const at::Tensor& weight) {
  const at::Tensor w = weight.contiguous();
  const int64_t r = w.size(0), d_in = w.size(1), kk = w.size(2) * w.size(3);
  at::Tensor K = at::empty({kk * r, d_in}, w.options().dtype(at::kFloat));
  float* kp = K.data_ptr<float>();
  MOSS_DISPATCH_FLOATS(w.scalar_type(), "moss_stacked_taps", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    at::parallel_for(0, r, row_grain(d_in * kk), [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        const scalar_t* src = wp + c * d_in * kk;
        for (int64_t tap = 0; tap < kk; ++tap) {
          float* dst = kp + (tap * r + c) * d_in;
          for (int64_t i = 0; i < d_in; ++i) dst[i] = static_cast<float>(src[i * kk + tap]);
        }
      }
    });
  });
  return K;
}

// The inverse: dK_all (k*k*r, d_in) fp32 -> (r, d_in, k, k) gradient in `like`'s dtype.
inline at::Tensor unstack_taps(const at::Tensor& dK, const at::Tensor& like) {
  const int64_t r = like.size(0), d_in = like.size(1), kk = like.size(2) * like.size(3);
  at::Tensor g = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  const float* kp = dK.const_data_ptr<float>();
  MOSS_DISPATCH_FLOATS(g.scalar_type(), "moss_unstack_taps", [&] {
    scalar_t* gp = g.data_ptr<scalar_t>();
    at::parallel_for(0, r, row_grain(d_in * kk), [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        scalar_t* dst = gp + c * d_in * kk;
        for (int64_t tap = 0; tap < kk; ++tap) {
          const float* src = kp + (tap * r + c) * d_in;
          for (int64_t i = 0; i < d_in; ++i) dst[i * kk + tap] = static_cast<scalar_t>(src[i]);
        }
      }
    });
  });
  return g;
}

}  // namespace moss::cpu
