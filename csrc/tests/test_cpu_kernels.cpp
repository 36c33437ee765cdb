// Checks the torch-free CPU kernels (csrc/cpu/) against the noise contract (docs/noise.md), with no
// torch: run by ctest (CMakeLists.txt).
//   1. The float32 math of the vectorized Box-Muller (csrc/fastmezo/fastmath.h), exhaustively: every one
//      of the 2^23 possible uniforms through log_unit and sincospi against float64, and the resulting
//      bound on |dz| against the contract's 1e-5 * (1 + |z|).
//   2. The float16 / bfloat16 conversions (csrc/fastmezo/dtypes.h): every half decodes exactly, and
//      float32 -> half / bfloat16 rounds to nearest even (checked against neighbours, and against the
//      compiler's _Float16 where it has one).
//   3. The kernel (fastmezo::cpu::axpbz) against noise_at of csrc/fastmezo/philox.h for float32, float16,
//      bfloat16, Gaussian and Rademacher, load_x on and off, odd sizes, unaligned offsets beyond 2^32,
//      several tensors per call, sentinels past the end, and 1 vs 2 threads (bit-identical).
//   4. The fixed values of docs/noise.md section 7 through the kernel.
//   5. The SIMD Philox versions of the CPU kernels (csrc/cpu/philox_simd.h) against the scalar one, bit for
//      bit, on every ISA this CPU has, across the 2^32 boundary of the counter's low word.
//   6. Stochastic rounding (csrc/fastmezo/rounding.h, docs/noise.md section 8): fixed cases (halfway-ish,
//      negative, zeros, float16 subnormals, beyond the largest finite value, NaN / inf), an independent
//      float64 implementation on sampled float32 values and draws, exact unbiasedness over all 2^16 draws,
//      and the kernel with rounding on (in place, out of place, noise fill, both noises, thread counts)
//      against round_stochastic(y, rounding_bits_at(...)) element by element.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu/philox_simd.h"
#include "fastmezo/axpbz.h"
#include "fastmezo/dtypes.h"
#include "fastmezo/fastmath.h"
#include "fastmezo/philox.h"
#include "fastmezo/rounding.h"

using namespace fastmezo;

static int failures = 0;

#define CHECK(cond, ...)                     \
  do {                                       \
    if (!(cond)) {                           \
      if (failures < 30) {                   \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);            \
        std::printf("\n");                   \
      }                                      \
      ++failures;                            \
    }                                        \
  } while (0)

// ---------------------------------------------------------------------------------------------
// 1. Box-Muller math, exhaustively
// ---------------------------------------------------------------------------------------------
static void test_fast_math() {
  double max_r_err = 0, max_trig_err = 0, max_rel_log = 0;
  for (uint32_t k = 0; k < (1u << 23); ++k) {
    const uint32_t bits = k << 9;  // every value of x >> 9
    const float u = uniform_from_bits(bits);
    const double ud = (2.0 * k + 1.0) * std::ldexp(1.0, -24);
    CHECK(static_cast<double>(u) == ud, "uniform k=%u", k);
    const double log_ref = std::log(ud);
    const double log_got = log_unit(u);
    max_rel_log = std::fmax(max_rel_log, std::fabs(log_got - log_ref) / std::fabs(log_ref));
    const double r_ref = std::sqrt(-2.0 * log_ref);
    const double r_got = sqrtf(-2.0f * log_unit(u));
    max_r_err = std::fmax(max_r_err, std::fabs(r_got - r_ref));
    const float s = 2.0f * u - 1.0f;
    float sn, cs;
    sincospi(s, &sn, &cs);
    const double t = M_PI * (2.0 * ud - 1.0);
    max_trig_err = std::fmax(max_trig_err, std::fmax(std::fabs(sn - std::sin(t)), std::fabs(cs - std::cos(t))));
  }
  // z = r * trig: |dz| <= dr * 1 + r_max * dtrig + rounding of the product (|z| 2^-24 <= 3.5e-7).
  const double r_max = std::sqrt(2.0 * 24.0 * std::log(2.0));
  const double dz = max_r_err + r_max * max_trig_err + r_max * std::ldexp(1.0, -24);
  std::printf("fast math: log rel err %.3g, |dr| <= %.3g, |dsin|,|dcos| <= %.3g  =>  |dz| <= %.3g (contract 1e-5)\n",
              max_rel_log, max_r_err, max_trig_err, dz);
  CHECK(max_rel_log < 2.4e-7, "log_unit relative error %g", max_rel_log);
  CHECK(dz < 1e-5, "Box-Muller error bound %g", dz);
}

