// Checks csrc/fastmezo/philox.h against the fixed values of docs/noise.md: the Random123 known-answer
// vectors (bit for bit), the first normals and signs of a documented (seed, key, index), the seed
// derivation, and the stochastic-rounding stream of section 8 (rounding seed of a pass, 16-bit draws of
// documented indices). Run by ctest.
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "fastmezo/philox.h"
#include "fastmezo/rounding.h"

static int failures = 0;

static void expect_words(const char* what, fastmezo::Words4 got, const uint32_t (&want)[4]) {
  for (int i = 0; i < 4; ++i) {
    if (got.x[i] != want[i]) {
      std::printf("FAIL %s word %d: got %08x want %08x\n", what, i, got.x[i], want[i]);
      ++failures;
    }
  }
}

static void expect_close(const char* what, float got, float want, float tol) {
  if (!(std::fabs(got - want) <= tol)) {
    std::printf("FAIL %s: got %.7f want %.7f\n", what, got, want);
    ++failures;
  }
}

int main() {
  using namespace fastmezo;
  expect_words("KAT zeros", philox4x32_10(0, 0, 0, 0, 0, 0), {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
  expect_words("KAT ones", philox4x32_10(~0u, ~0u, ~0u, ~0u, ~0u, ~0u),
               {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
  expect_words("KAT pi", philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u),
               {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});

  const uint64_t seed = 0x0123456789ABCDEFull;
  expect_words("call 0 gaussian", noise_words(seed, 7, kGaussian, 0), {0x34b23a77u, 0x8ec43d26u, 0xfdbf9305u, 0xa6c02cf2u});
  const float gaussian[8] = {1.6624960f, 0.6303767f, 0.0772026f, 0.1082067f,
                             -0.1629310f, -0.1542159f, -0.2289213f, 1.6609565f};
  for (int i = 0; i < 8; ++i) expect_close("gaussian z", noise_at(seed, 7, i, kGaussian), gaussian[i], 1e-5f * (1 + std::fabs(gaussian[i])));
  expect_close("gaussian z[2^32]", noise_at(seed, 7, 1ull << 32, kGaussian), -0.9015923f, 2e-5f);
  expect_close("gaussian z[2^32+1]", noise_at(seed, 7, (1ull << 32) + 1, kGaussian), 1.2910055f, 3e-5f);
  expect_close("gaussian z[2^40+3]", noise_at(seed, 7, (1ull << 40) + 3, kGaussian), -0.6229761f, 2e-5f);
  const float signs[8] = {-1, 1, 1, -1, -1, 1, -1, -1};
  for (int i = 0; i < 8; ++i) expect_close("rademacher z", noise_at(seed, 7, i, kRademacher), signs[i], 0.0f);

  if (derive_seed(0, 0, 0) != 0x3ed3f23b51dc4d72ull) { std::printf("FAIL derive_seed(0, 0)\n"); ++failures; }
  if (derive_seed(42, 1, 0) != 0x2734ca6d65657f26ull) { std::printf("FAIL derive_seed(42, 1, 0)\n"); ++failures; }
  if (derive_seed(42, 1, 1) != 0x5ce0a76b78e38996ull) { std::printf("FAIL derive_seed(42, 1, 1)\n"); ++failures; }

  // Section 8: rounding_seed(seed, pass) = words 0, 1 of Philox(counter (pass lo, pass hi, 0, 2), key seed).
  const uint64_t pass_seeds[3] = {0x5f6468e346c5fd35ull, 0xac58cde726db1478ull, 0x6bd190155b7b3816ull};
  for (uint32_t pass = 0; pass < 3; ++pass) {
    const Words4 w = philox4x32_10(pass, 0, 0, kStreamRounding, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    const uint64_t got = static_cast<uint64_t>(w.x[0]) | (static_cast<uint64_t>(w.x[1]) << 32);
    if (got != pass_seeds[pass]) { std::printf("FAIL rounding_seed(seed, %u): %016llx\n", pass, static_cast<unsigned long long>(got)); ++failures; }
  }
  // Draws of round seed 0x0123456789ABCDEF, key 7: the words of call 0, elements 0..7, 2^32, 2^32 + 1, 2^40 + 3.
  expect_words("rounding call 0", noise_words(seed, 7, kStreamRounding, 0), {0x6afbfcc7u, 0x6b80b5e9u, 0x80ccb903u, 0x75190327u});
  const uint64_t draw_index[11] = {0, 1, 2, 3, 4, 5, 6, 7, 1ull << 32, (1ull << 32) + 1, (1ull << 40) + 3};
  const uint32_t draws[11] = {0xfcc7, 0x6afb, 0xb5e9, 0x6b80, 0xb903, 0x80cc, 0x0327, 0x7519, 0x0071, 0xfb8c, 0x43d2};
  for (int i = 0; i < 11; ++i) {
    const uint32_t got = rounding_bits_at(seed, 7, draw_index[i]);
    if (got != draws[i]) {
      std::printf("FAIL rounding draw of element %llu: got %04x want %04x\n", static_cast<unsigned long long>(draw_index[i]), got, draws[i]);
      ++failures;
    }
  }

  if (failures == 0) std::printf("noise contract v%d: all checks passed\n", kNoiseVersion);
  return failures == 0 ? 0 : 1;
}
