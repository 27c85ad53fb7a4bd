// Emulator stand-in: __nv_bfloat16 with round-to-nearest-even conversions.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = uint32_t(h.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u; std::memcpy(&u, &x, 4);
  __nv_bfloat16 h;
  if (std::isnan(x)) { h.bits = 0x7fc0; return h; }
  u += 0x7fffu + ((u >> 16) & 1u);
  h.bits = uint16_t(u >> 16);
  return h;
}