// ---------------------------------------------------------------------------------------------
// 2. dtype conversions
// ---------------------------------------------------------------------------------------------
static double half_value(uint16_t h) {  // exact decode, written independently of dtypes.h
  const int sign = h >> 15, exp = (h >> 10) & 31, man = h & 1023;
  double v = exp == 0 ? std::ldexp(man, -24) : exp == 31 ? (man ? NAN : INFINITY) : std::ldexp(1024 + man, exp - 25);
  return sign ? -v : v;
}

static double bf16_value(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 7) & 255, man = h & 127;
  double v = exp == 0 ? std::ldexp(man, -133) : exp == 255 ? (man ? NAN : INFINITY) : std::ldexp(128 + man, exp - 134);
  return sign ? -v : v;
}

// h must be the nearest representable value to f, ties to an even mantissa (checked against the
// neighbours h - 1 and h + 1 in magnitude).
template <class Value>
static bool is_nearest_even(float f, uint16_t h, Value value) {
  const double v = value(h);
  if (std::isnan(f)) return std::isnan(v);
  const double fd = f;
  if (std::isinf(v)) {  // overflow: f must be at least halfway beyond the largest finite value
    const uint16_t max_finite = static_cast<uint16_t>((h & 0x7FFF) - 1) | (h & 0x8000);
    const double m = value(max_finite);
    const double next = std::fabs(m) + (std::fabs(m) - std::fabs(value(static_cast<uint16_t>(max_finite - 1))));
    return (v > 0) == (fd > 0) && std::fabs(fd) >= (std::fabs(m) + next) / 2;
  }
  const double err = std::fabs(fd - v);
  for (int d : {-1, 1}) {
    const uint16_t mag = h & 0x7FFF;
    if ((mag == 0 && d < 0)) continue;
    const uint16_t n = static_cast<uint16_t>((h & 0x8000) | (mag + d));
    const double nv = value(n);
    if (std::isinf(nv) || std::isnan(nv)) continue;
    const double nerr = std::fabs(fd - nv);
    if (nerr < err) return false;
    if (nerr == err && (h & 1)) return false;  // tie: the even one wins
  }
  return true;
}

static void test_conversions() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const double want = half_value(static_cast<uint16_t>(h));
    const float got = fp16_to_float(static_cast<uint16_t>(h));
    CHECK((std::isnan(want) && std::isnan(got)) || static_cast<double>(got) == want, "fp16_to_float %04x", h);
    CHECK(float_to_fp16(got) == h || std::isnan(got), "fp16 round trip %04x", h);
    const double want_bf = bf16_value(static_cast<uint16_t>(h));
    const float got_bf = bf16_to_float(static_cast<uint16_t>(h));
    CHECK((std::isnan(want_bf) && std::isnan(got_bf)) || static_cast<double>(got_bf) == want_bf, "bf16_to_float %04x", h);
    CHECK(float_to_bf16(got_bf) == h || std::isnan(got_bf), "bf16 round trip %04x", h);
  }
  // Float32 values spread over the whole bit range (every 28693rd bit pattern and its 7 neighbours at
  // stride 7), so every exponent, sign, subnormals, infinities and NaNs are covered.
  uint64_t checked = 0;
  for (uint64_t b = 0; b < (1ull << 32); b += 7 * 4099) {
    for (uint32_t d = 0; d < 7 * 8; d += 7) {  // a few neighbours of each sample, to hit ties
      const uint32_t bits = static_cast<uint32_t>(b + d);
      const float f = bits_as_float(bits);
      const uint16_t h = float_to_fp16(f);
      const uint16_t bf = float_to_bf16(f);
      CHECK(is_nearest_even(f, h, half_value), "float_to_fp16(%08x) = %04x", bits, h);
      CHECK(is_nearest_even(f, bf, bf16_value), "float_to_bf16(%08x) = %04x", bits, bf);
#if defined(__FLT16_MAX__)
      if (!std::isnan(f)) {
        const _Float16 ref = static_cast<_Float16>(f);
        uint16_t rb;
        std::memcpy(&rb, &ref, 2);
        CHECK(rb == h, "float_to_fp16(%08x) = %04x, _Float16 says %04x", bits, h, rb);
      }
#endif
      ++checked;
    }
  }
  // Ties: exactly halfway between two halves / bfloat16s.
  CHECK(float_to_fp16(1.0f + std::ldexp(1.0f, -11)) == 0x3C00, "fp16 tie to even (down)");
  CHECK(float_to_fp16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02, "fp16 tie to even (up)");
  CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3F80, "bf16 tie to even (down)");
  CHECK(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3F82, "bf16 tie to even (up)");
  CHECK(float_to_fp16(65520.0f) == 0x7C00 && float_to_fp16(65519.0f) == 0x7BFF, "fp16 overflow");
  std::printf("conversions: all 65536 halves and bfloat16s, %llu sampled float32 values\n",
              static_cast<unsigned long long>(checked));
}

