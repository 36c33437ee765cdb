// CUDA registration of fastmezo_native::axpbz_ (built only when setup.py finds nvcc and torch has CUDA):
// the thin torch-facing launcher. It picks the tensors' device and torch's current stream and calls the
// torch-free kernels of csrc/cuda/axpbz_cuda.cu, which enqueue asynchronously like any torch op.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bindings/args.h"
#include "fastmezo/axpbz.h"

namespace {

void axpbz_cuda(at::TensorList tensors, at::ArrayRef<double> a, at::ArrayRef<double> b, int64_t seed,
                at::IntArrayRef keys, at::IntArrayRef offsets, int64_t noise, bool load_x) {
  fastmezo::Noise kind;
  const auto args = fastmezo::bindings::collect(tensors, a, b, keys, offsets, noise, c10::DeviceType::CUDA, &kind);
  if (args.empty()) return;
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(tensors[0].device().index()).stream();
  const int err = fastmezo::cuda::axpbz(args.data(), static_cast<int64_t>(args.size()), static_cast<uint64_t>(seed),
                                        kind, load_x, stream);
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmezo_native, CUDA, m) {
  m.impl("axpbz_", &axpbz_cuda);
}
