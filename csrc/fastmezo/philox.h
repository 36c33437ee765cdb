// fastmezo noise contract v1 (docs/noise.md): Philox4x32-10 and the normal / Rademacher generators.
// Torch-free and header-only, so the CPU kernels, the CUDA kernels and the standalone C++ tests all
// share one definition. Compiles as host code with any C++17 compiler and as host+device code with nvcc.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTMEZO_HD __host__ __device__ __forceinline__
#else
#define FASTMEZO_HD inline
#endif

namespace fastmezo {

constexpr int kNoiseVersion = 1;
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

enum Noise : uint32_t { kGaussian = 0, kRademacher = 1 };  // value = Philox stream id (counter word 3)
constexpr uint32_t kStreamSeedDerivation = 0x5EED5EEDu;

// Elements served by one Philox call: 4 normals (two Box-Muller pairs) or 128 sign bits.
constexpr uint32_t kGaussianPerCall = 4;
constexpr uint32_t kRademacherPerCall = 128;
FASTMEZO_HD uint32_t elements_per_call(Noise noise) {
  return noise == kGaussian ? kGaussianPerCall : kRademacherPerCall;
}

struct Words4 {
  uint32_t x[4];
};

FASTMEZO_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  // 32-bit multiplies (mul.hi.u32 / mul.lo.u32): from the 64-bit form NVVM can keep the whole Philox
  // state in 64-bit registers and emit emulated 64-bit multiplies.
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
#endif
}

// One Philox4x32 round with round key (k0, k1).
FASTMEZO_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo32(kPhiloxM0, c0, &hi0, &lo0);
  mulhilo32(kPhiloxM1, c2, &hi1, &lo1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// Philox4x32-10 of Random123. The 10 rounds are written out (not a loop) so that every compiler fully
// unrolls them: a loop over Philox calls then vectorizes across calls (CPU) and keeps the state in
// registers (CUDA).
FASTMEZO_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                 uint32_t k1) {
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0 + 1u * kPhiloxW0, k1 + 1u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 2u * kPhiloxW0, k1 + 2u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 3u * kPhiloxW0, k1 + 3u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 4u * kPhiloxW0, k1 + 4u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 5u * kPhiloxW0, k1 + 5u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 6u * kPhiloxW0, k1 + 6u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 7u * kPhiloxW0, k1 + 7u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 8u * kPhiloxW0, k1 + 8u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 9u * kPhiloxW0, k1 + 9u * kPhiloxW1);
  return Words4{{c0, c1, c2, c3}};
}

// The Philox words of call q = index // per_call of tensor `key` in stream `stream`.
FASTMEZO_HD Words4 noise_words(uint64_t seed, uint32_t key, uint32_t stream, uint64_t call) {
  return philox4x32_10(static_cast<uint32_t>(call), static_cast<uint32_t>(call >> 32), key, stream,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// u = (2 * (x >> 9) + 1) * 2^-24: exact in float32, in (0, 1).
FASTMEZO_HD float uniform_from_bits(uint32_t x) {
  return static_cast<float>((x >> 9) * 2u + 1u) * 5.9604644775390625e-08f;
}

// Box-Muller: r = sqrt(-2 ln u_a), t = pi * (2 u_b - 1); (r cos t, r sin t).
FASTMEZO_HD void box_muller(uint32_t xa, uint32_t xb, float* n0, float* n1) {
  const float ua = uniform_from_bits(xa);
  const float ub = uniform_from_bits(xb);
  const float r = sqrtf(-2.0f * logf(ua));
  const float t = 3.14159265358979323846f * (2.0f * ub - 1.0f);
  *n0 = r * cosf(t);
  *n1 = r * sinf(t);
}

// z of global element `index` of tensor `key` (slow path: one Philox call per element; kernels
// share each call between the 4 or 128 elements it serves).
FASTMEZO_HD float noise_at(uint64_t seed, uint32_t key, uint64_t index, Noise noise) {
  if (noise == kGaussian) {
    const Words4 w = noise_words(seed, key, kGaussian, index >> 2);
    const int lane = static_cast<int>(index & 3u);
    float n0, n1;
    box_muller(w.x[lane & 2], w.x[(lane & 2) + 1], &n0, &n1);
    return (lane & 1) ? n1 : n0;
  }
  const Words4 w = noise_words(seed, key, kRademacher, index >> 7);
  const uint32_t lane = static_cast<uint32_t>(index & 127u);
  const uint32_t bit = (w.x[lane >> 5] >> (lane & 31u)) & 1u;
  return 1.0f - 2.0f * static_cast<float>(bit);
}

// Seed of direction `direction` of step `step` from a run's base seed (docs/noise.md section 6).
FASTMEZO_HD uint64_t derive_seed(uint64_t base_seed, uint64_t step, uint32_t direction) {
  const Words4 w = philox4x32_10(static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), direction,
                                 kStreamSeedDerivation, static_cast<uint32_t>(base_seed),
                                 static_cast<uint32_t>(base_seed >> 32));
  return static_cast<uint64_t>(w.x[0]) | (static_cast<uint64_t>(w.x[1]) << 32);
}

}  // namespace fastmezo
