// Branch-free float32 math for the Gaussian noise of the CPU kernels (noise contract v1, docs/noise.md).
//
// Why not libm: glibc's logf/sinf/cosf are scalar calls the compiler cannot vectorize (libmvec is only
// used under -ffast-math, which we cannot have: it would also break the exact dtype conversions and
// the bit-exact a * x + b * z). These versions are plain arithmetic on the restricted domains Box-Muller
// needs, so a loop over Philox calls vectorizes to the widest ISA, and they give the same bits on every
// x86/ARM machine (no libm version dependence) as long as FMA contraction is off (-ffp-contract=off).
//
// Accuracy (checked exhaustively over every possible input by csrc/tests/test_cpu_kernels.cpp):
//   log_unit:     < 1 ulp relative (musl/FreeBSD logf, whose reduction keeps log(u) relatively accurate
//                 near u = 1; an approximation with an absolute error bound would be wrong there).
//   sincospi:     a few float32 ulp absolute on (-1, 1).
// The normals are then within ~1e-6 of the float64 reference, far inside the contract's 1e-5 * (1+|z|).
// Torch-free; host code (the CUDA kernels use the CUDA math library, see csrc/cuda/).
#pragma once

#include <cstdint>
#include <cstring>

#include "fastmezo/philox.h"

namespace fastmezo {

FASTMEZO_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FASTMEZO_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// ln(u) for a normal float u in (0, 1] (Box-Muller's uniforms are in [2^-24, 1 - 2^-24]; no special
// cases). The reduction and polynomial of FreeBSD e_logf.c / musl logf (< 1 ulp):
// u = 2^k * m with m in [sqrt(2)/2, sqrt(2)), f = m - 1 (exact), s = f / (2 + f),
// ln(1 + f) = f - f^2/2 + s * (f^2/2 + R(s^2)).
FASTMEZO_HD float log_unit(float u) {
  const float ln2_hi = 6.9313812256e-01f;  // 0x3f317180
  const float ln2_lo = 9.0580006145e-06f;  // 0x3717f7d1
  const float Lg1 = 0.66666662693f;        // 0xaaaaaa.0p-24
  const float Lg2 = 0.40000972152f;        // 0xccce13.0p-25
  const float Lg3 = 0.28498786688f;        // 0x91e9ee.0p-25
  const float Lg4 = 0.24279078841f;        // 0xf89e26.0p-26
  uint32_t ix = float_as_bits(u);
  ix += 0x3f800000u - 0x3f3504f3u;
  const int32_t k = static_cast<int32_t>(ix >> 23) - 0x7f;
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  const float f = bits_as_float(ix) - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * (Lg2 + w * Lg4);
  const float t2 = z * (Lg1 + w * Lg3);
  const float R = t2 + t1;
  const float hfsq = 0.5f * f * f;
  const float dk = static_cast<float>(k);
  return s * (hfsq + R) + dk * ln2_lo - hfsq + f + dk * ln2_hi;
}

// sin(pi s) and cos(pi s) for |s| <= 1. Reduction: j = round(2 s), f = s - j / 2 in [-1/4, 1/4] (exact),
// then Taylor polynomials of sin(pi f), cos(pi f) (truncation error < 2e-9 on that interval) and a
// rotation by j quarter turns. For Box-Muller this is cos(t), sin(t) of t = pi * (2 u_b - 1) without
// rounding pi or t to float32 first, i.e. closer to the float64 reference than cosf(pi_f * s).
FASTMEZO_HD void sincospi(float s, float* sin_out, float* cos_out) {
  const float kRound = 12582912.0f;  // 1.5 * 2^23: (x + kRound) - kRound rounds x to an integer (|x| < 2^22)
  const float jf = (2.0f * s + kRound) - kRound;
  const float f = s - 0.5f * jf;
  const float f2 = f * f;
  const float sp = f * (3.14159265358979f +
                        f2 * (-5.16771278004997f +
                              f2 * (2.55016403987734f + f2 * (-0.599264529320792f + f2 * 0.0821458866111282f))));
  const float cp = 1.0f + f2 * (-4.93480220054468f +
                                f2 * (4.05871212641677f +
                                      f2 * (-1.33526276885459f + f2 * (0.235330630358893f + f2 * -0.0258068913900141f))));
  const uint32_t q = static_cast<uint32_t>(static_cast<int32_t>(jf)) & 3u;  // quarter turns mod 4
  // sin(x + q pi/2), cos(x + q pi/2): q = 0: (s, c); 1: (c, -s); 2: (-s, -c); 3: (-c, s).
  const float sn = (q & 1u) ? cp : sp;
  const float cs = (q & 1u) ? sp : cp;
  const uint32_t sin_sign = (q & 2u) << 30;          // q = 2, 3
  const uint32_t cos_sign = ((q + 1u) & 2u) << 30;   // q = 1, 2
  *sin_out = bits_as_float(float_as_bits(sn) ^ sin_sign);
  *cos_out = bits_as_float(float_as_bits(cs) ^ cos_sign);
}

// Box-Muller with the functions above: r = sqrt(-2 ln u_a), (r cos t, r sin t), t = pi (2 u_b - 1).
FASTMEZO_HD void box_muller_portable(uint32_t xa, uint32_t xb, float* n0, float* n1) {
  const float ua = uniform_from_bits(xa);
  const float ub = uniform_from_bits(xb);
  const float r = sqrtf(-2.0f * log_unit(ua));
  float sn, cs;
  sincospi(2.0f * ub - 1.0f, &sn, &cs);  // 2 u_b - 1 is exact in float32
  *n0 = r * cs;
  *n1 = r * sn;
}

}  // namespace fastmezo
