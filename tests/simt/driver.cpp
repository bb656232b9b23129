// Stand-alone checks of the CUDA kernels through the SIMT harness, without torch: every entry point
// of csrc/include/moss_cuda.h on a small grid of odd shapes (partial tiles, partial k slabs,
// gathered and scattered rows, masked taps) in fp32/fp16/bf16 against float64 loops written here
// from the interface's contract. Built plain, with ThreadSanitizer and with AddressSanitizer +
// UndefinedBehaviorSanitizer by tests/test_simt.py, and rebuilt for each mutant.
//
//   driver kernels [GROUP] the kernel checks, all or one of gemm/fused/shift/decode (exit 1 on any
//                          mismatch or launch error)
//   driver huge            a GEMM whose output offsets pass 2^31 elements (sparse mapping)
//   driver convert PATH    writes float -> half / bf16 conversions of a fixed grid of floats
//   driver self NAME       one harness self-test (divergent barrier, shuffle mask, ...)
//   driver decode_plan DTYPE K BATCH D_IN D_OUT R R_TEXT   decode_workspace_floats for that shape
#include <sys/mman.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "include/moss_cuda.h"
#include "include/moss_index.h"

using moss::cuda::DType;

namespace {

int failures = 0;

uint64_t rng_state = 0x9e3779b97f4a7c15ull;
uint64_t next_u64() {
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
float uniform() { return static_cast<float>((next_u64() >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f; }
int64_t below(int64_t n) { return static_cast<int64_t>(next_u64() % static_cast<uint64_t>(n)); }

const char* name_of(DType d) { return d == DType::kF16 ? "f16" : d == DType::kBF16 ? "bf16" : "f32"; }
size_t size_of(DType d) { return d == DType::kF32 ? 4 : 2; }

float round_to(DType d, float v) {
  switch (d) {
    case DType::kF16: return __half2float(__float2half_rn(v));
    case DType::kBF16: return __bfloat162float(__float2bfloat16_rn(v));
    default: return v;
  }
}

// A buffer of exactly n elements of one dtype (exact size: AddressSanitizer sees one past the end).
struct Buf {
  DType dt;
  std::vector<unsigned char> bytes;
  int64_t n;
  Buf(DType d, int64_t count) : dt(d), bytes(static_cast<size_t>(count) * size_of(d)), n(count) {}
  void* data() { return bytes.data(); }
  float get(int64_t i) const {
    if (dt == DType::kF32) return reinterpret_cast<const float*>(bytes.data())[i];
    const uint16_t b = reinterpret_cast<const uint16_t*>(bytes.data())[i];
    return dt == DType::kF16 ? __half2float(__half{b}) : __bfloat162float(__nv_bfloat16{b});
  }
  void set(int64_t i, float v) {
    if (dt == DType::kF32) {
      reinterpret_cast<float*>(bytes.data())[i] = v;
    } else {
      reinterpret_cast<uint16_t*>(bytes.data())[i] =
          dt == DType::kF16 ? __float2half_rn(v).x : __float2bfloat16_rn(v).x;
    }
  }
  void randomize() {
    for (int64_t i = 0; i < n; ++i) set(i, uniform());
  }
};

// Norm-wise relative error max|got - want| / max|want| against a tolerance.
void check(const std::string& what, const std::vector<double>& want, const std::vector<double>& got, double tol) {
  double err = 0, mag = 0;
  bool finite = true;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) finite = false;
    err = std::max(err, std::fabs(got[i] - want[i]));
    mag = std::max(mag, std::fabs(want[i]));
  }
  const double rel = err / (mag > 0 ? mag : 1.0);
  const bool ok = finite && rel <= tol;
  std::printf("%s %-44s rel_err %.3g (tol %.3g)%s\n", ok ? "ok  " : "FAIL", what.c_str(), rel, tol,
              finite ? "" : " NON-FINITE");
  if (!ok) ++failures;
}

bool launched(const std::string& what) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return true;
  std::printf("FAIL %-44s launch error: %s\n", what.c_str(), cudaGetErrorString(e));
  ++failures;
  return false;
}

double tolerance(DType compute, DType out) {
  if (compute == DType::kBF16 || out == DType::kBF16) return 1e-2;
  if (compute == DType::kF16 || out == DType::kF16) return 2e-3;
  return 2e-5;
}

// ---------------------------------------------------------------------------------------- GEMM
// C[rows[i]] (+)= alpha * A B in the layouts cuda_dispatch.cpp passes: A k-contiguous with gathered
// rows (x rows, A[gather[i], :]) or m-contiguous with gathered k (a transposed g or h^T:
// A[gather[p], i]); B k-contiguous (a weight read transposed, (n, k) row-major) or n-contiguous
// ((k, n) row-major). `aligned` pads the leading dimensions to whole 16-byte vectors (vector and
// cp.async loads), else to odd sizes (the scalar fallback).
void check_gemm(DType compute, DType a_dt, DType out_dt, int64_t m, int64_t n, int64_t k, bool accumulate,
                bool a_kc = true, bool b_kc = true, DType b_dt = DType::kF32, bool b_dt_given = false,
                bool aligned = false) {
  if (!b_dt_given) b_dt = compute;
  const auto lead = [&](int64_t v) { return aligned ? (v + 7) / 8 * 8 + 8 : v + 3; };
  const int64_t a_rows = (a_kc ? m : k) + 7, lda = lead(a_kc ? k : m), ldc = n + 5, c_rows = m + 4;
  const int64_t ldb = aligned ? lead(b_kc ? k : n) : (b_kc ? k : n);
  Buf A(a_dt, a_rows * lda), B(b_dt, (b_kc ? n : k) * ldb), C(out_dt, c_rows * ldc);
  A.randomize();
  B.randomize();
  C.randomize();
  std::vector<int64_t> gather(a_kc ? m : k), rows(m);
  for (size_t i = 0; i < gather.size(); ++i) gather[i] = (static_cast<int64_t>(i) * 5 + 3) % a_rows;
  for (int64_t i = 0; i < m; ++i) rows[i] = (i * 3 + 1) % c_rows;  // injective: 3 and c_rows coprime below
  const auto a_at = [&](int64_t i, int64_t p) { return a_kc ? gather[i] * lda + p : gather[p] * lda + i; };
  const auto b_at = [&](int64_t p, int64_t j) { return b_kc ? j * ldb + p : p * ldb + j; };
  const float alpha = 0.625f;
  std::vector<double> want(static_cast<size_t>(c_rows * ldc));
  for (int64_t i = 0; i < c_rows * ldc; ++i) want[i] = C.get(i);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p)
        s += static_cast<double>(round_to(compute, A.get(a_at(i, p)))) * round_to(compute, B.get(b_at(p, j)));
      const int64_t off = rows[i] * ldc + j;
      want[off] = alpha * s + (accumulate ? want[off] : 0.0);
    }
  const moss::cuda::Operand a = a_kc ? moss::cuda::Operand{A.data(), a_dt, lda, 1, gather.data(), nullptr}
                                     : moss::cuda::Operand{A.data(), a_dt, 1, lda, nullptr, gather.data()};
  const moss::cuda::Operand b = b_kc ? moss::cuda::Operand{B.data(), b_dt, 1, ldb, nullptr, nullptr}
                                     : moss::cuda::Operand{B.data(), b_dt, ldb, 1, nullptr, nullptr};
  moss::cuda::Output c{C.data(), out_dt, ldc, rows.data(), accumulate, alpha};
  moss::cuda::gemm(m, n, k, a, b, c, compute, nullptr);
  char what[128];
  std::snprintf(what, sizeof what, "gemm %s a=%s%s b=%s%s out=%s %lldx%lldx%lld%s%s", name_of(compute),
                name_of(a_dt), a_kc ? "" : "^T", name_of(b_dt), b_kc ? "^T" : "", name_of(out_dt), (long long)m,
                (long long)n, (long long)k, accumulate ? " +=" : "", aligned ? " aligned" : "");
  if (!launched(what)) return;
  std::vector<double> got(want.size());
  for (size_t i = 0; i < got.size(); ++i) got[i] = C.get(static_cast<int64_t>(i));
  for (int64_t i = 0; i < c_rows * ldc; ++i) want[i] = round_to(out_dt, static_cast<float>(want[i]));
  check(what, want, got, tolerance(compute, out_dt));
}

