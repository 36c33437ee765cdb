#pragma once
// MOCK for csrc/tests/test_cuda_emulated.cpp (see cuda_runtime.h here).
#include <cmath>
struct __half { unsigned short x; };
inline __half __ushort_as_half(unsigned short h) { return __half{h}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float __half2float(__half h) {
  const int s = h.x >> 15, e = (h.x >> 10) & 31, m = h.x & 1023;
  double v = e == 0 ? std::ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(1024 + m, e - 25);
  return static_cast<float>(s ? -v : v);
}
inline __half __float2half_rn(float f) { _Float16 h = static_cast<_Float16>(f); unsigned short u; __builtin_memcpy(&u, &h, 2); return __half{u}; }
