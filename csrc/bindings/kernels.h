// The kernels behind the fastmezo operators (fastmezo/ops.py), in the operators' argument order:
//   scale_add_noise_:    tensors[i] <- a[i] * tensors[i] + b[i] * z   (load_x = false: b[i] * z), in place;
//   scale_add_noise_out: outs[i] <- a[i] * tensors[i] + b[i] * z, tensors only read.
// Seeds are the uint64 seed's bits carried as int64 (the schema's int); round_seed: stochastic rounding of
// float16/bfloat16 results with that seed's draws, nullopt: round to nearest even.
#pragma once

#include <optional>

#include <ATen/ATen.h>

namespace fastmezo {
namespace bindings {

void scale_add_noise_cpu(at::TensorList tensors, at::ArrayRef<double> a, at::ArrayRef<double> b, int64_t seed,
                         at::IntArrayRef keys, at::IntArrayRef offsets, int64_t noise, bool load_x,
                         std::optional<int64_t> round_seed);
void scale_add_noise_out_cpu(at::TensorList tensors, at::TensorList outs, at::ArrayRef<double> a,
                             at::ArrayRef<double> b, int64_t seed, at::IntArrayRef keys, at::IntArrayRef offsets,
                             int64_t noise, std::optional<int64_t> round_seed);

#if FASTMEZO_WITH_CUDA
void scale_add_noise_cuda(at::TensorList tensors, at::ArrayRef<double> a, at::ArrayRef<double> b, int64_t seed,
                          at::IntArrayRef keys, at::IntArrayRef offsets, int64_t noise, bool load_x,
                          std::optional<int64_t> round_seed);
void scale_add_noise_out_cuda(at::TensorList tensors, at::TensorList outs, at::ArrayRef<double> a,
                              at::ArrayRef<double> b, int64_t seed, at::IntArrayRef keys, at::IntArrayRef offsets,
                              int64_t noise, std::optional<int64_t> round_seed);
#endif

}  // namespace bindings
}  // namespace fastmezo
