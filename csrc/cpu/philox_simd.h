// Philox4x32-10 for many consecutive counters at once, with x86 SIMD intrinsics (AVX-512F, AVX2) and a
// portable fallback; the ISA is chosen once at run time. Private to the CPU kernels (csrc/cpu/).
//
// Why intrinsics: the scalar definition (csrc/fastmezo/philox.h) does auto-vectorize, but GCC packs and
// unpacks 64-bit products around every 32x32 -> 64-bit multiply (about 16 cycles per call with
// AVX-512, 60% of the Gaussian pass). Here one multiply of 16 (8) lanes is two vpmuludq (even and odd
// lanes) and two blends, with no repacking: about 4x faster. Results are the same words bit for bit
// (the CPU kernel tests compare every output with the scalar noise_at).
#pragma once

#include <cstdint>

#include "fastmezo/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTMEZO_NO_SIMD_PHILOX)
#define FASTMEZO_X86_PHILOX 1
#include <immintrin.h>
#endif

namespace fastmezo {
namespace cpu {

// Words of Philox calls first_call .. first_call + ncalls - 1 (counter (q lo, q hi, key, stream),
// key = seed), as four arrays: out[w * stride + i] = word w of call first_call + i. Writes up to
// ncalls rounded up to a multiple of 16 (extra calls are computed and ignored): stride and the buffer
// must leave room for that.
using PhiloxWordsFn = void (*)(uint64_t first_call, int ncalls, uint32_t key, uint32_t stream, uint64_t seed,
                               uint32_t* out, int stride);

inline void philox_words_portable(uint64_t first_call, int ncalls, uint32_t key, uint32_t stream, uint64_t seed,
                                  uint32_t* out, int stride) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t lo = static_cast<uint32_t>(first_call), hi = static_cast<uint32_t>(first_call >> 32);
  uint32_t* __restrict o0 = out;
  uint32_t* __restrict o1 = out + stride;
  uint32_t* __restrict o2 = out + 2 * stride;
  uint32_t* __restrict o3 = out + 3 * stride;
  for (int i = 0; i < ncalls; ++i) {
    const uint32_t c0 = lo + static_cast<uint32_t>(i);
    const uint32_t c1 = hi + (c0 < lo ? 1u : 0u);
    const Words4 w = philox4x32_10(c0, c1, key, stream, k0, k1);
    o0[i] = w.x[0];
    o1[i] = w.x[1];
    o2[i] = w.x[2];
    o3[i] = w.x[3];
  }
}

#if defined(FASTMEZO_X86_PHILOX)

// GCC 12 warns "may be used uninitialized" inside its own _mm512_mul_epu32 (a false positive of the
// intrinsic's masked form); silenced for these functions only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

__attribute__((target("avx512f"))) inline void philox_words_avx512(uint64_t first_call, int ncalls, uint32_t key,
                                                                   uint32_t stream, uint64_t seed, uint32_t* out,
                                                                   int stride) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_call)));
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_call >> 32)));
  const __mmask16 odd = 0xAAAA;
  for (int i = 0; i < ncalls; i += 16) {
    __m512i c0 = _mm512_add_epi32(lo, _mm512_add_epi32(iota, _mm512_set1_epi32(i)));
    // high word: + 1 where the low word wrapped past 2^32
    __m512i c1 = _mm512_mask_add_epi32(hi, _mm512_cmplt_epu32_mask(c0, lo), hi, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(key));
    __m512i c3 = _mm512_set1_epi32(static_cast<int>(stream));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {  // unrolled by the compiler (constant trip count)
      const __m512i e0 = _mm512_mul_epu32(c0, m0);                          // even lanes: full products
      const __m512i o0 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);   // odd lanes
      const __m512i e1 = _mm512_mul_epu32(c2, m1);
      const __m512i o1 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
      const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(e0, 32), o0);
      const __m512i lo0 = _mm512_mask_blend_epi32(odd, e0, _mm512_slli_epi64(o0, 32));
      const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(e1, 32), o1);
      const __m512i lo1 = _mm512_mask_blend_epi32(odd, e1, _mm512_slli_epi64(o1, 32));
      c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // a ^ b ^ c
      c1 = lo1;
      c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    _mm512_storeu_si512(out + i, c0);
    _mm512_storeu_si512(out + stride + i, c1);
    _mm512_storeu_si512(out + 2 * stride + i, c2);
    _mm512_storeu_si512(out + 3 * stride + i, c3);
  }
}

__attribute__((target("avx2"))) inline void philox_words_avx2(uint64_t first_call, int ncalls, uint32_t key,
                                                              uint32_t stream, uint64_t seed, uint32_t* out,
                                                              int stride) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_call)));
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_call >> 32)));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int i = 0; i < ncalls; i += 8) {
    __m256i c0 = _mm256_add_epi32(lo, _mm256_add_epi32(iota, _mm256_set1_epi32(i)));
    // unsigned c0 < lo via signed compare of sign-flipped values; the mask is -1 where it wrapped
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(lo, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(hi, wrapped);
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(key));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(stream));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      const __m256i e0 = _mm256_mul_epu32(c0, m0);
      const __m256i o0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
      const __m256i e1 = _mm256_mul_epu32(c2, m1);
      const __m256i o1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
      const __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(e1, _mm256_slli_epi64(o1, 32), 0xAA);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c3 = lo0;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + stride + i), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * stride + i), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 3 * stride + i), c3);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // FASTMEZO_X86_PHILOX

// The fastest version this CPU runs (chosen once).
inline PhiloxWordsFn philox_words() {
#if defined(FASTMEZO_X86_PHILOX)
  static const PhiloxWordsFn fn = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return &philox_words_avx512;
    if (__builtin_cpu_supports("avx2")) return &philox_words_avx2;
    return &philox_words_portable;
  }();
  return fn;
#else
  return &philox_words_portable;
#endif
}

}  // namespace cpu
}  // namespace fastmezo
