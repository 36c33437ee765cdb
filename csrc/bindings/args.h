// Torch -> torch-free translation of the arguments of fastmezo_native::axpbz_, shared by the CPU and
// the CUDA registrations. The Python layer (fastmezo.functional) validates everything first with
// friendly messages; these checks are the op's own contract for direct callers.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "fastmezo/axpbz.h"

namespace fastmezo {
namespace bindings {

inline DType dtype_of(const at::Tensor& t, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastmezo_native::axpbz_: tensor ", i, " has dtype ", t.scalar_type(),
                  "; expected float32, float16 or bfloat16");
  }
  return DType::kFloat32;  // unreachable
}

// One AxpbzTensor per non-empty tensor; every tensor must be contiguous and of `device_type`, all on one
// device. `noise` is checked and returned as the contract's enum.
inline std::vector<AxpbzTensor> collect(at::TensorList tensors, at::ArrayRef<double> a, at::ArrayRef<double> b,
                                        at::IntArrayRef keys, at::IntArrayRef offsets, int64_t noise,
                                        c10::DeviceType device_type, Noise* noise_out) {
  const size_t n = tensors.size();
  TORCH_CHECK(a.size() == n && b.size() == n && keys.size() == n && offsets.size() == n,
              "fastmezo_native::axpbz_: got ", n, " tensors but ", a.size(), " a, ", b.size(), " b, ", keys.size(),
              " keys and ", offsets.size(), " offsets");
  TORCH_CHECK(noise == kGaussian || noise == kRademacher, "fastmezo_native::axpbz_: noise must be 0 (Gaussian) or 1 "
              "(Rademacher), got ", noise);
  *noise_out = static_cast<Noise>(noise);
  std::vector<AxpbzTensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().type() == device_type && t.device() == tensors[0].device(),
                "fastmezo_native::axpbz_: tensor ", i, " is on ", t.device(), " but tensor 0 is on ", tensors[0].device());
    TORCH_CHECK(t.is_contiguous(), "fastmezo_native::axpbz_: tensor ", i, " is not contiguous");
    TORCH_CHECK(keys[i] >= 0 && keys[i] <= 0xFFFFFFFFll, "fastmezo_native::axpbz_: key ", i,
                " must be in [0, 2**32), got ", keys[i]);
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] < (int64_t{1} << 62), "fastmezo_native::axpbz_: offset ", i,
                " must be in [0, 2**62), got ", offsets[i]);
    const DType dtype = dtype_of(t, i);
    if (t.numel() == 0) continue;
    out.push_back(AxpbzTensor{t.data_ptr(), t.numel(), static_cast<uint64_t>(offsets[i]), static_cast<float>(a[i]),
                              static_cast<float>(b[i]), static_cast<uint32_t>(keys[i]), dtype});
  }
  return out;
}

}  // namespace bindings
}  // namespace fastmezo
