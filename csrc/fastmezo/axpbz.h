// The fused MeZO pass of the native backend, torch-free API (CPU: csrc/cpu/, CUDA: csrc/cuda/).
//
//   tensor_i <- a_i * tensor_i + b_i * z(seed, key_i)     (load_x = true)
//   tensor_i <- b_i * z(seed, key_i)                      (load_x = false: noise fill, x is never read)
//   out_i    <- a_i * src_i + b_i * z(seed, key_i)        (out of place: AxpbzTensor::src set, src only read)
//
// over the tensor's elements j = 0 .. numel-1, whose global index in the full (unsharded) tensor is
// offset + j; z is the noise of docs/noise.md (contract v1). Arithmetic is float32 (a, b, x, z as
// float32; two products and a sum, each rounded, no fused multiply-add), rounded once to the storage
// dtype, round to nearest even, or stochastically (docs/noise.md section 8, csrc/fastmezo/rounding.h) when
// a Rounding with stochastic = true is given: float16 / bfloat16 results then take the 16-bit draws of
// Philox stream 2 keyed by the rounding seed (float32 results are stored exactly as without it). One call
// takes any number of tensors of one device, of mixed dtypes.
//
// The bindings (csrc/bindings/) translate torch tensors into this description; nothing here includes
// torch, so the CPU kernels build and are tested standalone (CMakeLists.txt, ctest).
#pragma once

#include <cstdint>

#include "fastmezo/dtypes.h"
#include "fastmezo/philox.h"

namespace fastmezo {

struct AxpbzTensor {
  void* data;       // contiguous storage of `numel` elements of `dtype`: the result is written here
  int64_t numel;    // >= 0
  uint64_t offset;  // global index of element 0 (< 2^62)
  float a;
  float b;
  uint32_t key;     // tensor key (counter word 2)
  DType dtype;
  // Where x is read from: nullptr = `data` itself (in place). Otherwise `numel` elements of `dtype`
  // that share no memory with any `data` of the call (out-of-place pass; only read, with load_x).
  const void* src = nullptr;
};

// How results are stored in float16 / bfloat16: to nearest even (default) or stochastically with the
// draws of Philox stream 2 keyed by `seed` (the pass's rounding seed, docs/noise.md section 8).
struct Rounding {
  bool stochastic = false;
  uint64_t seed = 0;
};

namespace cpu {

// Runs the pass over `count` tensors with OpenMP threads. num_threads <= 0 means the OpenMP default;
// the result never depends on the thread count (each element's z is a pure function of its index).
void axpbz(const AxpbzTensor* tensors, int64_t count, uint64_t seed, Noise noise, bool load_x,
           int num_threads, Rounding rounding = Rounding{});

// Whether this build runs the CPU kernels with OpenMP threads (false: one thread).
bool has_openmp();

}  // namespace cpu
}  // namespace fastmezo

// CUDA kernels (csrc/cuda/axpbz_cuda.cu), declared without CUDA headers: the stream is a cudaStream_t.
struct CUstream_st;

namespace fastmezo {
namespace cuda {

// Enqueues the pass on `stream` (all tensors on the current device). Returns the cudaError_t of the
// launches (0 = cudaSuccess); it does not synchronize.
int axpbz(const AxpbzTensor* tensors, int64_t count, uint64_t seed, Noise noise, bool load_x,
          CUstream_st* stream, Rounding rounding = Rounding{});

}  // namespace cuda
}  // namespace fastmezo
