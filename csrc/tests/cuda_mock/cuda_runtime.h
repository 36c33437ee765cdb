#pragma once
// MOCK of a tiny part of the CUDA runtime, for csrc/tests/test_cuda_emulated.cpp only: lets g++ compile
// csrc/cuda/axpbz_cuda.cu as host C++ and run its kernels serially (a warp = 32 host threads, so that
// __shfl_sync works through a barrier). It checks the kernels' indexing (elements, Philox calls, rounding
// draws, src/dst, edges), not the numerics of real device intrinsics. Not a CUDA installation.
#include <cstdint>
#include <cstddef>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __grid_constant__
struct dim3 { unsigned x, y, z; };
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 gridDim, blockDim;
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef struct CUstream_st* cudaStream_t;
inline cudaError_t cudaGetLastError() { return 0; }
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
inline void __stwb(float4* p, float4 v) { *p = v; }
inline void __stwb(uint2* p, uint2 v) { *p = v; }
#include <pthread.h>
#include <thread>
#include <vector>
struct MockWarp { pthread_barrier_t bar; unsigned slot[32]; };
extern thread_local MockWarp* tl_warp;
inline unsigned __shfl_sync(unsigned, unsigned v, int k) {
  tl_warp->slot[threadIdx.x & 31] = v;
  pthread_barrier_wait(&tl_warp->bar);
  const unsigned r = tl_warp->slot[k];
  pthread_barrier_wait(&tl_warp->bar);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline float __uint_as_float(unsigned u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; __builtin_memcpy(&u, &f, 4); return u; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
// 32 host threads per launch, one per lane, each running its lane of every (block, warp) in the same
// order, so that __shfl_sync (a barrier) pairs up; kernels' warp-uniform control flow keeps them in step.
template <class F, class... A> void launch_mock(F f, unsigned grid, int threads, int, cudaStream_t, A... a) {
  gridDim.x = grid; blockDim.x = threads;
  MockWarp warp;
  pthread_barrier_init(&warp.bar, nullptr, 32);
  std::vector<std::thread> ts;
  for (int l = 0; l < 32; ++l) {
    ts.emplace_back([&, l] {
      tl_warp = &warp;
      for (unsigned b = 0; b < grid; ++b) {
        for (int w = 0; w < threads / 32; ++w) {
          blockIdx.x = b;
          threadIdx.x = w * 32 + l;
          f(a...);
        }
      }
    });
  }
  for (auto& t : ts) t.join();
  pthread_barrier_destroy(&warp.bar);
}
