// The tile machinery shared by the tiled GEMM (gemm.cu) and the fused forward (fused_forward.cu).
// Templated over the compute type CT (half/bf16: tensor cores, wmma m16n16k16 with fp32
// accumulation; float: FMA units, exact fp32, no tf32), the shape (BM x 64 outputs, BK-deep k
// slabs, one 32 x 32 quarter per warp) and, per operand, the element type it is stored in and
// which of its dimensions is contiguous. Shared memory holds each operand the way memory does
// (k-contiguous operands as [mn][k], the others as [k][mn], wmma's row/col_major fragments read
// either), so a tile loads as 16-byte vectors: cp.async straight into shared memory where the
// operand is stored in CT, vector loads + one conversion per element into registers otherwise;
// scalar loads where strides or alignment rule vectors out (a separate instantiation, chosen once
// per launch).
// The k loop is double-buffered: slab k+1 is in flight while slab k feeds the MMAs.
#pragma once

#include <mma.h>

#include "common.cuh"

namespace moss::cuda::tile {

constexpr int PAD = 8;  // keeps wmma's ldm a multiple of 16 bytes, rows 16-byte aligned, banks spread
constexpr int PAD_C = 4;

// The element type of an operand: a real type (16-byte vector loads), Scalar<T> (scalar loads of
// T: rows that are not whole vectors), or Any (scalar loads, the DType read per slab: the generic
// path for the dtype mixes and layouts cuda_dispatch.cpp rarely passes).
struct Any {};
template <typename T>
struct Scalar {};
template <typename S>
struct ScalarOf {
  using type = void;
};
template <typename T>
struct ScalarOf<Scalar<T>> {
  using type = T;
};

template <typename CT, int BM_, int WARPS_M_>
struct Shape {
  static constexpr int BM = BM_, BN = 64, BK = sizeof(CT) == 4 ? 16 : 32;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = 2, THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int VEC = 16 / static_cast<int>(sizeof(CT));  // CT elements per 16-byte chunk
  static_assert(BM == 32 * WARPS_M && THREADS / 2 == BM, "one 32 x 32 quarter per warp; fp32: 4 rows per thread");
};

// One operand's k slab in shared memory: MN x BK, stored [mn][k] (KC: k contiguous) or [k][mn].
template <typename CT, int MN, int BK, bool KC>
struct __align__(32) Panel {
  static constexpr bool kKC = KC;
  static constexpr int LD = (KC ? BK : MN) + PAD;
  CT v[KC ? MN : BK][LD];
  __device__ __forceinline__ CT* at(int mn, int k) { return KC ? &v[mn][k] : &v[k][mn]; }
  __device__ __forceinline__ const CT* at(int mn, int k) const { return KC ? &v[mn][k] : &v[k][mn]; }
  __device__ __forceinline__ int ld() const { return LD; }
};

// A row-major matrix already in shared memory (the fused forward's z panel) used as the A slab.
template <typename CT>
struct RowPanel {
  static constexpr bool kKC = true;
  const CT* p;
  int ldp;
  __device__ __forceinline__ const CT* at(int mn, int k) const { return p + mn * ldp + k; }
  __device__ __forceinline__ int ld() const { return ldp; }
};

// An operand seen along (mn, k): element (mn, k) is data[gmn(mn) * s_mn + gk(k) * s_k] for
// mn < mn_ext, k < k_ext (zero elsewhere), gmn / gk gathered when given.
struct Src {
  const void* data;
  DType dtype;
  int64_t s_mn, s_k;
  const int64_t* g_mn;
  const int64_t* g_k;
  int64_t mn_ext, k_ext;
};

template <typename S>
constexpr bool matches(DType d) {
  if constexpr (std::is_same_v<S, Any>) return true;
  else if constexpr (std::is_same_v<S, __half>) return d == DType::kF16;
  else if constexpr (std::is_same_v<S, __nv_bfloat16>) return d == DType::kBF16;
  else return d == DType::kF32;
}

// Whether 16-byte vectors fit (host, once per launch): the dimension the layout streams along is
// contiguous and not gathered, and every row of it starts 16-byte aligned. Else the launch takes
// the scalar instantiation (Any).
template <typename S>
inline bool vectors_fit(const Src& s, bool kc) {
  if constexpr (std::is_same_v<S, Any>) {
    return false;
  } else {
    const int64_t unit = kc ? s.s_k : s.s_mn, other = kc ? s.s_mn : s.s_k;
    const bool gathered = kc ? s.g_k != nullptr : s.g_mn != nullptr;
    return unit == 1 && !gathered && reinterpret_cast<uintptr_t>(s.data) % 16 == 0 &&
           (other * static_cast<int64_t>(sizeof(S))) % 16 == 0;
  }
}

template <typename T>
__device__ __forceinline__ float load_one(const void* p, int64_t off) {
  return to_float(static_cast<const T*>(p)[off]);
}

// Loads MN x BK slabs of one operand (element type S) into Panel<CT, MN, BK, KC>. Thread t owns the
// 16-byte chunks t, t + THREADS, ...; the rows (KC) or mn runs (!KC) of its chunks are set up once
// (setup_rows), so the k loop does no gather or row bound per element. A typed S loads vectors
// (the launch checked vectors_fit): fetch(k0) starts slab k0 with cp.async straight into the
// stage (S == CT) or vector loads into registers, converted to fp32, which put() stores into the
// stage as 16-byte vectors once the MMAs of the current slab are issued. Scalar<T> and Any are the
// scalar fallback: element by element into the stage (Any: the dtype switched once per slab).
template <typename CT, typename S, int MN, int BK, bool KC, int THREADS>
struct Loader {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(CT));
  static constexpr int CHUNKS = MN * BK / VEC / THREADS;
  static_assert(CHUNKS * VEC * THREADS == MN * BK, "the chunks tile the slab exactly");
  static constexpr bool kAny = std::is_same_v<S, Any>;
  static constexpr bool kScalar = kAny || !std::is_void_v<typename ScalarOf<S>::type>;
  static constexpr bool kDirect = std::is_same_v<S, CT>;
  static constexpr bool kRegs = !kScalar && !kDirect;  // vectors through registers (a conversion)
  static constexpr bool kAsync = !kScalar && kDirect;  // cp.async straight into shared memory
  using P = Panel<CT, MN, BK, KC>;

