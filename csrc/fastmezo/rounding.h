// Stochastic rounding of float32 results to float16 / bfloat16 (docs/noise.md section 8), torch-free and
// header-only: the CPU kernels, the CUDA kernels and the C++ tests share this one definition, which
// mirrors the torch oracle fastmezo.reference.round_stochastic operation for operation, so every backend
// stores the same bits for the same float32 y and the same 16-bit draw r.
//
//   r     = 16-bit draw of element i of tensor `key`: Philox4x32-10 keyed by the pass's rounding seed,
//           counter (i / 8 low, i / 8 high, key, 2); word (i % 8) / 2, low half for even i, high for odd.
//   lo    = y rounded toward zero to the storage type; hi = the next value of that type away from zero;
//   q     = 2^16 |y - lo| / |hi - lo|  (exact in float32: hi - lo is a power of two);
//   store hi if q + r >= 2^16 (float32 sum, as the oracle computes it), else lo.
//
// Non-finite y: q is NaN, the comparison is false, the result is round-to-nearest (NaN stays NaN, inf
// stays inf). Finite y beyond the largest finite value: lo = the largest finite value, hi = inf, q = 0:
// saturates. Written without branches (bit selects) so that the CPU element loops vectorize.
#pragma once

#include <cstdint>

#include "fastmezo/dtypes.h"
#include "fastmezo/philox.h"

namespace fastmezo {

constexpr uint32_t kStreamRounding = 2;       // Philox stream id of the rounding bits (counter word 3)
constexpr uint32_t kRoundingPerCall = 8;      // 16-bit draws per Philox call

// The 16-bit draw of global element `index` of tensor `key` (slow path, one Philox call per element;
// the kernels share each call between its 8 elements).
FASTMEZO_HD uint32_t rounding_bits_at(uint64_t round_seed, uint32_t key, uint64_t index) {
  const Words4 w = noise_words(round_seed, key, kStreamRounding, index >> 3);
  const uint32_t lane = static_cast<uint32_t>(index & 7u);
  return (w.x[lane >> 1] >> (16u * (lane & 1u))) & 0xFFFFu;
}

// The four words of one rounding call as its 8 draws, in element order (the kernels' fast path).
FASTMEZO_HD void rounding_draws_of_call(const uint32_t (&w)[4], uint32_t (&r)[8]) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < 4; ++k) {
    r[2 * k] = w[k] & 0xFFFFu;
    r[2 * k + 1] = w[k] >> 16;
  }
}

namespace detail {
// Explicitly rounded float32 operations: on the GPU, nvcc must not contract or reassociate them (the
// oracle rounds every step); on the CPU the build has -ffp-contract=off and no -ffast-math.
FASTMEZO_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FASTMEZO_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTMEZO_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTMEZO_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);  // IEEE division whatever -prec-div says
#else
  return a / b;
#endif
}
// |f| by clearing the sign bit (no libm call, vectorizes; NaN stays NaN).
FASTMEZO_HD float abs_bits(float f) { return bits_as_float(float_as_bits(f) & 0x7FFFFFFFu); }
}  // namespace detail

// 16-bit storage types: float32 -> bits rounded to nearest even, and bits -> float32 (exact).
template <DType D>
struct Float16Like;
template <>
struct Float16Like<DType::kFloat16> {
  static FASTMEZO_HD uint16_t from_float(float f) { return float_to_fp16(f); }
  static FASTMEZO_HD float to_float(uint16_t h) { return fp16_to_float(h); }
};
template <>
struct Float16Like<DType::kBFloat16> {
  static FASTMEZO_HD uint16_t from_float(float f) { return float_to_bf16(f); }
  static FASTMEZO_HD float to_float(uint16_t h) { return bf16_to_float(h); }
};

// float32 y -> float16 / bfloat16 bits, rounded stochastically with the 16-bit draw r (< 2^16).
// The oracle's steps, one by one (fastmezo/reference.py round_stochastic):
//   nearest = y.to(dtype); overshoot = |nearest| > |y|; lo = bits(nearest) - overshoot; hi = lo + 1
//   (16-bit patterns: magnitudes are ordered like the patterns, sign bit aside, so -1 / +1 step the
//   magnitude toward / away from zero for either sign); q = |y - lo| / |hi - lo| * 65536;
//   up = q + r >= 65536.
template <DType D>
FASTMEZO_HD uint16_t round_stochastic(float y, uint32_t r) {
  using T = Float16Like<D>;
  const uint16_t nearest = T::from_float(y);
  const bool overshoot = detail::abs_bits(T::to_float(nearest)) > detail::abs_bits(y);  // false for NaN
  const uint16_t lo = static_cast<uint16_t>(nearest - static_cast<uint16_t>(overshoot));
  const uint16_t hi = static_cast<uint16_t>(lo + 1u);
  const float lo_f = T::to_float(lo);
  const float hi_f = T::to_float(hi);
  const float q = detail::mul_rn(
      detail::div_rn(detail::abs_bits(detail::sub_rn(y, lo_f)), detail::abs_bits(detail::sub_rn(hi_f, lo_f))),
      65536.0f);
  // q + r in float32, like the oracle (for |y| far below the smallest subnormal of the type, q has
  // fraction bits and the sum can round up to 2^16: the oracle's behaviour, reproduced exactly).
  const bool up = detail::add_rn(q, static_cast<float>(r)) >= 65536.0f;  // NaN q (inf / NaN y): false
  return static_cast<uint16_t>(select_u32(up, hi, lo));
}

// Runtime-dtype version (tests, slow paths). float32 is never rounded stochastically: returns nothing
// meaningful for it, callers store float32 directly.
FASTMEZO_HD uint16_t round_stochastic(DType dtype, float y, uint32_t r) {
  return dtype == DType::kFloat16 ? round_stochastic<DType::kFloat16>(y, r) : round_stochastic<DType::kBFloat16>(y, r);
}

}  // namespace fastmezo
