// CPU kernels of the fused pass (csrc/fastmezo/axpbz.h): OpenMP across cores, SIMD within a core.
// Torch-free: built into fastmezo._C by setup.py and into the standalone library by CMakeLists.txt.
//
// Work layout. Each tensor's global index range [offset, offset + numel) is cut into chunks aligned to
// multiples of kChunk in the *global* index (so a chunk never splits a Philox call, and the cut does not
// depend on how a tensor is sharded); the chunks of all tensors of a call form one list that OpenMP
// threads take from. A chunk is processed in blocks of kBlock elements (also aligned): first the z of
// every Philox call the block touches is generated into a small buffer (stays in L1), by a loop over
// calls that the compiler vectorizes across calls (4 normals or 128 signs per call); then one
// contiguous loop over the elements computes a * x + b * z in float32 and rounds to the dtype. With
// stochastic rounding, the block's 16-bit draws (8 per Philox call of stream 2) are generated the same way
// into a second buffer before the element loop. Out-of-place passes read x from AxpbzTensor::src.
// Nothing depends on the number of threads: each element's z is a pure function of its global index.
//
// Build flags that matter (setup.py and CMakeLists.txt pass the same): -O3 (vectorization),
// -fopenmp, -fno-math-errno (sqrtf becomes one instruction and vectorizes), -ffp-contract=off (no FMA
// contraction: a * x + b * z is two rounded products and a rounded sum, as in the torch oracle, so
// Rademacher results are bit-identical to it, and every ISA clone below gives the same bits).
#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "fastmezo/axpbz.h"
#include "fastmezo/dtypes.h"
#include "fastmezo/fastmath.h"
#include "fastmezo/philox.h"
#include "fastmezo/rounding.h"
#include "cpu/philox_simd.h"

// x86-64: one compiled copy per ISA level, chosen once at load time (ifunc), so one binary uses
// AVX-512 or AVX2 where the CPU has them and still runs on any x86-64. The copies give identical results
// (integer Philox, IEEE float32 arithmetic without contraction).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(FASTMEZO_NO_TARGET_CLONES)
#define FASTMEZO_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTMEZO_CLONES
#endif
// The helpers must be inlined into each ISA copy of process_block to be compiled for that ISA.
#if defined(__GNUC__) || defined(__clang__)
#define FASTMEZO_INLINE inline __attribute__((always_inline))
#else
#define FASTMEZO_INLINE inline
#endif