// ---------------------------------------------------------------------------------------------
// 3. The kernel against noise_at
// ---------------------------------------------------------------------------------------------
struct Buffer {
  DType dtype;
  std::vector<uint8_t> bytes;  // numel + kPad elements; the pad holds a sentinel
};
constexpr int kPad = 64;

static float load(const Buffer& buf, int64_t i) {
  if (buf.dtype == DType::kFloat32) { float f; std::memcpy(&f, &buf.bytes[4 * i], 4); return f; }
  uint16_t h; std::memcpy(&h, &buf.bytes[2 * i], 2);
  return buf.dtype == DType::kFloat16 ? fp16_to_float(h) : bf16_to_float(h);
}

static void store(Buffer& buf, int64_t i, float v) {
  if (buf.dtype == DType::kFloat32) { std::memcpy(&buf.bytes[4 * i], &v, 4); return; }
  const uint16_t h = buf.dtype == DType::kFloat16 ? float_to_fp16(v) : float_to_bf16(v);
  std::memcpy(&buf.bytes[2 * i], &h, 2);
}

static float round_to(DType d, float v) {
  return d == DType::kFloat32 ? v : d == DType::kFloat16 ? fp16_to_float(float_to_fp16(v)) : bf16_to_float(float_to_bf16(v));
}

static double ulp_of(DType d, double v) {
  const int mant = d == DType::kFloat32 ? 23 : d == DType::kFloat16 ? 10 : 7;
  const double min_normal = d == DType::kFloat16 ? std::ldexp(1.0, -14) : std::ldexp(1.0, -126);
  const double a = std::fmax(std::fabs(v), min_normal);
  return std::ldexp(1.0, std::ilogb(a) - mant);
}

static uint64_t lcg_state = 0x853c49e6748fea9bull;
static float rand_normalish() {
  lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
  const double u = ((lcg_state >> 11) + 0.5) * std::ldexp(1.0, -53);
  return static_cast<float>((u - 0.5) * 4.0);
}

static void test_kernel_case(DType dtype, Noise noise, bool load_x, const std::vector<int64_t>& sizes,
                             const std::vector<uint64_t>& offsets, int threads) {
  const uint64_t seed = 0xFEDCBA9876543210ull;
  std::vector<Buffer> bufs(sizes.size());
  std::vector<std::vector<float>> x0(sizes.size());
  std::vector<AxpbzTensor> args;
  const float sentinel = -1088.0f;  // exact in float32, float16 and bfloat16
  for (size_t t = 0; t < sizes.size(); ++t) {
    Buffer& b = bufs[t];
    b.dtype = dtype;
    b.bytes.assign(static_cast<size_t>(sizes[t] + kPad) * dtype_size(dtype), 0);
    for (int64_t i = 0; i < sizes[t]; ++i) {
      store(b, i, load_x ? rand_normalish() : NAN);  // noise fill must never read x
      x0[t].push_back(load(b, i));
    }
    for (int64_t i = sizes[t]; i < sizes[t] + kPad; ++i) store(b, i, sentinel);
    args.push_back(AxpbzTensor{b.bytes.data(), sizes[t], offsets[t], 0.75f - 0.125f * static_cast<float>(t),
                               t % 2 ? -0.3f : 0.01f, static_cast<uint32_t>(100 + 7 * t), dtype});
  }
  cpu::axpbz(args.data(), static_cast<int64_t>(args.size()), seed, noise, load_x, threads);
  for (size_t t = 0; t < sizes.size(); ++t) {
    const AxpbzTensor& a = args[t];
    for (int64_t i = 0; i < sizes[t]; ++i) {
      const float z = noise_at(seed, a.key, a.offset + i, noise);
      // The float32 value of the pass with the slow-path z: products and sum rounded separately.
      const float ax = a.a * x0[t][i];
      const float bz = a.b * z;
      const float want32 = load_x ? ax + bz : bz;
      const float want = round_to(dtype, want32);
      const float got = load(bufs[t], i);
      if (noise == kRademacher) {
        CHECK(got == want, "rademacher dtype %d tensor %zu element %lld: got %.9g want %.9g", static_cast<int>(dtype), t,
              static_cast<long long>(i), got, want);
      } else {
        // Normals differ from noise_at's libm normals by < 1e-5 (1 + |z|) (contract); in the dtype the
        // final rounding may then move by one ulp.
        const double tol = std::fabs(a.b) * 1e-5 * (1 + std::fabs(z)) + 2 * ulp_of(DType::kFloat32, want32) +
                           (dtype == DType::kFloat32 ? 0.0 : ulp_of(dtype, want32));
        CHECK(std::fabs(static_cast<double>(got) - want32) <= tol, "gaussian dtype %d tensor %zu element %lld: got %.9g want %.9g",
              static_cast<int>(dtype), t, static_cast<long long>(i), got, want32);
      }
    }
    for (int64_t i = sizes[t]; i < sizes[t] + kPad; ++i) {
      CHECK(load(bufs[t], i) == sentinel, "sentinel overwritten past the end of tensor %zu (element %lld)", t,
            static_cast<long long>(i));
    }
  }
}