  Src src;
  // KC: element offset of the chunk's row (-1: masked or past mn_ext); !KC: the chunk's first mn.
  int64_t line[CHUNKS];
  int full_n[CHUNKS];  // elements of the chunk that exist in a slab inside k_ext
  float f[kRegs ? CHUNKS : 1][VEC];

  __device__ __forceinline__ static int chunk_mn(int q) {
    const int c = threadIdx.x + q * THREADS;
    return KC ? c / (BK / VEC) : (c % (MN / VEC)) * VEC;
  }
  __device__ __forceinline__ static int chunk_k(int q) {
    const int c = threadIdx.x + q * THREADS;
    return KC ? (c % (BK / VEC)) * VEC : c / (MN / VEC);
  }

  // row_of(gmn): the source row of operand row gmn < mn_ext, or -1 (masked: reads as zeros).
  template <typename RowOf>
  __device__ __forceinline__ void setup_rows(const Src& s, int64_t mn0, RowOf row_of) {
    src = s;
#pragma unroll
    for (int q = 0; q < CHUNKS; ++q) {
      const int64_t gmn = mn0 + chunk_mn(q);
      line[q] = KC ? -1 : gmn;
      if (KC && gmn < s.mn_ext) {
        const int64_t r = row_of(gmn);
        if (r >= 0) line[q] = r * s.s_mn;
      }
      const int64_t left = s.mn_ext - gmn;
      full_n[q] = KC ? (line[q] >= 0 ? VEC : 0) : (left <= 0 ? 0 : left >= VEC ? VEC : static_cast<int>(left));
    }
  }
  __device__ __forceinline__ void setup(const Src& s, int64_t mn0) {
    setup_rows(s, mn0, [&](int64_t g) { return s.g_mn ? s.g_mn[g] : g; });
  }

  template <typename T>
  __device__ __forceinline__ void fetch_scalar(int64_t k0, P& stage) {
#pragma unroll
    for (int q = 0; q < CHUNKS; ++q) {  // unrolled: line[q] stays in a register
#pragma unroll 1
      for (int e = 0; e < VEC; ++e) {
        const int64_t gk = k0 + chunk_k(q) + (KC ? e : 0);
        const int64_t gmn = KC ? 0 : line[q] + e;
        float v = 0.0f;
        if (KC ? (line[q] >= 0 && gk < src.k_ext) : (gmn < src.mn_ext && gk < src.k_ext)) {
          const int64_t kof = (src.g_k ? src.g_k[gk] : gk) * src.s_k;
          v = load_one<T>(src.data, KC ? line[q] + kof : kof + (src.g_mn ? src.g_mn[gmn] : gmn) * src.s_mn);
        }
        *stage.at(chunk_mn(q) + (KC ? 0 : e), chunk_k(q) + (KC ? e : 0)) = from_float<CT>(v);
      }
    }
  }