// ---------------------------------------------------------------------------------------- fused forward
struct Modality {
  std::vector<int64_t> rows, sources;
  int64_t n = 0, kk = 1, r = 0;
  Buf down{DType::kF32, 0}, up{DType::kF32, 0};
  std::vector<float> z;
};

Modality make_modality(DType dt, int64_t N, int64_t n, int64_t kk, int64_t r, int64_t d_in, int64_t d_out,
                       bool with_sources, int64_t first_row) {
  Modality m;
  m.n = n;
  m.kk = kk;
  m.r = r;
  for (int64_t i = 0; i < n; ++i) m.rows.push_back((first_row + i * 2) % N);
  if (with_sources) {
    m.sources.resize(static_cast<size_t>(n * kk));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t t = 0; t < kk; ++t) m.sources[i * kk + t] = t == kk - 1 ? i : (below(4) == 0 ? -1 : below(n));
  }
  m.down = Buf(dt, kk * r * d_in);
  m.up = Buf(dt, d_out * r);
  m.down.randomize();
  m.up.randomize();
  m.z.assign(static_cast<size_t>(n * r), std::nanf(""));
  return m;
}

moss::cuda::FusedModality view(Modality& m) {
  moss::cuda::FusedModality f{};
  if (m.n == 0) return f;
  f.rows = m.rows.data();
  f.n = m.n;
  f.sources = m.sources.empty() ? nullptr : m.sources.data();
  f.kk = m.kk;
  f.down = m.down.data();
  f.down_dtype = m.down.dt;
  f.up = m.up.data();
  f.up_dtype = m.up.dt;
  f.r = m.r;
  f.z = m.z.data();
  return f;
}