static std::vector<std::vector<uint8_t>> run_bytes(DType dtype, Noise noise, int threads, int64_t n, uint64_t offset) {
  Buffer b{dtype, std::vector<uint8_t>(static_cast<size_t>(n) * dtype_size(dtype))};
  for (int64_t i = 0; i < n; ++i) store(b, i, 0.001f * static_cast<float>(i % 1000));
  AxpbzTensor a{b.bytes.data(), n, offset, 0.999f, 0.01f, 3, dtype};
  cpu::axpbz(&a, 1, 42, noise, true, threads);
  return {b.bytes};
}

static void test_kernel() {
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const Noise noises[] = {kGaussian, kRademacher};
  for (DType d : dtypes) {
    for (Noise nz : noises) {
      for (bool load_x : {true, false}) {
        // Sizes around Philox-call and block boundaries, offsets unaligned and beyond 2^32.
        test_kernel_case(d, nz, load_x, {0, 1, 3, 127, 4097, 2049, 70001}, {0, 5, 2, 129, (1ull << 32) - 3, 2047, 3}, 2);
        test_kernel_case(d, nz, load_x, {257}, {(1ull << 40) + 3}, 1);
      }
    }
  }
  // Thread-count independence, on a size that spans several work items.
  for (DType d : dtypes) {
    for (Noise nz : noises) {
      const auto one = run_bytes(d, nz, 1, 300001, 11);
      const auto two = run_bytes(d, nz, 2, 300001, 11);
      const auto three = run_bytes(d, nz, 3, 300001, 11);
      CHECK(one == two && two == three, "thread count changes the result (dtype %d, noise %d)", static_cast<int>(d),
            static_cast<int>(nz));
    }
  }
  std::printf("kernel: float32/float16/bfloat16 x Gaussian/Rademacher x load_x checked against noise_at (OpenMP: %s)\n",
              cpu::has_openmp() ? "yes" : "no");
}

