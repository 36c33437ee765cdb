// CPU kernels of the fused pass (csrc/fastmezo/axpbz.h): OpenMP across cores, SIMD within a core.
// Torch-free: built into fastmezo._C by setup.py and into the standalone library by CMakeLists.txt.
//
// Work layout. Each tensor's global index range [offset, offset + numel) is cut into chunks aligned to
// multiples of kChunk in the *global* index (so a chunk never splits a Philox call, and the cut does not
// depend on how a tensor is sharded); the chunks of all tensors of a call form one list that OpenMP
// threads take from. A chunk is processed in blocks of kBlock elements (also aligned): first the z of
// every Philox call the block touches is generated into a small buffer (stays in L1), by a loop over
// calls that the compiler vectorizes across calls (4 normals or 128 signs per call); then one
// contiguous loop over the elements computes a * x + b * z in float32 and rounds to the dtype.
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
static_assert(kBlock % kRademacherPerCall == 0, "blocks must hold whole Philox calls");

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

// x[j] <- a * x[j] + b * z[j] (or b * z[j]) for j < m, float32 arithmetic, one rounding to the dtype.
FASTMEZO_INLINE void apply_f32(float* __restrict x, const float* __restrict z, int64_t m, float a, float b, bool load_x) {
  if (load_x) {
    for (int64_t j = 0; j < m; ++j) x[j] = a * x[j] + b * z[j];
  } else {
    for (int64_t j = 0; j < m; ++j) x[j] = b * z[j];
  }
}

FASTMEZO_INLINE void apply_f16(uint16_t* __restrict x, const float* __restrict z, int64_t m, float a, float b, bool load_x) {
  if (load_x) {
    for (int64_t j = 0; j < m; ++j) x[j] = float_to_fp16(a * fp16_to_float(x[j]) + b * z[j]);
  } else {
    for (int64_t j = 0; j < m; ++j) x[j] = float_to_fp16(b * z[j]);
  }
}

FASTMEZO_INLINE void apply_bf16(uint16_t* __restrict x, const float* __restrict z, int64_t m, float a, float b, bool load_x) {
  if (load_x) {
    for (int64_t j = 0; j < m; ++j) x[j] = float_to_bf16(a * bf16_to_float(x[j]) + b * z[j]);
  } else {
    for (int64_t j = 0; j < m; ++j) x[j] = float_to_bf16(b * z[j]);
  }
}

// Global elements [lo, hi) of tensor t, all within one aligned block of kBlock elements. zbuf holds
// kBlock floats.
FASTMEZO_CLONES
void process_block(const AxpbzTensor& t, uint64_t lo, uint64_t hi, uint64_t seed, Noise noise, bool load_x,
                   float* __restrict zbuf, WordBuffer& words) {
  const uint64_t per_call = elements_per_call(noise);
  const uint64_t first_call = lo / per_call;
  const int ncalls = static_cast<int>((hi + per_call - 1) / per_call - first_call);
  if (noise == kGaussian) {
    gaussian_calls(seed, t.key, first_call, ncalls, zbuf, words);
  } else {
    rademacher_calls(seed, t.key, first_call, ncalls, zbuf, words);
  }
  const float* z = zbuf + (lo - first_call * per_call);
  const int64_t start = static_cast<int64_t>(lo - t.offset);  // index into the tensor
  const int64_t m = static_cast<int64_t>(hi - lo);
  switch (t.dtype) {
    case DType::kFloat32:
      apply_f32(static_cast<float*>(t.data) + start, z, m, t.a, t.b, load_x);
      break;
    case DType::kFloat16:
      apply_f16(static_cast<uint16_t*>(t.data) + start, z, m, t.a, t.b, load_x);
      break;
    case DType::kBFloat16:
      apply_bf16(static_cast<uint16_t*>(t.data) + start, z, m, t.a, t.b, load_x);
      break;
  }
}

struct WorkItem {
  int64_t tensor;
  uint64_t begin, end;  // global element indices
};

void process_item(const AxpbzTensor& t, const WorkItem& item, uint64_t seed, Noise noise, bool load_x) {
  alignas(64) float zbuf[kBlock];
  WordBuffer words;
  for (uint64_t b0 = item.begin - item.begin % kBlock; b0 < item.end; b0 += kBlock) {
    const uint64_t lo = std::max<uint64_t>(b0, item.begin);
    const uint64_t hi = std::min<uint64_t>(b0 + kBlock, item.end);
    process_block(t, lo, hi, seed, noise, load_x, zbuf, words);
  }
}

}  // namespace

void axpbz(const AxpbzTensor* tensors, int64_t count, uint64_t seed, Noise noise, bool load_x,
           int num_threads) {
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
    process_item(tensors[items[k].tensor], items[k], seed, noise, load_x);
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