namespace fastmezo {
namespace cpu {
namespace {

constexpr int64_t kBlock = 2048;           // elements per z buffer: 8 KB of float32
constexpr int64_t kChunk = 16 * kBlock;    // elements per unit of work of a thread
constexpr int64_t kParallelMin = 1 << 15;  // below this many elements in a call, one thread
static_assert(kBlock % kRademacherPerCall == 0 && kBlock % kRoundingPerCall == 0,
              "blocks must hold whole Philox calls");

// Philox words of up to kBlock / 4 calls (+ 16: the SIMD versions fill whole vectors), four arrays.
constexpr int kWordStride = static_cast<int>(kBlock / kGaussianPerCall) + 16;
struct WordBuffer {
  alignas(64) uint32_t w[4 * kWordStride];
};

// z[4 i + l] = normal l of Philox call first_call + i (Gaussian stream), i < ncalls.
FASTMEZO_INLINE void gaussian_calls(uint64_t seed, uint32_t key, uint64_t first_call, int ncalls, float* __restrict z,
                                    WordBuffer& words) {
  philox_words()(first_call, ncalls, key, kGaussian, seed, words.w, kWordStride);
  const uint32_t* __restrict x0 = words.w;
  const uint32_t* __restrict x1 = words.w + kWordStride;
  const uint32_t* __restrict x2 = words.w + 2 * kWordStride;
  const uint32_t* __restrict x3 = words.w + 3 * kWordStride;
  // Stores through a bumped pointer, not z[4 * i + l]: under -fwrapv (in Python's default CFLAGS) the
  // compiler cannot prove 4 * i does not wrap, and the loop stopped vectorizing (5x slower).
  float* __restrict out = z;
  for (int i = 0; i < ncalls; ++i) {
    float n0, n1, n2, n3;
    box_muller_portable(x0[i], x1[i], &n0, &n1);
    box_muller_portable(x2[i], x3[i], &n2, &n3);
    out[0] = n0;
    out[1] = n1;
    out[2] = n2;
    out[3] = n3;
    out += 4;
  }
}

// z[128 i + l] = sign l of Philox call first_call + i (Rademacher stream): bit l % 32 of word l / 32,
// z = 1 - 2 * bit.
FASTMEZO_INLINE void rademacher_calls(uint64_t seed, uint32_t key, uint64_t first_call, int ncalls,
                                      float* __restrict z, WordBuffer& words) {
  philox_words()(first_call, ncalls, key, kRademacher, seed, words.w, kWordStride);
  float* __restrict zk = z;
  for (int i = 0; i < ncalls; ++i) {
    for (int k = 0; k < 4; ++k) {
      const uint32_t word = words.w[k * kWordStride + i];
      for (int bit = 0; bit < 32; ++bit) zk[bit] = 1.0f - 2.0f * static_cast<float>((word >> bit) & 1u);
      zk += 32;
    }
  }
}

// Rounding draws of Philox calls first_call .. first_call + ncalls - 1 of the rounding stream (8 per call),
// in element order: r[8 i + 2 k + h] = half h (0: low, 1: high) of word k of call first_call + i.
FASTMEZO_INLINE void rounding_calls(uint64_t round_seed, uint32_t key, uint64_t first_call, int ncalls,
                                    uint16_t* __restrict r, WordBuffer& words) {
  philox_words()(first_call, ncalls, key, kStreamRounding, round_seed, words.w, kWordStride);
  const uint32_t* __restrict x0 = words.w;
  const uint32_t* __restrict x1 = words.w + kWordStride;
  const uint32_t* __restrict x2 = words.w + 2 * kWordStride;
  const uint32_t* __restrict x3 = words.w + 3 * kWordStride;
  uint16_t* __restrict out = r;  // bumped pointer: see gaussian_calls
  for (int i = 0; i < ncalls; ++i) {
    out[0] = static_cast<uint16_t>(x0[i]);
    out[1] = static_cast<uint16_t>(x0[i] >> 16);
    out[2] = static_cast<uint16_t>(x1[i]);
    out[3] = static_cast<uint16_t>(x1[i] >> 16);
    out[4] = static_cast<uint16_t>(x2[i]);
    out[5] = static_cast<uint16_t>(x2[i] >> 16);
    out[6] = static_cast<uint16_t>(x3[i]);
    out[7] = static_cast<uint16_t>(x3[i] >> 16);
    out += 8;
  }
}

// The element loops: dst[j] <- a * x[j] + b * z[j] (LOAD_X) or b * z[j], float32 arithmetic (two rounded
// products and a rounded sum), one rounding to the dtype. x is dst itself (INPLACE) or src (out of place,
// src and dst do not overlap: the bindings check it). Template flags rather than run-time branches, so
// each combination is one branch-free loop that vectorizes; INPLACE reads through dst, never through a
// second pointer to the same memory (that would break the __restrict promise).
template <bool LOAD_X, bool INPLACE>
FASTMEZO_INLINE void apply_f32(float* __restrict dst, const float* __restrict src, const float* __restrict z,
                               int64_t m, float a, float b) {
  const float* x = INPLACE ? dst : src;
  for (int64_t j = 0; j < m; ++j) dst[j] = LOAD_X ? a * x[j] + b * z[j] : b * z[j];
}

// float16 / bfloat16: to nearest even, or stochastically with the draws r (SR; rounding.h).
template <DType D, bool LOAD_X, bool INPLACE, bool SR>
FASTMEZO_INLINE void apply_16(uint16_t* __restrict dst, const uint16_t* __restrict src, const float* __restrict z,
                              const uint16_t* __restrict r, int64_t m, float a, float b) {
  using T = Float16Like<D>;
  const uint16_t* x = INPLACE ? dst : src;
  for (int64_t j = 0; j < m; ++j) {
    const float y = LOAD_X ? a * T::to_float(x[j]) + b * z[j] : b * z[j];
    dst[j] = SR ? round_stochastic<D>(y, r[j]) : T::from_float(y);
  }
}

template <DType D, bool SR>
FASTMEZO_INLINE void apply_16_dispatch(uint16_t* dst, const uint16_t* src, const float* z, const uint16_t* r,
                                       int64_t m, float a, float b, bool load_x) {
  if (!load_x) {
    apply_16<D, false, true, SR>(dst, nullptr, z, r, m, a, b);
  } else if (src == nullptr) {
    apply_16<D, true, true, SR>(dst, nullptr, z, r, m, a, b);
  } else {
    apply_16<D, true, false, SR>(dst, src, z, r, m, a, b);
  }
}

template <DType D>
FASTMEZO_INLINE void apply_16_any(uint16_t* dst, const uint16_t* src, const float* z, const uint16_t* r, int64_t m,
                                  float a, float b, bool load_x, bool sr) {
  if (sr) {
    apply_16_dispatch<D, true>(dst, src, z, r, m, a, b, load_x);
  } else {
    apply_16_dispatch<D, false>(dst, src, z, r, m, a, b, load_x);
  }
}

// Global elements [lo, hi) of tensor t, all within one aligned block of kBlock elements. zbuf holds
// kBlock floats, rbuf kBlock draws (used with stochastic rounding only).
FASTMEZO_CLONES
void process_block(const AxpbzTensor& t, uint64_t lo, uint64_t hi, uint64_t seed, Noise noise, bool load_x,
                   const Rounding& rounding, float* __restrict zbuf, uint16_t* __restrict rbuf, WordBuffer& words) {
  const uint64_t per_call = elements_per_call(noise);
  const uint64_t first_call = lo / per_call;
  const int ncalls = static_cast<int>((hi + per_call - 1) / per_call - first_call);
  if (noise == kGaussian) {
    gaussian_calls(seed, t.key, first_call, ncalls, zbuf, words);
  } else {
    rademacher_calls(seed, t.key, first_call, ncalls, zbuf, words);
  }
  const float* z = zbuf + (lo - first_call * per_call);
  const bool sr = rounding.stochastic && t.dtype != DType::kFloat32;  // float32: stored exactly as without
  const uint16_t* r = nullptr;
  if (sr) {
    const uint64_t first_rcall = lo / kRoundingPerCall;
    const int nrcalls = static_cast<int>((hi + kRoundingPerCall - 1) / kRoundingPerCall - first_rcall);
    rounding_calls(rounding.seed, t.key, first_rcall, nrcalls, rbuf, words);
    r = rbuf + (lo - first_rcall * kRoundingPerCall);
  }
  const int64_t start = static_cast<int64_t>(lo - t.offset);  // index into the tensor
  const int64_t m = static_cast<int64_t>(hi - lo);
  switch (t.dtype) {
    case DType::kFloat32: {
      float* dst = static_cast<float*>(t.data) + start;
      if (!load_x) {
        apply_f32<false, true>(dst, nullptr, z, m, t.a, t.b);
      } else if (t.src == nullptr) {
        apply_f32<true, true>(dst, nullptr, z, m, t.a, t.b);
      } else {
        apply_f32<true, false>(dst, static_cast<const float*>(t.src) + start, z, m, t.a, t.b);
      }
      break;
    }
    case DType::kFloat16:
    case DType::kBFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(t.data) + start;
      const uint16_t* src = t.src == nullptr ? nullptr : static_cast<const uint16_t*>(t.src) + start;
      if (t.dtype == DType::kFloat16) {
        apply_16_any<DType::kFloat16>(dst, src, z, r, m, t.a, t.b, load_x, sr);
      } else {
        apply_16_any<DType::kBFloat16>(dst, src, z, r, m, t.a, t.b, load_x, sr);
      }
      break;
    }
  }
}

struct WorkItem {
  int64_t tensor;
  uint64_t begin, end;  // global element indices
};

void process_item(const AxpbzTensor& t, const WorkItem& item, uint64_t seed, Noise noise, bool load_x,
                  const Rounding& rounding) {
  alignas(64) float zbuf[kBlock];
  alignas(64) uint16_t rbuf[kBlock];
  WordBuffer words;
  for (uint64_t b0 = item.begin - item.begin % kBlock; b0 < item.end; b0 += kBlock) {
    const uint64_t lo = std::max<uint64_t>(b0, item.begin);
    const uint64_t hi = std::min<uint64_t>(b0 + kBlock, item.end);
    process_block(t, lo, hi, seed, noise, load_x, rounding, zbuf, rbuf, words);
  }
}

}  // namespace

void axpbz(const AxpbzTensor* tensors, int64_t count, uint64_t seed, Noise noise, bool load_x,
           int num_threads, Rounding rounding) {
  std::vector<WorkItem> items;
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) {
    const AxpbzTensor& t = tensors[i];
    if (t.numel <= 0) continue;
    total += t.numel;
    const uint64_t end = t.offset + static_cast<uint64_t>(t.numel);
    for (uint64_t c = t.offset; c < end;) {
      const uint64_t next = std::min<uint64_t>(end, (c / kChunk + 1) * kChunk);
      items.push_back(WorkItem{i, c, next});
      c = next;
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
#if defined(_OPENMP)
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const bool parallel = total >= kParallelMin && threads > 1 && n_items > 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (parallel)
#else
  (void)num_threads;
#endif
  for (int64_t k = 0; k < n_items; ++k) {
    process_item(tensors[items[k].tensor], items[k], seed, noise, load_x, rounding);
  }
}

bool has_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fastmezo