// ---------------------------------------------------------------------------------------------
// 4. The fixed values of docs/noise.md section 7, through the kernel (noise fill, b = 1)
// ---------------------------------------------------------------------------------------------
static void test_fixed_values() {
  const uint64_t seed = 0x0123456789ABCDEFull;
  const float gaussian[8] = {1.6624960f, 0.6303767f, 0.0772026f, 0.1082067f,
                             -0.1629310f, -0.1542159f, -0.2289213f, 1.6609565f};
  const float signs[8] = {-1, 1, 1, -1, -1, 1, -1, -1};
  float z[8];
  AxpbzTensor t{z, 8, 0, 0.0f, 1.0f, 7, DType::kFloat32};
  cpu::axpbz(&t, 1, seed, kGaussian, false, 1);
  for (int i = 0; i < 8; ++i) CHECK(std::fabs(z[i] - gaussian[i]) <= 1e-5f * (1 + std::fabs(gaussian[i])), "fixed gaussian %d: %.7f", i, z[i]);
  const uint64_t far[3] = {1ull << 32, (1ull << 32) + 1, (1ull << 40) + 3};
  const float far_z[3] = {-0.9015923f, 1.2910055f, -0.6229761f};
  for (int i = 0; i < 3; ++i) {
    float one;
    AxpbzTensor f{&one, 1, far[i], 0.0f, 1.0f, 7, DType::kFloat32};
    cpu::axpbz(&f, 1, seed, kGaussian, false, 1);
    CHECK(std::fabs(one - far_z[i]) <= 1e-5f * (1 + std::fabs(far_z[i])), "fixed gaussian far %d: %.7f", i, one);
  }
  cpu::axpbz(&t, 1, seed, kRademacher, false, 1);
  for (int i = 0; i < 8; ++i) CHECK(z[i] == signs[i], "fixed rademacher %d: %g", i, z[i]);
}

// ---------------------------------------------------------------------------------------------
// 5. SIMD Philox
// ---------------------------------------------------------------------------------------------
static void check_philox_variant(const char* name, cpu::PhiloxWordsFn fn) {
  constexpr int kStride = 80;
  const uint64_t firsts[] = {0, 5, (1ull << 32) - 37, (1ull << 40) + 3, ~0ull - 100};
  for (uint64_t first : firsts) {
    for (int ncalls : {1, 7, 16, 33, 64}) {
      uint32_t got[4 * kStride];
      fn(first, ncalls, 0xDEADBEEFu, 1, 0x0123456789ABCDEFull, got, kStride);
      for (int i = 0; i < ncalls; ++i) {
        const Words4 want = noise_words(0x0123456789ABCDEFull, 0xDEADBEEFu, 1, first + static_cast<uint64_t>(i));
        for (int k = 0; k < 4; ++k) {
          CHECK(got[k * kStride + i] == want.x[k], "philox %s first %llu call %d word %d", name,
                static_cast<unsigned long long>(first), i, k);
        }
      }
    }
  }
}

static void test_philox_simd() {
  check_philox_variant("portable", &cpu::philox_words_portable);
  int checked = 1;
#if defined(FASTMEZO_X86_PHILOX)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) { check_philox_variant("avx2", &cpu::philox_words_avx2); ++checked; }
  if (__builtin_cpu_supports("avx512f")) { check_philox_variant("avx512", &cpu::philox_words_avx512); ++checked; }
#endif
  std::printf("philox: %d implementation(s) checked against the scalar definition\n", checked);
}

// ---------------------------------------------------------------------------------------------
// 6. Stochastic rounding
// ---------------------------------------------------------------------------------------------
static double value_of(DType d, uint16_t h) { return d == DType::kFloat16 ? half_value(h) : bf16_value(h); }

// Independent of rounding.h: lo = the value of the type nearest to y toward zero (found from the
// round-to-nearest result, checked above, by comparing magnitudes in float64), hi = the next one away from
// zero; q exact in float64; q + r rounded to float32 as the oracle's float32 sum is.
static uint16_t sr_reference(DType d, float y, uint32_t r) {
  const uint16_t nearest = d == DType::kFloat16 ? float_to_fp16(y) : float_to_bf16(y);
  if (std::isnan(y) || std::isinf(y)) return nearest;
  uint16_t lo = nearest;
  if (std::fabs(value_of(d, nearest)) > std::fabs(static_cast<double>(y))) lo = static_cast<uint16_t>(nearest - 1);
  const uint16_t hi = static_cast<uint16_t>(lo + 1);
  const double lo_v = value_of(d, lo), hi_v = value_of(d, hi);
  if (std::isinf(hi_v)) return lo;  // saturate at the largest finite value
  const double q = std::fabs(static_cast<double>(y) - lo_v) / std::fabs(hi_v - lo_v) * 65536.0;
  const float sum = static_cast<float>(q + static_cast<double>(r));  // q and r exact in double: one rounding
  return sum >= 65536.0f ? hi : lo;
}