// z[i, c] = sum_t x[rows[src(i, t)]] . down[t * r + c]; out[rows[i]] += scale * round(z[i]) up^T.
void reference_fused(DType dt, const Buf& x, int64_t ldx, int64_t d_in, std::vector<double>& out, int64_t ld_out,
                     int64_t d_out, float scale, const Modality& m, std::vector<double>& z) {
  z.assign(static_cast<size_t>(m.n * m.r), 0.0);
  for (int64_t i = 0; i < m.n; ++i)
    for (int64_t c = 0; c < m.r; ++c) {
      double s = 0;
      for (int64_t t = 0; t < m.kk; ++t) {
        const int64_t src = m.sources.empty() ? i : m.sources[i * m.kk + t];
        if (src < 0) continue;
        for (int64_t p = 0; p < d_in; ++p)
          s += static_cast<double>(x.get(m.rows[src] * ldx + p)) * m.down.get((t * m.r + c) * d_in + p);
      }
      z[i * m.r + c] = s;
    }
  for (int64_t i = 0; i < m.n; ++i)
    for (int64_t o = 0; o < d_out; ++o) {
      double s = 0;
      for (int64_t c = 0; c < m.r; ++c)
        s += static_cast<double>(round_to(dt, static_cast<float>(z[i * m.r + c]))) * m.up.get(o * m.r + c);
      out[m.rows[i] * ld_out + o] += scale * s;
    }
}

void check_fused(DType dt, int64_t n_text, int64_t n_image, int64_t kk, int64_t r_text, int64_t r_image,
                 int64_t d_in, int64_t d_out) {
  const int64_t N = 2 * (n_text + n_image) + 3, ldx = d_in + 2, ld_out = d_out + 3;
  Buf x(dt, N * ldx), out(dt, N * ld_out);
  x.randomize();
  out.randomize();
  Modality text = make_modality(dt, N, n_text, 1, r_text, d_in, d_out, false, 0);
  Modality image = make_modality(dt, N, n_image, kk, r_image, d_in, d_out, true, 1);
  std::vector<double> want(static_cast<size_t>(N * ld_out)), zt, zi;
  for (int64_t i = 0; i < N * ld_out; ++i) want[i] = out.get(i);
  const float scale = 0.75f;
  if (n_text) reference_fused(dt, x, ldx, d_in, want, ld_out, d_out, scale, text, zt);
  if (n_image) reference_fused(dt, x, ldx, d_in, want, ld_out, d_out, scale, image, zi);
  moss::cuda::FusedForwardArgs a{};
  a.compute = dt;
  a.x = x.data();
  a.ldx = ldx;
  a.d_in = d_in;
  a.out = out.data();
  a.out_dtype = dt;
  a.ld_out = ld_out;
  a.d_out = d_out;
  a.scale = scale;
  a.text = view(text);
  a.image = view(image);
  char what[128];
  std::snprintf(what, sizeof what, "fused %s text %lldx%lld image %lldx%lld kk=%lld", name_of(dt),
                (long long)n_text, (long long)r_text, (long long)n_image, (long long)r_image, (long long)kk);
  const char* why = "";
  if (!moss::cuda::fused_forward(a, nullptr, &why)) {
    std::printf("FAIL %-44s refused: %s\n", what, why);
    ++failures;
    return;
  }
  if (!launched(what)) return;
  std::vector<double> got(want.size());
  for (size_t i = 0; i < got.size(); ++i) got[i] = out.get(static_cast<int64_t>(i));
  for (auto& v : want) v = round_to(dt, static_cast<float>(v));
  check(what, want, got, tolerance(dt, dt));
  const double z_tol = dt == DType::kF32 ? 2e-5 : 1e-4;  // z: products of the inputs, fp32 sums
  if (n_text) check(std::string(what) + " text_h", zt, std::vector<double>(text.z.begin(), text.z.end()), z_tol);
  if (n_image) check(std::string(what) + " image_z", zi, std::vector<double>(image.z.begin(), image.z.end()), z_tol);
}

// The fused forward refuses (returns false, launches nothing) what does not fit the shared memory.
void check_fused_refuses() {
  Modality image = make_modality(DType::kF32, 40, 20, 1, 512, 8, 8, true, 0);
  Buf x(DType::kF32, 40 * 8), out(DType::kF32, 40 * 8);
  moss::cuda::FusedForwardArgs a{};
  a.compute = DType::kF32;
  a.x = x.data();
  a.ldx = 8;
  a.d_in = 8;
  a.out = out.data();
  a.out_dtype = DType::kF32;
  a.ld_out = 8;
  a.d_out = 8;
  a.scale = 1;
  a.image = view(image);
  const char* why = "";
  const bool ran = moss::cuda::fused_forward(a, nullptr, &why);
  const bool ok = !ran && std::strstr(why, "shared memory") && moss::cuda::fused_forward_smem_bytes(a) >
                                                                     moss::cuda::kFusedSmemLimit;
  std::printf("%s fused fp32 rank 512 refused (%s)\n", ok ? "ok  " : "FAIL", why);
  if (!ok) ++failures;
}