  // FULL: the slab lies inside k_ext (no k bound: the k loop's slabs but the last).
  template <bool FULL>
  __device__ __forceinline__ void fetch(int64_t k0, P& stage) {
    if constexpr (kAny) {
      switch (src.dtype) {  // once per slab, uniform
        case DType::kF16: fetch_scalar<__half>(k0, stage); break;
        case DType::kBF16: fetch_scalar<__nv_bfloat16>(k0, stage); break;
        default: fetch_scalar<float>(k0, stage); break;
      }
    } else if constexpr (kScalar) {
      fetch_scalar<typename ScalarOf<S>::type>(k0, stage);
    } else {
      constexpr int SV = 16 / static_cast<int>(sizeof(S));  // S elements per 16-byte load
#pragma unroll
      for (int q = 0; q < CHUNKS; ++q) {
        // The chunk's VEC elements are contiguous in memory; `n` of them exist (zeros after).
        const int64_t gk = k0 + chunk_k(q);
        int n = full_n[q];
        if (!FULL) {
          const int64_t left = src.k_ext - gk;
          if (KC) n = left <= 0 ? 0 : (left < n ? static_cast<int>(left) : n);
          else if (left <= 0) n = 0;
        }
        const int64_t off = KC ? line[q] + gk : (n > 0 ? (src.g_k ? src.g_k[gk] : gk) * src.s_k : 0) + line[q];
        const S* g = static_cast<const S*>(src.data) + (n > 0 ? off : 0);
        if constexpr (kDirect) {
          const int bytes = n * static_cast<int>(sizeof(S));
          cp_async16(stage.at(chunk_mn(q), chunk_k(q)), g, bytes);
        } else if (n == VEC) {
#pragma unroll
          for (int h = 0; h < VEC / SV; ++h) {
            const Raw16 r = reinterpret_cast<const Raw16*>(g)[h];
#pragma unroll
            for (int e = 0; e < SV; ++e) f[q][h * SV + e] = vec_elem<S>(r, e);
          }
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) f[q][e] = e < n ? to_float(g[e]) : 0.0f;
        }
      }
    }
  }

  __device__ __forceinline__ void put(P& stage) const {
    if constexpr (kRegs) {  // cp.async and the fallback wrote the stage themselves
#pragma unroll
      for (int q = 0; q < CHUNKS; ++q)
        *reinterpret_cast<Raw16*>(stage.at(chunk_mn(q), chunk_k(q))) = vec_pack<CT>(f[q]);
    }
  }
};

// Tile math per compute type: acc += A (BM x BK slab) B (BK x BN slab), both in shared memory as
// Panel / RowPanel; spill() writes the fp32 accumulators to a BM x (BN + PAD_C) tile.
template <typename CT, typename Sh>
struct TileMath {  // half / bf16: tensor cores; warp w owns the 32 x 32 quarter (w / 2, w % 2)
  template <bool KC>
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, CT,
                                       std::conditional_t<KC, nvcuda::wmma::row_major, nvcuda::wmma::col_major>>;
  template <bool KC>
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, CT,
                                       std::conditional_t<KC, nvcuda::wmma::col_major, nvcuda::wmma::row_major>>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  FragC acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }
  // wmma's rules: pointers 32-byte aligned, ldm a multiple of 8 elements (PAD keeps both).
  template <typename PA, typename PB>
  __device__ __forceinline__ void step(const PA& a, const PB& b) {
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int ks = 0; ks < Sh::BK; ks += 16) {
      FragA<PA::kKC> fa[2];
      FragB<PB::kKC> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(fa[i], a.at(wm + 16 * i, ks), a.ld());
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(fb[j], b.at(wn + 16 * j, ks), b.ld());
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void spill(float (*c)[Sh::BN + PAD_C]) {
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(&c[wm + 16 * i][wn + 16 * j], acc[i][j], Sh::BN + PAD_C,
                                        nvcuda::wmma::mem_row_major);
  }
};

template <typename Sh>
struct TileMath<float, Sh> {  // fp32: each thread owns 4 rows x 8 columns (columns strided by 8)
  float acc[4][8];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  }
  template <typename PA, typename PB>
  __device__ __forceinline__ void step(const PA& a, const PB& b) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int kk = 0; kk < Sh::BK; ++kk) {
      float av[4], bv[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = *a.at(4 * ty + i, kk);
#pragma unroll
      for (int j = 0; j < 8; ++j) bv[j] = *b.at(tx + 8 * j, kk);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void spill(float (*c)[Sh::BN + PAD_C]) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) c[4 * ty + i][tx + 8 * j] = acc[i][j];
  }
};

// The double-buffered stages of a loader pair, and the fp32 tile the accumulators spill to (the
// epilogue runs after the last slab, so they share the bytes).
template <typename CT, typename Sh, bool AK, bool BKC>
union __align__(32) Smem {
  struct {
    Panel<CT, Sh::BM, Sh::BK, AK> a[2];
    Panel<CT, Sh::BN, Sh::BK, BKC> b[2];
  } st;
  float c[Sh::BM][Sh::BN + PAD_C];
};