static void test_rounding_fixed() {
  const DType F16 = DType::kFloat16, BF16 = DType::kBFloat16;
  struct Case { DType d; float y; uint32_t r; uint16_t want; const char* what; };
  const float ulp_bf16_at_1 = std::ldexp(1.0f, -7), ulp_f16_at_1 = std::ldexp(1.0f, -10);
  const Case cases[] = {
      // y = 1 + ulp/4: q = 16384; up iff r >= 49152.
      {BF16, 1.0f + ulp_bf16_at_1 / 4, 49151, 0x3F80, "bf16 1 + ulp/4, r just below"},
      {BF16, 1.0f + ulp_bf16_at_1 / 4, 49152, 0x3F81, "bf16 1 + ulp/4, r at the threshold"},
      {F16, 1.0f + ulp_f16_at_1 / 4, 49151, 0x3C00, "fp16 1 + ulp/4, r just below"},
      {F16, 1.0f + ulp_f16_at_1 / 4, 49152, 0x3C01, "fp16 1 + ulp/4, r at the threshold"},
      // Halfway-ish: exactly halfway (q = 32768) goes up iff r >= 32768, whatever round-to-even says.
      {BF16, 1.0f + ulp_bf16_at_1 / 2, 32767, 0x3F80, "bf16 halfway, r = 2^15 - 1"},
      {BF16, 1.0f + ulp_bf16_at_1 / 2, 32768, 0x3F81, "bf16 halfway, r = 2^15"},
      {F16, 1.0f + 3 * ulp_f16_at_1 / 2, 32767, 0x3C01, "fp16 odd halfway, r = 2^15 - 1 (nearest-even would go up)"},
      // Negative: the same magnitudes, toward / away from zero.
      {BF16, -(1.0f + ulp_bf16_at_1 / 4), 49151, 0xBF80, "bf16 negative, toward zero"},
      {BF16, -(1.0f + ulp_bf16_at_1 / 4), 65535, 0xBF81, "bf16 negative, away from zero"},
      {F16, -(2.0f - ulp_f16_at_1 / 8), 0, 0xBFFF, "fp16 negative just above -2 (nearest is -2), r = 0"},
      {F16, -(2.0f - ulp_f16_at_1 / 8), 65535, 0xC000, "fp16 negative just above -2, r = max"},
      // Exact values never move, whatever r.
      {F16, 1.5f, 65535, 0x3E00, "fp16 exact"},
      {BF16, -3.0f, 65535, 0xC040, "bf16 exact negative"},
      {F16, 0.0f, 65535, 0x0000, "fp16 +0"},
      {F16, -0.0f, 65535, 0x8000, "fp16 -0 keeps its sign"},
      {BF16, 0.0f, 65535, 0x0000, "bf16 +0"},
      // float16 subnormals (ulp 2^-24): y = 2.25 * 2^-24 -> 2 or 3 ulp; y = 2^-26 (below the smallest subnormal).
      {F16, 2.25f * std::ldexp(1.0f, -24), 49151, 0x0002, "fp16 subnormal, down"},
      {F16, 2.25f * std::ldexp(1.0f, -24), 49152, 0x0003, "fp16 subnormal, up"},
      {F16, std::ldexp(1.0f, -26), 49151, 0x0000, "fp16 2^-26 -> 0"},
      {F16, std::ldexp(1.0f, -26), 49152, 0x0001, "fp16 2^-26 -> smallest subnormal"},
      {F16, -std::ldexp(1.0f, -26), 49152, 0x8001, "fp16 -2^-26 -> -smallest subnormal"},
      // Beyond the largest finite value: saturates (never inf), whatever r.
      {F16, 65504.0f + 8.0f, 65535, 0x7BFF, "fp16 just above max"},
      {F16, 1e6f, 65535, 0x7BFF, "fp16 far above max"},
      {F16, -1e6f, 65535, 0xFBFF, "fp16 far below -max"},
      {BF16, 3.4e38f, 65535, 0x7F7F, "bf16 above max"},
      // Non-finite: round to nearest (inf stays inf; NaN stays NaN: torch's pattern).
      {F16, INFINITY, 65535, 0x7C00, "fp16 inf"},
      {F16, -INFINITY, 0, 0xFC00, "fp16 -inf"},
      {BF16, INFINITY, 65535, 0x7F80, "bf16 inf"},
      {BF16, NAN, 65535, 0x7FC0, "bf16 NaN"},
      {F16, NAN, 0, 0x7E00, "fp16 NaN"},
  };
  for (const Case& c : cases) {
    const uint16_t got = round_stochastic(c.d, c.y, c.r);
    CHECK(got == c.want, "stochastic rounding, %s: got %04x want %04x", c.what, got, c.want);
    CHECK(sr_reference(c.d, c.y, c.r) == c.want || std::isnan(c.y), "float64 reference disagrees on %s", c.what);
  }
}