// ---------------------------------------------------------------------------------------- shifts, state
void check_shift_state() {
  const int64_t n = 53, kk = 4, r = 37, slots = 61;
  std::vector<float> P(static_cast<size_t>(n * kk * r));
  for (auto& v : P) v = uniform();
  std::vector<int64_t> sources(static_cast<size_t>(n * kk));
  for (auto& s : sources) s = below(5) == 0 ? -1 : below(n);
  std::vector<float> z(static_cast<size_t>(n * r), std::nanf(""));
  std::vector<double> want(z.size());
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < r; ++c) {
      double s = 0;
      for (int64_t tap = 0; tap < kk; ++tap)
        if (sources[t * kk + tap] >= 0) s += P[(sources[t * kk + tap] * kk + tap) * r + c];
      want[t * r + c] = s;
    }
  moss::cuda::shift_sum(P.data(), sources.data(), n, kk, r, z.data(), nullptr);
  if (launched("shift_sum")) check("shift_sum", want, std::vector<double>(z.begin(), z.end()), 1e-6);

  // state: reads into distinct tokens from distinct slots, then writes into distinct slots
  std::vector<float> pending(static_cast<size_t>(slots * r));
  for (auto& v : pending) v = uniform();
  std::vector<int64_t> read_tokens, read_slots, write_slots, write_sources(static_cast<size_t>(19 * kk));
  for (int64_t i = 0; i < 17; ++i) read_tokens.push_back((i * 3) % n), read_slots.push_back((i * 7 + 2) % slots);
  std::vector<unsigned char> keep_bytes(19);
  for (int64_t i = 0; i < 19; ++i) write_slots.push_back((i * 5 + 1) % slots), keep_bytes[i] = i % 3 == 0;
  for (auto& s : write_sources) s = below(4) == 0 ? -1 : below(n);
  std::vector<double> z2(want), pend(pending.begin(), pending.end());
  for (size_t i = 0; i < read_tokens.size(); ++i)
    for (int64_t c = 0; c < r; ++c) z2[read_tokens[i] * r + c] += pending[read_slots[i] * r + c];
  for (size_t i = 0; i < write_slots.size(); ++i)
    for (int64_t c = 0; c < r; ++c) {
      double s = 0;
      for (int64_t tap = 0; tap < kk; ++tap)
        if (write_sources[i * kk + tap] >= 0) s += P[(write_sources[i * kk + tap] * kk + tap) * r + c];
      const int64_t off = write_slots[i] * r + c;
      pend[off] = s + (keep_bytes[i] ? pending[off] : 0.0);
    }
  bool keep[19];
  for (int i = 0; i < 19; ++i) keep[i] = keep_bytes[i];
  moss::cuda::state_update(P.data(), z.data(), kk, r, pending.data(), read_tokens.data(), read_slots.data(),
                           static_cast<int64_t>(read_tokens.size()), write_slots.data(), write_sources.data(), keep,
                           static_cast<int64_t>(write_slots.size()), nullptr);
  if (launched("state_update")) {
    check("state_update z", z2, std::vector<double>(z.begin(), z.end()), 1e-6);
    check("state_update pending", pend, std::vector<double>(pending.begin(), pending.end()), 1e-6);
  }

  // fill_taps: dP[t, tap] = dP[targets[t, tap], kk - 1] (own-tap column) or 0
  std::vector<float> dP(static_cast<size_t>(n * kk * r), std::nanf(""));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < r; ++c) dP[(t * kk + kk - 1) * r + c] = uniform();
  std::vector<int64_t> targets(static_cast<size_t>(n * kk));
  for (auto& u : targets) u = below(4) == 0 ? -1 : below(n);
  std::vector<double> wdp(dP.begin(), dP.end());
  for (int64_t t = 0; t < n; ++t)
    for (int64_t tap = 0; tap < kk - 1; ++tap)
      for (int64_t c = 0; c < r; ++c) {
        const int64_t u = targets[t * kk + tap];
        wdp[(t * kk + tap) * r + c] = u >= 0 ? dP[(u * kk + kk - 1) * r + c] : 0.0;
      }
  moss::cuda::fill_taps(dP.data(), targets.data(), n, kk, r, nullptr);
  if (launched("fill_taps")) check("fill_taps", wdp, std::vector<double>(dP.begin(), dP.end()), 0.0);
}