// A loader of nothing: the A slabs are already in shared memory (the fused forward's z panel).
struct NoLoad {
  static constexpr bool kAsync = true;
  template <bool FULL, typename P>
  __device__ __forceinline__ void fetch(int64_t, P&) {}
  template <typename P>
  __device__ __forceinline__ void put(P&) const {}
};

// The k loop over [0, k_ext): slab s + 1 is fetched (cp.async in flight, or into registers) while
// slab s feeds the MMAs; la / lb are set up, math zeroed by the caller. a_slab(s, stage) is the A
// operand of slab s (the stage la loaded, or a view of a panel already in shared memory). The loop
// fetches whole slabs only (no k bound); the at most two slabs after it, straight-line code, take
// the bounded fetches.
template <typename Sh, typename Math, typename LA, typename LB, typename SM, typename ASlab>
__device__ __forceinline__ void mainloop(Math& math, LA& la, LB& lb, SM& sm, int64_t k_ext, ASlab a_slab) {
  const int64_t slabs = ceil_div(k_ext, Sh::BK), whole = k_ext / Sh::BK;
  const auto slab = [&](int64_t s, auto full) {  // computes slab s, fetches slab s + 1
    constexpr bool kFull = decltype(full)::value;
    const int cur = static_cast<int>(s & 1);
    const bool more = kFull || s + 1 < slabs;
    if (more) {
      la.template fetch<kFull>((s + 1) * Sh::BK, sm.st.a[cur ^ 1]);
      lb.template fetch<kFull>((s + 1) * Sh::BK, sm.st.b[cur ^ 1]);
    }
    cp_async_commit();
    cp_async_wait<1>();  // slab s has landed (this thread's copies); the barrier makes it everyone's
    __syncthreads();
    math.step(a_slab(s, sm.st.a[cur]), sm.st.b[cur]);
    if (more) {
      la.put(sm.st.a[cur ^ 1]);
      lb.put(sm.st.b[cur ^ 1]);
    }
    __syncthreads();  // nobody reads slab s any more: the next fetch may overwrite its stage
  };
  if (whole > 0) {
    la.template fetch<true>(0, sm.st.a[0]);
    lb.template fetch<true>(0, sm.st.b[0]);
  } else {
    la.template fetch<false>(0, sm.st.a[0]);
    lb.template fetch<false>(0, sm.st.b[0]);
  }
  la.put(sm.st.a[0]);
  lb.put(sm.st.b[0]);
  cp_async_commit();
  int64_t s = 0;
  // Unrolled twice where both operands load by cp.async (the stage index becomes a constant);
  // register-held slabs and the scalar fallback would spill or grow.
  [[maybe_unused]] constexpr int kUnroll = LA::kAsync && LB::kAsync ? 2 : 1;
#pragma unroll kUnroll
  for (; s + 1 < whole; ++s) slab(s, std::true_type{});
  if (s < slabs) slab(s++, std::false_type{});
  if (s < slabs) slab(s++, std::false_type{});
  cp_async_wait<0>();  // k_ext == 0: the prologue's (empty) copies
}

// a_slab for operands loaded by a Loader: the stage itself.
struct StageSlab {
  template <typename P>
  __device__ __forceinline__ const P& operator()(int64_t, const P& stage) const {
    return stage;
  }
};

template <typename T, int BM, int BN>
__device__ __forceinline__ void store_typed(const float (*t)[BN + PAD_C], const Output& c, int64_t m0, int64_t n0,
                                            int64_t m, int64_t n, int threads) {
  T* out = static_cast<T*>(c.data);
  for (int e = threadIdx.x; e < BM * BN; e += threads) {
    const int i = e / BN, j = e % BN;
    const int64_t gi = m0 + i, gj = n0 + j;
    if (gi >= m || gj >= n) continue;
    const int64_t row = c.rows ? c.rows[gi] : gi;
    const int64_t off = row * c.ld + gj;
    float v = c.alpha * t[i][j];
    if (c.accumulate) v += to_float(out[off]);
    out[off] = from_float<T>(v);
  }
}

// Epilogue: the spilled BM x BN tile at (m0, n0) of an m x n product into c: scatter rows, scale,
// optionally add into what is there, round once (the output dtype chosen once, not per element).
template <int BM, int BN>
__device__ __forceinline__ void store_tile(const float (*t)[BN + PAD_C], const Output& c, int64_t m0, int64_t n0,
                                           int64_t m, int64_t n, int threads) {
  switch (c.dtype) {
    case DType::kF16: store_typed<__half, BM, BN>(t, c, m0, n0, m, n, threads); break;
    case DType::kBF16: store_typed<__nv_bfloat16, BM, BN>(t, c, m0, n0, m, n, threads); break;
    default: store_typed<float, BM, BN>(t, c, m0, n0, m, n, threads); break;
  }
}

}  // namespace moss::cuda::tile
