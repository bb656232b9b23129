// half and bfloat16 for the SIMT harness: storage types with the conversions the kernels use,
// rounding to nearest even and bit-identical to CUDA's (cuda_fp16.hpp / cuda_bf16.hpp host paths
// and cvt.rn on the device): NaN becomes the canonical 0x7fff, overflow rounds to infinity, fp16
// subnormals are rounded correctly. half/bf16 -> float is exact.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
using half = __half;

namespace simt {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace simt

inline __half __float2half_rn(float f) {
  const uint32_t u = simt::float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  uint16_t r;
  if (a > 0x7f800000u) {
    r = 0x7fffu;  // NaN: canonical, sign dropped (as CUDA)
    return __half{r};
  }
  if (a >= 0x477ff000u) {  // rounds to >= 65520: infinity
    r = static_cast<uint16_t>(sign | 0x7c00u);
  } else if (a >= 0x38800000u) {  // normal half: exponent >= -14
    const uint32_t mant = a & 0x7fffffu;
    const uint32_t exp = (a >> 23) - 127 + 15;
    uint32_t h = (exp << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carries into the exponent correctly
    r = static_cast<uint16_t>(sign | h);
  } else if (a < 0x33000000u) {  // below half the smallest subnormal (2^-25): zero
    r = static_cast<uint16_t>(sign);
  } else {  // subnormal half: value = m * 2^-24
    const uint32_t exp = a >> 23;              // biased float exponent, 102..112
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;          // 14..24: mant >> shift gives units of 2^-24
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    r = static_cast<uint16_t>(sign | h);
  }
  return __half{r};
}

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t exp = (h.x >> 10) & 0x1fu, mant = h.x & 0x3ffu;
  if (exp == 0x1fu) return simt::bits_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    return sign ? -v : v;
  }
  return simt::bits_float(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = simt::float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fffu};
  const uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(r >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return simt::bits_float(static_cast<uint32_t>(b.x) << 16); }

inline __half __float2half(float f) { return __float2half_rn(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// Bit casts (cuda_fp16.h / cuda_bf16.h / the device runtime's).
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline unsigned __float_as_uint(float f) { return simt::float_bits(f); }
inline float __uint_as_float(unsigned u) { return simt::bits_float(u); }