// ---------------------------------------------------------------------------------------- decode
// d_in 45: rows no 16-byte vector can read (scalar loads); 144: 16-byte loads, two or more d_in
// slices; batch 40 at rank 130: three passes over a slice and (k = 4) two groups of batch rows;
// rank 600: ranks past the 512 the one-block-per-sequence kernel took.
void check_decode(DType dt, int64_t k, int64_t batch = 6, int64_t d_in = 45, int64_t r = 40) {
  const int64_t d_out = 70, r_text = 24, W = 5, H = 4;
  const int64_t capacity = moss::ring_size(k, W) + 2, ldx = d_in + 3, kk = k * k;
  Buf x(dt, batch * ldx), out(dt, batch * d_out), ta(dt, r_text * d_in), tb(dt, d_out * r_text);
  Buf w(dt, r * d_in * kk), ib(dt, d_out * r);
  for (Buf* b : {&x, &out, &ta, &tb, &w, &ib}) b->randomize();
  std::vector<float> pending(static_cast<size_t>(batch * capacity * r));
  for (auto& v : pending) v = uniform();
  // text rows, image rows at the first, an inner, the last position, and one beyond the image
  std::vector<int64_t> pos{-1, 0, 7, H * W - 1, -1, H * W + 3}, height(batch, H), width(batch, W);
  for (int64_t b = 6; b < batch; ++b) pos.push_back((b * 7) % (H * W + 4) - 2);  // -2 .. H * W + 1
  pos.resize(batch);
  std::vector<double> want_out(static_cast<size_t>(batch * d_out)), want_ring(pending.begin(), pending.end());
  for (int64_t i = 0; i < batch * d_out; ++i) want_out[i] = out.get(i);
  const float scale = 0.5f;
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<double> zz;
    const int64_t p = pos[b];
    if (p < 0) {
      zz.assign(r_text, 0.0);
      for (int64_t c = 0; c < r_text; ++c)
        for (int64_t i = 0; i < d_in; ++i) zz[c] += static_cast<double>(x.get(b * ldx + i)) * ta.get(c * d_in + i);
      for (int64_t o = 0; o < d_out; ++o) {
        double s = 0;
        for (int64_t c = 0; c < r_text; ++c) s += zz[c] * tb.get(o * r_text + c);
        want_out[b * d_out + o] += scale * s;
      }
      continue;
    }
    if (p >= H * W) continue;  // left unchanged
    std::vector<double> taps(static_cast<size_t>(kk * r), 0.0);
    for (int64_t t = 0; t < kk; ++t)
      for (int64_t c = 0; c < r; ++c)
        for (int64_t i = 0; i < d_in; ++i)
          taps[t * r + c] += static_cast<double>(x.get(b * ldx + i)) * w.get((c * d_in + i) * kk + t);
    double* ring = want_ring.data() + b * capacity * r;
    zz.assign(r, 0.0);
    const int64_t own = moss::decode_own_slot(k, p, W);
    for (int64_t c = 0; c < r; ++c) {
      double v = taps[(kk - 1) * r + c];
      if (own >= 0) {
        // reference.decode_step: token 0 reads nothing; a target's first contributor writes its
        // slot, later ones add
        if (p > 0) v += ring[own * r + c];
        ring[own * r + c] = 0;
        for (int64_t t = 0; t < kk - 1; ++t) {
          const int64_t di = k - 1 - t / k, dj = k - 1 - t % k, i = p / W, j = p % W;
          if (i + di >= H || j + dj >= W) continue;
          const int64_t slot = (p + di * W + dj) % moss::ring_size(k, W);
          const bool first = (i == 0 || di == k - 1) && (j == 0 || dj == k - 1);
          ring[slot * r + c] = first ? taps[t * r + c] : ring[slot * r + c] + taps[t * r + c];
        }
      }
      zz[c] = static_cast<float>(v);  // z is kept in fp32
    }
    for (int64_t o = 0; o < d_out; ++o) {
      double s = 0;
      for (int64_t c = 0; c < r; ++c) s += zz[c] * ib.get(o * r + c);
      want_out[b * d_out + o] += scale * s;
    }
  }
  moss::cuda::DecodeArgs a{};
  a.dtype = dt;
  a.x = x.data();
  a.ldx = ldx;
  a.out = out.data();
  a.batch = batch;
  a.d_in = d_in;
  a.d_out = d_out;
  a.text_a = ta.data();
  a.text_b = tb.data();
  a.r_text = r_text;
  a.image_weight = w.data();
  a.image_b = ib.data();
  a.r = r;
  a.k = k;
  a.scale = scale;
  a.pending = pending.data();
  a.capacity = capacity;
  a.image_pos = pos.data();
  a.height = height.data();
  a.width = width.data();
  // scratch of any contents: NaN, so that a sum read before it is written shows
  std::vector<float> workspace(static_cast<size_t>(moss::cuda::decode_workspace_floats(a)), NAN);
  a.workspace = workspace.data();
  moss::cuda::decode_step(a, nullptr);
  char what[96];
  std::snprintf(what, sizeof what, "decode %s k=%lld b=%lld d_in=%lld r=%lld", name_of(dt), (long long)k,
                (long long)batch, (long long)d_in, (long long)r);
  if (!launched(what)) return;
  std::vector<double> got(want_out.size());
  for (size_t i = 0; i < got.size(); ++i) got[i] = out.get(static_cast<int64_t>(i));
  for (auto& v : want_out) v = round_to(dt, static_cast<float>(v));
  check(what, want_out, got, tolerance(dt, dt));
  check(std::string(what) + " ring", want_ring, std::vector<double>(pending.begin(), pending.end()), 2e-5);
}

// The decode split for one shape (tests/test_cuda_decode_static.py compares it with its cost
// model): prints decode_workspace_floats for 16-byte aligned weights (never dereferenced) on the
// emulated device (SIMT_SM_COUNT SMs). Args: dtype (f32/f16/bf16) k batch d_in d_out r r_text.
int run_decode_plan(int argc, char** argv) {
  if (argc < 9) return 2;
  const std::string dt = argv[2];
  alignas(16) static unsigned char dummy[16];
  moss::cuda::DecodeArgs a{};
  a.dtype = dt == "f16" ? DType::kF16 : dt == "bf16" ? DType::kBF16 : DType::kF32;
  a.k = std::atoll(argv[3]);
  a.batch = std::atoll(argv[4]);
  a.d_in = std::atoll(argv[5]);
  a.d_out = std::atoll(argv[6]);
  a.r = std::atoll(argv[7]);
  a.r_text = std::atoll(argv[8]);
  a.x = a.out = dummy;
  a.ldx = a.d_in;
  a.text_a = a.text_b = a.r_text > 0 ? dummy : nullptr;
  a.image_weight = a.image_b = a.r > 0 ? dummy : nullptr;
  std::printf("workspace %lld\n", static_cast<long long>(moss::cuda::decode_workspace_floats(a)));
  return 0;
}