static void test_rounding_sampled() {
  // Float32 patterns across the whole range (every exponent, both signs, subnormals, inf, NaN) with a
  // spread of draws, against the float64 reference; and exact unbiasedness: for y whose q is an
  // integer (all y of at least the type's smallest normal magnitude), the mean over all 2^16 draws is y.
  uint64_t checked = 0, unbiased = 0;
  for (DType d : {DType::kFloat16, DType::kBFloat16}) {
    for (uint64_t b = 0; b < (1ull << 32); b += 7 * 4099 * 13) {
      const uint32_t bits = static_cast<uint32_t>(b);
      const float y = bits_as_float(bits);
      for (uint32_t r : {0u, 1u, 12345u, 32767u, 32768u, 65534u, 65535u, static_cast<uint32_t>(b % 65536)}) {
        const uint16_t got = round_stochastic(d, y, r);
        const uint16_t want = sr_reference(d, y, r);
        CHECK(got == want || (std::isnan(y) && std::isnan(value_of(d, got))), "dtype %d y %08x r %u: got %04x want %04x",
              static_cast<int>(d), bits, r, got, want);
        ++checked;
      }
      const double min_normal = d == DType::kFloat16 ? std::ldexp(1.0, -14) : std::ldexp(1.0, -126);
      const double max_finite = d == DType::kFloat16 ? 65504.0 : value_of(d, 0x7F7F);
      if (std::isfinite(y) && std::fabs(y) >= min_normal && std::fabs(y) <= max_finite && (b / (7 * 4099 * 13)) % 16 == 0) {
        double sum = 0;
        for (uint32_t r = 0; r < 65536; ++r) sum += value_of(d, round_stochastic(d, y, r));
        CHECK(sum / 65536.0 == static_cast<double>(y), "not unbiased: dtype %d y %.9g mean %.17g", static_cast<int>(d), y,
              sum / 65536.0);
        ++unbiased;
      }
    }
  }
  std::printf("stochastic rounding: %llu (y, r) pairs against a float64 reference, %llu values exactly unbiased over all 2^16 draws\n",
              static_cast<unsigned long long>(checked), static_cast<unsigned long long>(unbiased));
}

// The kernel with stochastic rounding, element by element against round_stochastic(y, rounding_bits_at).
static void test_kernel_sr_case(DType dtype, Noise noise, int mode, int64_t n, uint64_t offset, int threads) {
  // mode 0: in place; 1: out of place (src only read); 2: noise fill (load_x off).
  const uint64_t seed = 0x0F1E2D3C4B5A6978ull, rseed = 0x8877665544332211ull;
  const uint32_t key = 0xABCDEF01u;
  const float a = 0.998f, b = -0.0173f;
  Buffer src{dtype, std::vector<uint8_t>(static_cast<size_t>(n + kPad) * dtype_size(dtype))};
  for (int64_t i = 0; i < n; ++i) store(src, i, rand_normalish());
  for (int64_t i = n; i < n + kPad; ++i) store(src, i, -1088.0f);
  Buffer dst = src;
  if (mode == 1) for (int64_t i = 0; i < n + kPad; ++i) store(dst, i, NAN);  // poisoned output
  const Buffer before = src;
  AxpbzTensor t{dst.bytes.data(), n, offset, a, b, key, dtype};
  if (mode == 1) t.src = src.bytes.data();
  cpu::axpbz(&t, 1, seed, noise, mode != 2, threads, Rounding{true, rseed});
  // z of the kernel itself: the CPU kernel's Gaussian z is not libm's (noise_at), so take it from a noise
  // fill (b = 1, float32) of the same elements; Rademacher z is exact either way.
  std::vector<float> z(static_cast<size_t>(n));
  AxpbzTensor zt{z.data(), n, offset, 0.0f, 1.0f, key, DType::kFloat32};
  cpu::axpbz(&zt, 1, seed, noise, false, 1);
  int64_t moved_by_sr = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = load(before, i);
    const float y = mode == 2 ? b * z[i] : a * x + b * z[i];
    const uint32_t r = rounding_bits_at(rseed, key, offset + i);
    uint16_t got;
    std::memcpy(&got, &dst.bytes[2 * i], 2);
    const uint16_t want = round_stochastic(dtype, y, r);
    CHECK(got == want, "SR kernel dtype %d noise %d mode %d element %lld: got %04x want %04x", static_cast<int>(dtype),
          static_cast<int>(noise), mode, static_cast<long long>(i), got, want);
    const uint16_t nearest = dtype == DType::kFloat16 ? float_to_fp16(y) : float_to_bf16(y);
    moved_by_sr += got != nearest;
  }
  for (int64_t i = n; i < n + kPad; ++i) {
    const float v = load(dst, i);
    CHECK(mode == 1 ? std::isnan(v) : v == -1088.0f, "SR kernel wrote past the end (mode %d)", mode);
  }
  if (mode == 1) CHECK(src.bytes == before.bytes, "the source of an out-of-place pass changed");
  // Sanity: the draws are used (about a third to a half of results differ from round-to-nearest).
  CHECK(n < 1000 || moved_by_sr > n / 10, "stochastic rounding changed only %lld of %lld results",
        static_cast<long long>(moved_by_sr), static_cast<long long>(n));
}

