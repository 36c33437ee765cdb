// CUDA kernels of the fused pass (csrc/fastmezo/axpbz.h), torch-free: the torch-facing launcher that
// picks the device and stream is csrc/bindings/ops_cuda.cpp.
//
// Design (docs/noise.md is the contract; DESIGN.md section 2 the measurements behind it):
//  * Multi-tensor launches: up to kMaxTensors tensors of one dtype per launch, described in the kernel's
//    parameter block (as PyTorch's foreach kernels do), so a model with hundreds of small tensors is not
//    launch-bound. Work is cut into tiles aligned to the *global* Philox call index; a grid-stride loop
//    over the tiles of all tensors of the launch finds each tile's tensor by binary search.
//  * Gaussian: one thread per Philox call (4 normals, two Box-Muller pairs), kCallsPerThread calls per
//    thread per tile at a stride of the block size, so a warp covers 128 contiguous elements per step:
//    coalesced 16-byte (float32) / 8-byte (16-bit) vector loads and stores when the tensor's address
//    and offset are aligned; element-wise, bounds-checked accesses at unaligned heads and tails.
//  * Rademacher: one Philox call per 128 elements; each lane of a warp computes one call, then the warp
//    walks its 32 calls, broadcasting each call's words with shuffles, each lane taking 4 contiguous
//    elements (again 128 contiguous elements per warp step).
//  * 64-bit indices throughout (elements beyond 2^32, offsets up to 2^62).
//  * Numerics: the log stays accurate (logf, no --use_fast_math: an approximate log has an absolute
//    error that becomes a large relative error of r = sqrt(-2 ln u) for u near 1); sin/cos use the
//    hardware approximation __sincosf, whose absolute error on (-pi, pi) is about 2^-21.4, i.e.
//    |dz| < 5.8 * 3.6e-7 = 2.1e-6, inside the contract's 1e-5 * (1 + |z|). a * x + b * z is computed with
//    explicitly rounded products and sum (__fmul_rn / __fadd_rn: no FMA contraction), like the torch
//    oracle and the CPU kernels, so Rademacher results are bit-identical to both. Conversions to
//    float16 / bfloat16 round to nearest even (__float2half_rn / __float2bfloat16_rn).
//  * Stochastic rounding (docs/noise.md section 8): the same rounding code as the CPU kernels and the
//    C++ tests (csrc/fastmezo/rounding.h, explicitly rounded float32 steps), so the stored bits equal the
//    oracle's for the same float32 y. The 16-bit draws: a Gaussian thread's 4 elements are half of one
//    Philox call of stream 2 (8 draws per call), a Rademacher lane's 4 elements likewise; each thread
//    computes that call itself (two neighbouring threads compute the same call: simple, and cheaper than
//    the normals; a shuffle-shared version would halve it, see SR_NOTE below).
//  * Out-of-place passes (exact mode): x is read from TensorDesc::src, the result written to data (the
//    bindings check they do not overlap); in place, src == data.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fastmezo/axpbz.h"
#include "fastmezo/philox.h"
#include "fastmezo/rounding.h"

