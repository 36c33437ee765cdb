// Storage dtypes of the fused pass and exact, branch-free float32 <-> float16 / bfloat16 conversions.
//
// Torch-free on purpose: the CPU kernels must build without torch (CMake, ctest), so they cannot use
// c10::Half / c10::BFloat16. The conversions round to nearest, ties to even (as torch's .to(dtype) and
// the CUDA __float2half_rn / __float2bfloat16_rn intrinsics do), handle subnormals, infinities and NaN,
// and are written without branches so that the element loops vectorize. float16 follows
// Maratyszcza's FP16 library (the algorithm c10::Half uses); they need IEEE float32 arithmetic in
// round-to-nearest (no -ffast-math).
#pragma once

#include <cstdint>

#include "fastmezo/fastmath.h"

namespace fastmezo {

// What a tensor stores. The values are part of the torch-free API (bindings map torch dtypes to them).
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

FASTMEZO_HD int dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// c ? a : b with masks instead of a branch: GCC does not if-convert some ternaries in the element loops,
// which then do not vectorize ("control flow in loop").
FASTMEZO_HD uint32_t select_u32(bool c, uint32_t a, uint32_t b) {
  return b ^ ((a ^ b) & (0u - static_cast<uint32_t>(c)));
}

// bfloat16 bits -> float32: the bfloat16 is the top half of a float32.
FASTMEZO_HD float bf16_to_float(uint16_t h) { return bits_as_float(static_cast<uint32_t>(h) << 16); }

// float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 (c10's quiet NaN).
FASTMEZO_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_as_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(select_u32(is_nan, 0x7FC0u, rounded));
}

// float16 bits -> float32 (exact for every half, subnormals included).
FASTMEZO_HD float fp16_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = bits_as_float((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = bits_as_float((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | select_u32(two_w < denormalized_cutoff, float_as_bits(denormalized), float_as_bits(normalized));
  return bits_as_float(result);
}

// float32 -> float16 bits, round to nearest even; overflow to infinity; NaN -> quiet NaN (sign kept).
// The rounding is done by float32 additions at the right exponent (see FP16's fp16_ieee_from_fp32_value).
FASTMEZO_HD uint16_t float_to_fp16(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const uint32_t w = float_as_bits(f);
  float base = (bits_as_float(w & 0x7FFFFFFFu) * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = select_u32(bias < 0x71000000u, 0x71000000u, bias);
  base = bits_as_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_as_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | select_u32(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
}

}  // namespace fastmezo
