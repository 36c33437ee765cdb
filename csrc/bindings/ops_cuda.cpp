// The CUDA kernels of the fastmezo operators (built only when setup.py finds nvcc and torch has CUDA): the thin
// torch-facing launcher. It picks the tensors' device and torch's current stream and calls the torch-free kernels
// of csrc/cuda/axpbz_cuda.cu, which enqueue asynchronously like any torch op. Registered by ops.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "bindings/args.h"
#include "bindings/kernels.h"
#include "fastmezo/axpbz.h"

namespace fastmezo {
namespace bindings {
namespace {

constexpr const char* kInPlace = "fastmezo::scale_add_noise_";
constexpr const char* kOutOfPlace = "fastmezo::scale_add_noise_out";

void run_cuda(const Call& call, const at::Tensor& first, uint64_t seed, bool load_x) {
  if (call.tensors.empty()) return;
  const c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(first.device().index()).stream();
  const int err = fastmezo::cuda::axpbz(call.tensors.data(), static_cast<int64_t>(call.tensors.size()), seed,
                                        call.noise, load_x, stream, call.rounding);
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}

}  // namespace

void scale_add_noise_cuda(at::TensorList tensors, at::ArrayRef<double> a, at::ArrayRef<double> b, int64_t seed,
                          at::IntArrayRef keys, at::IntArrayRef offsets, int64_t noise, bool load_x,
                          std::optional<int64_t> round_seed) {
  const auto call = collect(kInPlace, tensors, nullptr, a, b, keys, offsets, noise, round_seed, c10::DeviceType::CUDA);
  if (call.tensors.empty()) return;
  run_cuda(call, tensors[0], static_cast<uint64_t>(seed), load_x);
}

void scale_add_noise_out_cuda(at::TensorList tensors, at::TensorList outs, at::ArrayRef<double> a,
                              at::ArrayRef<double> b, int64_t seed, at::IntArrayRef keys, at::IntArrayRef offsets,
                              int64_t noise, std::optional<int64_t> round_seed) {
  const auto call = collect(kOutOfPlace, tensors, &outs, a, b, keys, offsets, noise, round_seed,
                            c10::DeviceType::CUDA);
  if (call.tensors.empty()) return;
  run_cuda(call, tensors[0], static_cast<uint64_t>(seed), /*load_x=*/true);
}

}  // namespace bindings
}  // namespace fastmezo