namespace fastmezo {
namespace cuda {
namespace {

constexpr int kThreads = 256;                                  // threads per block (8 warps)
constexpr int kCallsPerThread = 4;                             // Gaussian calls per thread per tile
constexpr int64_t kGaussianTileCalls = kThreads * kCallsPerThread;  // 1024 calls = 4096 elements
constexpr int64_t kRademacherTileCalls = kThreads;             // 256 calls = 32768 elements (32 per warp)
constexpr int kMaxTensors = 32;                                // tensors per launch (parameter block ~2 KB)
// Blocks per launch (the classic grid limit): ~60 waves of resident blocks on an H100/H200, and beyond
// 268M (Gaussian) / 2.1G (Rademacher) elements per launch the grid-stride loop takes over (tested).
constexpr int64_t kMaxGrid = 65535;
constexpr unsigned kFullMask = 0xffffffffu;

struct TensorDesc {
  void* data;          // where the result is written
  const void* src;     // where x is read (== data in place)
  int64_t numel;
  int64_t offset;      // global index of element 0
  int64_t first_call;  // offset / per_call
  int64_t last_call;   // ceil((offset + numel) / per_call)
  float a;
  float b;
  uint32_t key;
  int32_t vec;  // 1: 4-element groups of the tensor start at 4-element-aligned addresses (data and src)
};

struct LaunchTable {
  TensorDesc tensor[kMaxTensors];
  int64_t tile_start[kMaxTensors + 1];  // tiles of tensors < i; tile_start[count] = total
  int32_t count;
};

// ---- storage types ------------------------------------------------------------------------------

template <DType D>
struct Storage;

template <>
struct Storage<DType::kFloat32> {
  using T = float;
  static __device__ __forceinline__ float load(const T* p) { return *p; }
  static __device__ __forceinline__ void store(T* p, float v) { *p = v; }
  static __device__ __forceinline__ void load4(const T* p, float (&v)[4]) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  }
  // __stwb (st.global.wb, the default caching) is inline PTX, so the 16-byte store cannot be split:
  // a plain float4 assignment was merged with the scalar edge path into four 4-byte stores.
  static __device__ __forceinline__ void store4(T* p, const float (&v)[4]) {
    __stwb(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  }
  // float32 is never rounded stochastically (stored exactly as without it).
  static __device__ __forceinline__ void store_sr(T* p, float v, uint32_t) { *p = v; }
  static __device__ __forceinline__ void store4_sr(T* p, const float (&v)[4], const uint32_t (&)[4]) { store4(p, v); }
};

// 16-bit storage: held as unsigned short bits, converted with the CUDA intrinsics (the build defines
// __CUDA_NO_HALF_CONVERSIONS__ like torch does, so no implicit conversions are used).
template <class Traits, DType D>
struct Storage16 {
  using T = unsigned short;
  static __device__ __forceinline__ float load(const T* p) { return Traits::to_float(*p); }
  static __device__ __forceinline__ void store(T* p, float v) { *p = Traits::from_float(v); }
  static __device__ __forceinline__ void load4(const T* p, float (&v)[4]) {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    v[0] = Traits::to_float(static_cast<T>(q.x & 0xFFFFu));
    v[1] = Traits::to_float(static_cast<T>(q.x >> 16));
    v[2] = Traits::to_float(static_cast<T>(q.y & 0xFFFFu));
    v[3] = Traits::to_float(static_cast<T>(q.y >> 16));
  }
  static __device__ __forceinline__ void store4(T* p, const float (&v)[4]) {
    uint2 q;
    q.x = static_cast<unsigned>(Traits::from_float(v[0])) | (static_cast<unsigned>(Traits::from_float(v[1])) << 16);
    q.y = static_cast<unsigned>(Traits::from_float(v[2])) | (static_cast<unsigned>(Traits::from_float(v[3])) << 16);
    __stwb(reinterpret_cast<uint2*>(p), q);
  }
  // Stochastic rounding with the 16-bit draw r (csrc/fastmezo/rounding.h, shared with the CPU kernels).
  static __device__ __forceinline__ void store_sr(T* p, float v, uint32_t r) { *p = round_stochastic<D>(v, r); }
  static __device__ __forceinline__ void store4_sr(T* p, const float (&v)[4], const uint32_t (&r)[4]) {
    uint2 q;
    q.x = static_cast<unsigned>(round_stochastic<D>(v[0], r[0])) |
          (static_cast<unsigned>(round_stochastic<D>(v[1], r[1])) << 16);
    q.y = static_cast<unsigned>(round_stochastic<D>(v[2], r[2])) |
          (static_cast<unsigned>(round_stochastic<D>(v[3], r[3])) << 16);
    __stwb(reinterpret_cast<uint2*>(p), q);
  }
};

struct HalfTraits {
  static __device__ __forceinline__ float to_float(unsigned short h) { return __half2float(__ushort_as_half(h)); }
  static __device__ __forceinline__ unsigned short from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

struct BFloat16Traits {
  static __device__ __forceinline__ float to_float(unsigned short h) {
    return __uint_as_float(static_cast<unsigned>(h) << 16);  // exact: bfloat16 is the top half of a float
  }
  static __device__ __forceinline__ unsigned short from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

template <>
struct Storage<DType::kFloat16> : Storage16<HalfTraits, DType::kFloat16> {};
template <>
struct Storage<DType::kBFloat16> : Storage16<BFloat16Traits, DType::kBFloat16> {};

// ---- the arithmetic -------------------------------------------------------------------------------

template <bool LOAD_X>
__device__ __forceinline__ float axpbz(float a, float x, float b, float z) {
  if (LOAD_X) return __fadd_rn(__fmul_rn(a, x), __fmul_rn(b, z));  // no FMA: as the oracle rounds
  return __fmul_rn(b, z);
}

// Box-Muller of the contract with fast sin/cos and accurate log and sqrt (see the file comment).
__device__ __forceinline__ void box_muller_fast(uint32_t xa, uint32_t xb, float& n0, float& n1) {
  const float ua = uniform_from_bits(xa);
  const float ub = uniform_from_bits(xb);
  const float r = sqrtf(-2.0f * logf(ua));
  const float t = 3.14159265358979323846f * (2.0f * ub - 1.0f);
  float s, c;
  __sincosf(t, &s, &c);
  n0 = r * c;
  n1 = r * s;
}

// The tensor a tile belongs to: largest i with tile_start[i] <= tile (uniform across the block).
__device__ __forceinline__ int find_tensor(const LaunchTable& table, int64_t tile) {
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table.tile_start[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Elements idx .. idx + 3 of the tensor (idx may be negative or run past the end at its edges).
template <DType D, bool LOAD_X>
__device__ __forceinline__ void load_group(const TensorDesc& d, int64_t idx, float (&x)[4]) {
  using S = Storage<D>;
  const auto* p = static_cast<const typename S::T*>(d.src);
  if (!LOAD_X) return;
  if (d.vec && idx >= 0 && idx + 4 <= d.numel) {
    S::load4(p + idx, x);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) x[l] = (idx + l >= 0 && idx + l < d.numel) ? S::load(p + idx + l) : 0.0f;
  }
}

// SR: rounded stochastically with the draws r (16-bit types; float32 ignores them).
template <DType D, bool SR>
__device__ __forceinline__ void store_group(const TensorDesc& d, int64_t idx, const float (&y)[4],
                                            const uint32_t (&r)[4]) {
  using S = Storage<D>;
  auto* p = static_cast<typename S::T*>(d.data);
  if (d.vec && idx >= 0 && idx + 4 <= d.numel) {
    if (SR) S::store4_sr(p + idx, y, r); else S::store4(p + idx, y);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (idx + l >= 0 && idx + l < d.numel) {
        if (SR) S::store_sr(p + idx + l, y[l], r[l]); else S::store(p + idx + l, y[l]);
      }
    }
  }
}

// The 4 draws of global elements 4 g .. 4 g + 3 (g = a group of 4 aligned elements): half g & 1 of
// rounding call g / 2 (8 draws per call: word k gives elements 2k (low half) and 2k + 1 (high half)).
// SR_NOTE: threads of consecutive g compute the same call; sharing it by a shuffle would halve the
// Philox work of the rounding stream if it ever shows up in a profile.
__device__ __forceinline__ void rounding_draws4(uint64_t round_seed, uint32_t key, uint64_t g, uint32_t (&r)[4]) {
  const Words4 w = noise_words(round_seed, key, kStreamRounding, g >> 1);
  const bool high = (g & 1u) != 0;
  const uint32_t w0 = high ? w.x[2] : w.x[0];
  const uint32_t w1 = high ? w.x[3] : w.x[1];
  r[0] = w0 & 0xFFFFu;
  r[1] = w0 >> 16;
  r[2] = w1 & 0xFFFFu;
  r[3] = w1 >> 16;
}

// ---- kernels --------------------------------------------------------------------------------------

template <DType D, bool LOAD_X, bool SR>
__global__ void __launch_bounds__(kThreads) gaussian_kernel(const __grid_constant__ LaunchTable table,
                                                            uint64_t seed, uint64_t round_seed) {
  const int64_t total = table.tile_start[table.count];
  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int ti = find_tensor(table, tile);
    const TensorDesc& d = table.tensor[ti];
    const int64_t base = d.first_call + (tile - table.tile_start[ti]) * kGaussianTileCalls + threadIdx.x;
    float x[kCallsPerThread][4] = {};
#pragma unroll
    for (int u = 0; u < kCallsPerThread; ++u) {  // issue all loads first: more bytes in flight
      const int64_t q = base + u * kThreads;
      if (q < d.last_call) load_group<D, LOAD_X>(d, q * 4 - d.offset, x[u]);
    }
#pragma unroll
    for (int u = 0; u < kCallsPerThread; ++u) {
      const int64_t q = base + u * kThreads;
      if (q < d.last_call) {
        const Words4 w = noise_words(seed, d.key, kGaussian, static_cast<uint64_t>(q));
        float z[4];
        box_muller_fast(w.x[0], w.x[1], z[0], z[1]);
        box_muller_fast(w.x[2], w.x[3], z[2], z[3]);
        float y[4];
#pragma unroll
        for (int l = 0; l < 4; ++l) y[l] = axpbz<LOAD_X>(d.a, x[u][l], d.b, z[l]);
        uint32_t r[4] = {0u, 0u, 0u, 0u};
        if (SR) rounding_draws4(round_seed, d.key, static_cast<uint64_t>(q), r);  // elements 4q .. 4q + 3
        store_group<D, SR>(d, q * 4 - d.offset, y, r);
      }
    }
  }
}

template <DType D, bool LOAD_X, bool SR>
__global__ void __launch_bounds__(kThreads) rademacher_kernel(const __grid_constant__ LaunchTable table,
                                                              uint64_t seed, uint64_t round_seed) {
  const int64_t total = table.tile_start[table.count];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int ti = find_tensor(table, tile);
    const TensorDesc& d = table.tensor[ti];
    const int64_t warp_first = d.first_call + (tile - table.tile_start[ti]) * kRademacherTileCalls + warp * 32;
    Words4 w = {{0u, 0u, 0u, 0u}};
    if (warp_first + lane < d.last_call) w = noise_words(seed, d.key, kRademacher, static_cast<uint64_t>(warp_first + lane));
    const int word = lane >> 3;          // lane takes elements 4 lane .. 4 lane + 3 of a call:
    const int shift = (lane & 7) * 4;    // bits shift .. shift + 3 of word lane / 8
#pragma unroll 4
    for (int k = 0; k < 32; ++k) {
      const int64_t q = warp_first + k;
      if (q >= d.last_call) break;       // uniform across the warp: the shuffles below see all lanes
      const uint32_t w0 = __shfl_sync(kFullMask, w.x[0], k);
      const uint32_t w1 = __shfl_sync(kFullMask, w.x[1], k);
      const uint32_t w2 = __shfl_sync(kFullMask, w.x[2], k);
      const uint32_t w3 = __shfl_sync(kFullMask, w.x[3], k);
      const uint32_t bits = (word == 0 ? w0 : word == 1 ? w1 : word == 2 ? w2 : w3) >> shift;
      const int64_t idx = q * 128 + lane * 4 - d.offset;
      float x[4] = {};
      load_group<D, LOAD_X>(d, idx, x);
      float y[4];
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const float z = ((bits >> l) & 1u) ? -1.0f : 1.0f;
        y[l] = axpbz<LOAD_X>(d.a, x[l], d.b, z);
      }
      uint32_t r[4] = {0u, 0u, 0u, 0u};
      // global elements q * 128 + 4 lane .. + 3: group of 4 number q * 32 + lane
      if (SR) rounding_draws4(round_seed, d.key, static_cast<uint64_t>(q) * 32u + static_cast<uint64_t>(lane), r);
      store_group<D, SR>(d, idx, y, r);
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------

template <DType D, bool LOAD_X, bool SR>
cudaError_t launch(const LaunchTable& table, uint64_t seed, Noise noise, uint64_t round_seed, cudaStream_t stream) {
  const int64_t total = table.tile_start[table.count];
  if (total == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min(total, kMaxGrid));
  if (noise == kGaussian) {
    gaussian_kernel<D, LOAD_X, SR><<<grid, kThreads, 0, stream>>>(table, seed, round_seed);
  } else {
    rademacher_kernel<D, LOAD_X, SR><<<grid, kThreads, 0, stream>>>(table, seed, round_seed);
  }
  return cudaGetLastError();
}

template <DType D, bool SR>
cudaError_t launch_x(const LaunchTable& table, uint64_t seed, Noise noise, bool load_x, uint64_t round_seed,
                     cudaStream_t stream) {
  return load_x ? launch<D, true, SR>(table, seed, noise, round_seed, stream)
                : launch<D, false, SR>(table, seed, noise, round_seed, stream);
}

cudaError_t launch_table(const LaunchTable& table, DType dtype, uint64_t seed, Noise noise, bool load_x,
                         const Rounding& rounding, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:  // never rounded stochastically
      return launch_x<DType::kFloat32, false>(table, seed, noise, load_x, 0, stream);
    case DType::kFloat16:
      return rounding.stochastic ? launch_x<DType::kFloat16, true>(table, seed, noise, load_x, rounding.seed, stream)
                                 : launch_x<DType::kFloat16, false>(table, seed, noise, load_x, 0, stream);
    case DType::kBFloat16:
      return rounding.stochastic ? launch_x<DType::kBFloat16, true>(table, seed, noise, load_x, rounding.seed, stream)
                                 : launch_x<DType::kBFloat16, false>(table, seed, noise, load_x, 0, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int axpbz(const AxpbzTensor* tensors, int64_t count, uint64_t seed, Noise noise, bool load_x, CUstream_st* stream,
          Rounding rounding) {
  const int64_t per_call = elements_per_call(noise);
  const int64_t tile_calls = noise == kGaussian ? kGaussianTileCalls : kRademacherTileCalls;
  // One launch per dtype and group of kMaxTensors tensors.
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    LaunchTable table{};
    table.count = 0;
    table.tile_start[0] = 0;
    for (int64_t i = 0; i <= count; ++i) {
      const bool flush = table.count == kMaxTensors || (i == count && table.count > 0);
      if (flush) {
        const cudaError_t err = launch_table(table, dtype, seed, noise, load_x, rounding, stream);
        if (err != cudaSuccess) return static_cast<int>(err);
        table.count = 0;
      }
      if (i == count) break;
      const AxpbzTensor& t = tensors[i];
      if (t.dtype != dtype || t.numel <= 0) continue;
      TensorDesc& d = table.tensor[table.count];
      d.data = t.data;
      d.src = t.src != nullptr ? t.src : t.data;
      d.numel = t.numel;
      d.offset = static_cast<int64_t>(t.offset);
      d.first_call = d.offset / per_call;
      d.last_call = (d.offset + t.numel + per_call - 1) / per_call;
      d.a = t.a;
      d.b = t.b;
      d.key = t.key;
      const uintptr_t group_bytes = 4u * static_cast<uintptr_t>(dtype_size(dtype));
      d.vec = (d.offset % 4 == 0) && (reinterpret_cast<uintptr_t>(d.data) % group_bytes == 0) &&
              (reinterpret_cast<uintptr_t>(d.src) % group_bytes == 0);
      const int64_t tiles = (d.last_call - d.first_call + tile_calls - 1) / tile_calls;
      table.tile_start[table.count + 1] = table.tile_start[table.count] + tiles;
      ++table.count;
    }
  }
  return static_cast<int>(cudaSuccess);
}

}  // namespace cuda
}  // namespace fastmezo