void run_kernels(const std::string& group) {
  const bool all = group == "all";
  if (all || group == "gemm") {
    for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
      check_gemm(dt, dt, DType::kF32, 70, 37, 45, false);  // 2 x 1 tiles, partial k slab
      check_gemm(dt, DType::kF32, dt, 9, 130, 33, true);    // fp32 operand rounded to the compute type
      // the backward's layouts, 16-byte aligned rows: dA = dh^T x (both mn-contiguous; fp16 takes
      // the generic instantiation), dh = g B (B n-contiguous); k-contiguous both, vectors, two k tiles
      check_gemm(dt, dt, DType::kF32, 70, 37, 45, false, false, false, dt, true, true);
      check_gemm(dt, dt, dt, 130, 70, 21, true, true, false, dt, true, true);
      check_gemm(dt, dt, DType::kF32, 37, 70, 100, false, true, true, dt, true, true);
    }
    // fp16 inputs' rank-space GEMMs compute in bf16: fp32 z times a fp16 weight (the up-projection),
    // a fp16 g^T times fp32 h (dB)
    check_gemm(DType::kBF16, DType::kF32, DType::kF16, 70, 45, 24, true, true, true, DType::kF16, true, true);
    check_gemm(DType::kBF16, DType::kF16, DType::kF32, 24, 45, 70, false, false, false, DType::kF32, true, true);
    check_gemm(DType::kF16, DType::kF16, DType::kF32, 1, 1, 1, true);
  }
  if (all || group == "fused") {
    for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
      check_fused(dt, 70, 45, 4, 24, 70, 45, 70);  // two text tiles, rank chunks of 64 + 6, kk = 4
      check_fused(dt, 0, 9, 9, 0, 5, 19, 3);       // image only, kk = 9, tiny d_out
    }
    check_fused(DType::kF32, 20, 0, 1, 448, 0, 13, 9);  // the largest fp32 rank the fused kernel takes
    check_fused_refuses();
  }
  if (all || group == "shift") check_shift_state();
  if (all || group == "decode") {
    for (DType dt : {DType::kF32, DType::kF16, DType::kBF16})
      for (int64_t k = 1; k <= 4; ++k) {
        check_decode(dt, k);
        check_decode(dt, k, 6, 144);
        if (k == 4) check_decode(dt, k, 40, 144, 130);
      }
    check_decode(DType::kBF16, 2, 3, 48, 600);
  }
}

// A GEMM whose output offsets pass 2^31 elements: rows ld apart in a sparse (reserved, untouched)
// mapping, so a 32-bit offset anywhere in the path lands on the wrong element.
void run_huge() {
  const int64_t m = 9, n = 8, k = 16, ld = (int64_t{1} << 28) + 64;  // row 8 starts at 2^31 + 512 elements
  const size_t bytes = static_cast<size_t>((m - 1) * ld + n) * sizeof(float);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::printf("FAIL huge: cannot reserve %zu bytes\n", bytes);
    ++failures;
    return;
  }
  float* C = static_cast<float*>(p);
  Buf A(DType::kF32, m * k), B(DType::kF32, n * k);
  A.randomize();
  B.randomize();
  moss::cuda::Operand a{A.data(), DType::kF32, k, 1, nullptr, nullptr};
  moss::cuda::Operand b{B.data(), DType::kF32, 1, k, nullptr, nullptr};
  moss::cuda::Output c{C, DType::kF32, ld, nullptr, false, 1.0f};
  moss::cuda::gemm(m, n, k, a, b, c, DType::kF32, nullptr);
  if (launched("huge gemm")) {
    std::vector<double> want, got;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t q = 0; q < k; ++q) s += static_cast<double>(A.get(i * k + q)) * B.get(j * k + q);
        want.push_back(s);
        got.push_back(C[i * ld + j]);
      }
    check("gemm with offsets past 2^31 elements", want, got, 2e-5);
  }
  munmap(p, bytes);
}