static void test_kernel_sr() {
  for (DType d : {DType::kFloat16, DType::kBFloat16}) {
    for (Noise nz : {kGaussian, kRademacher}) {
      for (int mode = 0; mode < 3; ++mode) {
        test_kernel_sr_case(d, nz, mode, 5, 3, 1);
        test_kernel_sr_case(d, nz, mode, 4099, (1ull << 32) - 5, 2);
        test_kernel_sr_case(d, nz, mode, 70001, 7, 2);  // several work items (threads)
      }
    }
  }
  // float32 with rounding on: bit-identical to round-to-nearest (in place and out of place).
  for (Noise nz : {kGaussian, kRademacher}) {
    std::vector<float> x(10007), y1, y2(x.size(), NAN);
    for (float& v : x) v = rand_normalish();
    y1 = x;
    std::vector<float> ref = x;
    AxpbzTensor t1{y1.data(), static_cast<int64_t>(x.size()), 9, 0.99f, 0.1f, 4, DType::kFloat32};
    AxpbzTensor t2{y2.data(), static_cast<int64_t>(x.size()), 9, 0.99f, 0.1f, 4, DType::kFloat32};
    t2.src = x.data();
    AxpbzTensor tr{ref.data(), static_cast<int64_t>(x.size()), 9, 0.99f, 0.1f, 4, DType::kFloat32};
    cpu::axpbz(&t1, 1, 5, nz, true, 2, Rounding{true, 77});
    cpu::axpbz(&t2, 1, 5, nz, true, 2, Rounding{true, 77});
    cpu::axpbz(&tr, 1, 5, nz, true, 2);
    CHECK(std::memcmp(y1.data(), ref.data(), 4 * x.size()) == 0, "float32 changed by stochastic rounding (in place)");
    CHECK(std::memcmp(y2.data(), ref.data(), 4 * x.size()) == 0, "float32 out of place differs from in place");
  }
  // Thread-count independence with rounding on.
  for (DType d : {DType::kFloat16, DType::kBFloat16}) {
    std::vector<std::vector<uint8_t>> outs;
    for (int threads : {1, 2, 3}) {
      Buffer b{d, std::vector<uint8_t>(300001 * 2)};
      for (int64_t i = 0; i < 300001; ++i) store(b, i, 0.001f * static_cast<float>(i % 1000));
      AxpbzTensor t{b.bytes.data(), 300001, 11, 0.999f, 0.01f, 3, d};
      cpu::axpbz(&t, 1, 42, kGaussian, true, threads, Rounding{true, 0xFFFFFFFFFFFFFFFFull});
      outs.push_back(b.bytes);
    }
    CHECK(outs[0] == outs[1] && outs[1] == outs[2], "thread count changes stochastically rounded results (dtype %d)",
          static_cast<int>(d));
  }
  std::printf("kernel with stochastic rounding: float16/bfloat16 x Gaussian/Rademacher x in place/out of place/fill checked\n");
}

int main() {
  test_philox_simd();
  test_fast_math();
  test_conversions();
  test_kernel();
  test_fixed_values();
  test_rounding_fixed();
  test_rounding_sampled();
  test_kernel_sr();
  if (failures == 0) std::printf("cpu kernels: all checks passed\n");
  else std::printf("cpu kernels: %d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
