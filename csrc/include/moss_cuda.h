// Torch-free interface of the CUDA kernels (csrc/cuda/*.cu): raw pointers, sizes and a stream
// (passed as void* so that this header needs no CUDA headers). cuda_dispatch.cpp fills these from
// checked tensors. Every index and offset is 64-bit.
#pragma once

#include <cstdint>

namespace moss::cuda {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// A GEMM operand: element (i, j) lives at data[row(i) * stride_r + col(j) * stride_c], where
// row(i) = gather_r ? gather_r[i] : i and col(j) likewise (gathering image or text rows happens in
// the loads; nothing is copied first).
struct Operand {
  const void* data;
  DType dtype;
  int64_t stride_r;
  int64_t stride_c;
  const int64_t* gather_r;
  const int64_t* gather_c;
};

// Where C = alpha * A B goes: row i of C is row (rows ? rows[i] : i) of `data` (leading
// dimension ld); `accumulate` adds into what is there (rounded once) instead of overwriting.
struct Output {
  void* data;
  DType dtype;
  int64_t ld;
  const int64_t* rows;
  bool accumulate;
  float alpha;
};

// C (m x n) = alpha * A (m x k) B (k x n) on tensor cores (compute = kF16/kBF16: operands rounded
// to it, fp32 accumulation) or FMA units (compute = kF32, exact fp32). Each output tile is owned
// by one block that runs the whole k loop: deterministic, no atomics.
void gemm(int64_t m, int64_t n, int64_t k, const Operand& a, const Operand& b, const Output& c, DType compute,
          void* stream);

// z[t, :] = sum over taps with sources[t, tap] >= 0 of P[sources[t, tap], tap * r : (tap + 1) * r].
// P: (n_src, kk * r) fp32; z: (n, r) fp32.
void shift_sum(const float* P, const int64_t* sources, int64_t n, int64_t kk, int64_t r, float* z, void* stream);

// State reads (z[read_tokens[i]] += pending[read_slots[i]]) then writes (pending[write_slots[i]] =
// taps reaching it + (write_keep[i] ? old : 0)); the two launches are stream-ordered.
void state_update(const float* P, float* z, int64_t kk, int64_t r, float* pending, const int64_t* read_tokens,
                  const int64_t* read_slots, int64_t n_read, const int64_t* write_slots, const int64_t* write_sources,
                  const bool* write_keep, int64_t n_write, void* stream);

// dP[t, tap] = dP[targets[t, tap], kk - 1] or 0 for tap < kk - 1 (dz sits in the own-tap column).
void fill_taps(float* dP, const int64_t* targets, int64_t n, int64_t kk, int64_t r, void* stream);

// One modality of the fused forward: n rows of x (rows[i]); kk taps (1 for text) with
// sources (n, kk): for tap t of row i, the index into rows of the row it reads, or -1 where the tap
// falls in the conv's zero padding (null for text: the identity); down (kk * r, d_in) contiguous,
// tap t in rows [t * r, (t + 1) * r) (the stacked conv taps, or text_a); up (d_out, r)
// contiguous; z (n, r) fp32, written (text_h / image_z). n == 0 or r == 0: the modality is absent.
struct FusedModality {
  const int64_t* rows;
  int64_t n;
  const int64_t* sources;
  int64_t kk;
  const void* down;
  DType down_dtype;
  const void* up;
  DType up_dtype;
  int64_t r;
  float* z;
};

// The one-pass fused forward: ONE launch, each block a 64-row tile of one modality (text tiles
// first): gather, conv-down over all taps (padding by masks), z to global and to shared memory
// (rounded to the compute type = x's dtype), up-projection and out[rows[i]] += scale * z B^T in place
// (rounded once). x (N, d_in) rows with leading dimension ldx in `compute`; out rows with leading
// dimension ld_out in out_dtype.
struct FusedForwardArgs {
  DType compute;
  const void* x;
  int64_t ldx, d_in;
  void* out;
  DType out_dtype;
  int64_t ld_out, d_out;
  float scale;
  FusedModality text, image;
};

// Dynamic shared memory the fused forward needs for these args (0 when nothing is to be done).
int64_t fused_forward_smem_bytes(const FusedForwardArgs& args);

// Rows of one modality each block of the fused forward takes.
constexpr int64_t kFusedRowsPerBlock = 64;

// Largest rank (text or image) the fused forward takes; fp32 is further limited by shared memory.
constexpr int64_t kMaxFusedRank = 512;

// sm_80's opt-in shared memory per block: the fused forward never asks for more, so every shape it
// takes runs on every arch it is built for (smaller parts, e.g. sm_86's 101376, take fewer).
constexpr int64_t kFusedSmemLimit = 166912;

// Launches the fused forward on `stream` and returns true, or returns false without launching
// anything when it cannot take these args (a rank above kMaxFusedRank, or more shared memory than
// kFusedSmemLimit or the current device grants a block; fp32 takes ranks up to 448, fp16/bf16 up to
// 512 on sm_80/sm_90): the caller runs the split path. `why`, when given, then says which.
bool fused_forward(const FusedForwardArgs& args, void* stream, const char** why = nullptr);

// One decode step (reference.decode_step): x (batch, d_in) rows with leading dimension ldx, out
// (batch, d_out) contiguous, both `dtype`; weights in `dtype`, contiguous, null when absent, read
// in place (image_weight in nn.Conv2d layout (r, d_in, k, k), 1 <= k <= 4: no stacked copy);
// pending (batch, capacity, r) fp32; workspace: decode_workspace_floats(args) floats of fp32 scratch
// (d_in partial sums, z), any contents. Rows whose image position is beyond the image or whose ring
// would not fit are left unchanged. Weight-stationary (cuda/decode.cu): three stream-ordered
// launches, no host synchronisation, deterministic; any rank.
struct DecodeArgs {
  DType dtype;
  const void* x;
  int64_t ldx;
  void* out;
  int64_t batch, d_in, d_out;
  const void* text_a;
  const void* text_b;
  int64_t r_text;
  const void* image_weight;
  const void* image_b;
  int64_t r, k;
  float scale;
  float* pending;
  int64_t capacity;
  const int64_t* image_pos;
  const int64_t* height;
  const int64_t* width;
  float* workspace;
};
void decode_step(const DecodeArgs& args, void* stream);

// fp32 elements of the workspace decode_step needs for these args (0 when batch is 0); depends on
// the shapes, the weights' alignment and the current device's SM count, never on device data.
int64_t decode_workspace_floats(const DecodeArgs& args);

// Largest kernel size decode_step is instantiated for.
constexpr int64_t kMaxKernelSize = 4;

}  // namespace moss::cuda