// float -> half / bf16 for a fixed grid of bit patterns: every exponent and sign with the mantissas
// around each rounding boundary, plus pseudo-random patterns.
void run_convert(const char* path) {
  std::vector<uint32_t> in;
  for (uint32_t hi = 0; hi < 512; ++hi)  // sign + exponent
    for (uint32_t lo : {0u, 1u, 0xfffu, 0x1000u, 0x1001u, 0x2000u, 0x3000u, 0x7fffu, 0x8000u, 0x8001u, 0x18000u,
                        0x7fe000u, 0x7ff000u, 0x7fffffu, 0x400000u, 0x401000u, 0x3ff000u})
      in.push_back(hi << 23 | lo);
  for (int i = 0; i < (1 << 20); ++i) in.push_back(static_cast<uint32_t>(next_u64()));
  FILE* f = std::fopen(path, "wb");
  if (!f) {
    std::printf("FAIL convert: cannot write %s\n", path);
    ++failures;
    return;
  }
  for (uint32_t u : in) {
    float v;
    std::memcpy(&v, &u, 4);
    const uint16_t h = __float2half_rn(v).x, b = __float2bfloat16_rn(v).x;
    const float hb = __half2float(__half{h}), bb = __bfloat162float(__nv_bfloat16{b});
    uint32_t hbu, bbu;
    std::memcpy(&hbu, &hb, 4);
    std::memcpy(&bbu, &bb, 4);
    std::fwrite(&u, 4, 1, f);
    std::fwrite(&h, 2, 1, f);
    std::fwrite(&b, 2, 1, f);
    std::fwrite(&hbu, 4, 1, f);
    std::fwrite(&bbu, 4, 1, f);
  }
  std::fclose(f);
  std::printf("ok   wrote %zu conversions\n", in.size());
}

