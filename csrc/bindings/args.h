// Torch -> torch-free translation of the arguments of fastmezo::scale_add_noise_ and ::scale_add_noise_out,
// shared by the CPU and the CUDA kernels. The Python layer (fastmezo.plan) validates everything first with
// friendly messages; these checks are the kernels' own contract for direct callers. Every failed check
// is a TORCH_CHECK (c10::Error -> Python RuntimeError) whose message starts with the op's name and names
// the argument and the problem.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "fastmezo/axpbz.h"

namespace fastmezo {
namespace bindings {

inline DType dtype_of(const char* op, const char* what, const at::Tensor& t, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", what, " ", i, " has dtype ", t.scalar_type(),
                  "; expected float32, float16 or bfloat16");
  }
  return DType::kFloat32;  // unreachable
}

// The arguments of one call, translated.
struct Call {
  std::vector<AxpbzTensor> tensors;  // one per non-empty tensor
  Noise noise;
  Rounding rounding;
};

// No written tensor may share memory with any other tensor of the call (an output overlapping an input
// would be read after being written; overlapping in-place tensors would be updated twice). Byte ranges
// sorted by start: a pair overlaps iff the later one starts before the earlier one ends, so one sweep
// keeping the furthest end seen (of any range, and of written ranges) finds every overlapping pair with a
// written member. O(n log n) for n tensors.
struct Span {
  uintptr_t begin, end;
  bool written;
  size_t index;      // position in its list
  const char* what;  // "tensor" or "output"
};

inline void check_no_overlap(const char* op, std::vector<Span> spans) {
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) { return x.begin < y.begin; });
  const Span* furthest = nullptr;          // the range reaching furthest so far
  const Span* furthest_written = nullptr;  // the written range reaching furthest so far
  for (const Span& s : spans) {
    const Span* other = nullptr;
    if (s.written && furthest != nullptr && s.begin < furthest->end) other = furthest;
    if (!s.written && furthest_written != nullptr && s.begin < furthest_written->end) other = furthest_written;
    TORCH_CHECK(other == nullptr, op, ": ", s.what, " ", s.index, " overlaps the memory of ",
                other ? other->what : "", " ", other ? other->index : 0,
                "; the tensors a call writes must not share memory with any other tensor of the call");
    if (furthest == nullptr || s.end > furthest->end) furthest = &s;
    if (s.written && (furthest_written == nullptr || s.end > furthest_written->end)) furthest_written = &s;
  }
}

inline Span span_of(const at::Tensor& t, bool written, size_t index, const char* what) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  return Span{begin, begin + static_cast<uintptr_t>(t.numel()) * t.element_size(), written, index, what};
}

// The arguments of scale_add_noise_ (outs == nullptr: tensors are updated in place) or scale_add_noise_out (outs: written,
// tensors only read). Every tensor must be contiguous, of `device_type`, all on one device; outs must
// match their tensor's shape and dtype.
inline Call collect(const char* op, at::TensorList tensors, const at::TensorList* outs, at::ArrayRef<double> a,
                    at::ArrayRef<double> b, at::IntArrayRef keys, at::IntArrayRef offsets, int64_t noise,
                    std::optional<int64_t> round_seed, c10::DeviceType device_type) {
  const size_t n = tensors.size();
  TORCH_CHECK(a.size() == n && b.size() == n && keys.size() == n && offsets.size() == n, op, ": got ", n,
              " tensors but ", a.size(), " a, ", b.size(), " b, ", keys.size(), " keys and ", offsets.size(),
              " offsets");
  TORCH_CHECK(outs == nullptr || outs->size() == n, op, ": got ", n, " tensors but ", outs ? outs->size() : 0,
              " outs; expected one output per tensor");
  TORCH_CHECK(noise == kGaussian || noise == kRademacher, op, ": noise must be 0 (Gaussian) or 1 (Rademacher), got ",
              noise);
  Call call;
  call.noise = static_cast<Noise>(noise);
  // Any int64 is a valid rounding seed: it carries the uint64 seed's bits (two's complement).
  call.rounding.stochastic = round_seed.has_value();
  call.rounding.seed = round_seed.has_value() ? static_cast<uint64_t>(*round_seed) : 0;
  call.tensors.reserve(n);
  std::vector<Span> spans;
  spans.reserve(outs ? 2 * n : n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == tensors[0].device(), op, ": tensor ", i, " is on ", t.device(), " but tensor 0 is on ",
                tensors[0].device(), "; all tensors (and outputs) of a call must be on one device");
    TORCH_CHECK(t.device().type() == device_type, op, ": tensor ", i, " is on ", t.device(), " but the call went to the ",
                device_type, " kernel (another tensor or an output is on ", device_type,
                "); all tensors (and outputs) of a call must be on one device");
    TORCH_CHECK(t.is_contiguous(), op, ": tensor ", i, " is not contiguous");
    TORCH_CHECK(keys[i] >= 0 && keys[i] <= 0xFFFFFFFFll, op, ": key ", i, " must be in [0, 2**32), got ", keys[i]);
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] < (int64_t{1} << 62), op, ": offset ", i,
                " must be in [0, 2**62), got ", offsets[i]);
    const DType dtype = dtype_of(op, "tensor", t, i);
    void* dst = nullptr;
    const void* src = nullptr;
    if (outs != nullptr) {
      const at::Tensor& o = (*outs)[i];
      TORCH_CHECK(o.device() == t.device(), op, ": output ", i, " is on ", o.device(), " but tensor ", i, " is on ",
                  t.device());
      TORCH_CHECK(o.scalar_type() == t.scalar_type(), op, ": output ", i, " has dtype ", o.scalar_type(),
                  " but tensor ", i, " has dtype ", t.scalar_type());
      TORCH_CHECK(o.sizes() == t.sizes(), op, ": output ", i, " has shape ", o.sizes(), " but tensor ", i,
                  " has shape ", t.sizes());
      TORCH_CHECK(o.is_contiguous(), op, ": output ", i, " is not contiguous");
      if (t.numel() == 0) continue;
      spans.push_back(span_of(t, /*written=*/false, i, "tensor"));
      spans.push_back(span_of(o, /*written=*/true, i, "output"));
      dst = o.data_ptr();
      src = t.const_data_ptr();
    } else {
      if (t.numel() == 0) continue;
      spans.push_back(span_of(t, /*written=*/true, i, "tensor"));
      dst = t.data_ptr();
    }
    AxpbzTensor desc{dst, t.numel(), static_cast<uint64_t>(offsets[i]), static_cast<float>(a[i]),
                     static_cast<float>(b[i]), static_cast<uint32_t>(keys[i]), dtype};
    desc.src = src;
    call.tensors.push_back(desc);
  }
  check_no_overlap(op, std::move(spans));
  return call;
}

}  // namespace bindings
}  // namespace fastmezo