// ---------------------------------------------------------------------------------------- self-tests
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}
__global__ void early_exit_barrier_kernel(float* out) {
  __shared__ float s[64];
  if (threadIdx.x >= 40) return;  // exited threads drop out of later barriers (sm_70+)
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 40] + 1.0f;
}
__global__ void shfl_kernel(float* out, unsigned mask) {
  const int lane = threadIdx.x % 32;
  if (mask >> lane & 1u) out[threadIdx.x] = __shfl_xor_sync(mask, static_cast<float>(lane), 1);
}
__global__ void shfl_half_kernel(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
__global__ void shfl_down_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<float>(threadIdx.x), 3, 8);
}
__global__ void wmma_kernel(float* out, int offset, int ldm) {
  __shared__ __align__(32) __half tile[16 * 24];
  for (int e = threadIdx.x; e < 16 * 24; e += blockDim.x) tile[e] = __float2half_rn(static_cast<float>(e % 7));
  __syncthreads();
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half, nvcuda::wmma::row_major> b;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c;
  nvcuda::wmma::fill_fragment(c, 0.0f);
  nvcuda::wmma::load_matrix_sync(a, tile + offset, ldm);
  nvcuda::wmma::load_matrix_sync(b, tile + offset, ldm);
  nvcuda::wmma::mma_sync(c, a, b, c);
  nvcuda::wmma::store_matrix_sync(out, c, 16, nvcuda::wmma::mem_row_major);
}
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float s[64];
  if (threadIdx.x < 63) s[threadIdx.x] = 1.0f;  // s[63] never written
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}
__global__ void block_race_kernel(float* out) {
  if (threadIdx.x == 0) out[0] += static_cast<float>(blockIdx.x);  // every block: the same element
}
__global__ void intra_block_race_kernel(float* out) {
  __shared__ float s[128];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 128];  // no barrier between the write and the read
}
__global__ void big_smem_kernel(float* out) {
  MOSS_DYNAMIC_SHARED(float, smem, 16);
  smem[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = smem[(threadIdx.x + 1) % blockDim.x];
}

// Each self-test prints "expected: ..." and returns 0 when the harness behaved as specified.
int run_self(const std::string& name) {
  static float __attribute__((aligned(32))) out_buf[256];
  float* const out_ptr = out_buf;
  struct {
    float* p;
    float* data() { return p; }
    float& operator[](int i) { return p[i]; }
  } out{out_ptr};
  auto expect_error = [&](const char* needle) {
    const cudaError_t e = cudaGetLastError();
    const char* msg = e == cudaSuccess ? "no error" : cudaGetErrorString(e);
    const bool ok = e != cudaSuccess && std::strstr(msg, needle);
    std::printf("%s %s: %s\n", ok ? "ok  " : "FAIL", name.c_str(), msg);
    return ok ? 0 : 1;
  };
  auto expect_success = [&]() {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
      std::printf("FAIL %s: %s\n", name.c_str(), cudaGetErrorString(e));
      return false;
    }
    return true;
  };
  if (name == "divergent_barrier") {
    MOSS_LAUNCH(1, 64, 0, nullptr, divergent_barrier_kernel)(out.data());
    return expect_error("divergent __syncthreads");
  }
  if (name == "early_exit") {
    MOSS_LAUNCH(1, 64, 0, nullptr, early_exit_barrier_kernel)(out.data());
    if (!expect_success()) return 1;
    bool ok = true;
    for (int i = 0; i < 40; ++i) ok &= out[i] == 2.0f;
    std::printf("%s early_exit\n", ok ? "ok  " : "FAIL");
    return ok ? 0 : 1;
  }
  if (name == "shfl_partial") {  // lanes 0..15 exchange among themselves: fine
    MOSS_LAUNCH(1, 32, 0, nullptr, shfl_kernel)(out.data(), 0x0000ffffu);
    if (!expect_success()) return 1;
    bool ok = true;
    for (int i = 0; i < 16; ++i) ok &= out[i] == static_cast<float>(i ^ 1);
    std::printf("%s shfl_partial\n", ok ? "ok  " : "FAIL");
    return ok ? 0 : 1;
  }
  if (name == "shfl_mask") {  // lanes 0..2 named, lane 2 reads lane 3 outside the mask
    MOSS_LAUNCH(1, 32, 0, nullptr, shfl_kernel)(out.data(), 0x7u);
    return expect_error("not in the mask");
  }
  if (name == "shfl_missing_lane") {  // the mask names all lanes, the upper half has exited
    MOSS_LAUNCH(1, 32, 0, nullptr, shfl_half_kernel)(out.data());
    return expect_error("has exited");
  }
  if (name == "shfl_down") {
    MOSS_LAUNCH(1, 32, 0, nullptr, shfl_down_kernel)(out.data());
    if (!expect_success()) return 1;
    bool ok = true;
    for (int i = 0; i < 32; ++i) ok &= out[i] == static_cast<float>(i % 8 + 3 < 8 ? i + 3 : i);
    std::printf("%s shfl_down\n", ok ? "ok  " : "FAIL");
    return ok ? 0 : 1;
  }
  if (name == "wmma_ok") {
    MOSS_LAUNCH(1, 32, 0, nullptr, wmma_kernel)(out.data(), 0, 24);
    if (!expect_success()) return 1;
    bool ok = true;
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        float s = 0;
        for (int p = 0; p < 16; ++p) s += static_cast<float>((i * 24 + p) % 7) * static_cast<float>((p * 24 + j) % 7);
        ok &= out[i * 16 + j] == s;
      }
    std::printf("%s wmma_ok\n", ok ? "ok  " : "FAIL");
    return ok ? 0 : 1;
  }
  if (name == "wmma_misaligned") {
    MOSS_LAUNCH(1, 32, 0, nullptr, wmma_kernel)(out.data(), 8, 24);  // 16 bytes off a 32-byte boundary
    return expect_error("not 256-bit");
  }
  if (name == "wmma_ldm") {
    MOSS_LAUNCH(1, 32, 0, nullptr, wmma_kernel)(out.data(), 0, 20);  // 40 bytes per row
    return expect_error("ldm");
  }
  if (name == "wmma_partial_warp") {
    MOSS_LAUNCH(1, 16, 0, nullptr, wmma_kernel)(out.data(), 0, 24);
    return expect_error("all 32 lanes");
  }
  if (name == "unwritten_shared") {
    MOSS_LAUNCH(1, 64, 0, nullptr, unwritten_shared_kernel)(out.data());
    if (!expect_success()) return 1;
    const bool ok = std::isnan(out[63]) && out[0] == 1.0f;
    std::printf("%s unwritten_shared reads NaN: %g\n", ok ? "ok  " : "FAIL", out[63]);
    return ok ? 0 : 1;
  }
  if (name == "smem_limit") {  // 64 KB of dynamic shared memory without the attribute: refused
    MOSS_LAUNCH(1, 128, 65536, nullptr, big_smem_kernel)(out.data());
    if (expect_error("above the kernel's limit")) return 1;
    if (cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 65536) != cudaSuccess)
      return 1;
    MOSS_LAUNCH(1, 128, 65536, nullptr, big_smem_kernel)(out.data());
    if (!expect_success()) return 1;
    if (cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 1 << 20) == cudaSuccess)
      return 1;  // above the opt-in limit
    (void)cudaGetLastError();
    std::printf("ok   smem_limit\n");
    return 0;
  }
  if (name == "bad_config") {
    MOSS_LAUNCH(1, 2048, 0, nullptr, block_race_kernel)(out.data());
    if (expect_error("block size")) return 1;
    MOSS_LAUNCH(dim3(1, 70000), 32, 0, nullptr, block_race_kernel)(out.data());
    return expect_error("not a valid grid");
  }
  if (name == "block_race") {  // only ThreadSanitizer sees this one
    MOSS_LAUNCH(8, 32, 0, nullptr, block_race_kernel)(out.data());
    if (!expect_success()) return 1;
    std::printf("ok   block_race ran (a race only ThreadSanitizer reports)\n");
    return 0;
  }
  if (name == "intra_block_race") {  // only ThreadSanitizer sees this one
    MOSS_LAUNCH(1, 128, 0, nullptr, intra_block_race_kernel)(out.data());
    if (!expect_success()) return 1;
    std::printf("ok   intra_block_race ran (a race only ThreadSanitizer reports)\n");
    return 0;
  }
  std::printf("FAIL unknown self-test %s\n", name.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "kernels";
  if (what == "kernels") {
    run_kernels(argc > 2 ? argv[2] : "all");
  } else if (what == "huge") {
    run_huge();
  } else if (what == "convert" && argc > 2) {
    run_convert(argv[2]);
  } else if (what == "self" && argc > 2) {
    return run_self(argv[2]);
  } else if (what == "decode_plan") {
    return run_decode_plan(argc, argv);
  } else {
    std::printf("usage: %s kernels | huge | convert PATH | self NAME | decode_plan DTYPE K BATCH D_IN D_OUT R R_TEXT\n",
                argv[0]);
    return 2;
  }
  std::printf("%s: %d failure(s)\n", what.c_str(), failures);
  return failures ? 1 : 0;
}
