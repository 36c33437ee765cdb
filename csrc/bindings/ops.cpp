// torch.library registration of the native backend: the schemas of fastmezo_native::axpbz_ and ::axpbz_out
// and their CPU kernels (the CUDA kernel registers in ops_cuda.cpp when the library is built with CUDA). The fake
// (meta) implementation is registered from Python (fastmezo/backends/native_backend.py).
//
// This file is also the Python extension module fastmezo._C: importing it runs the static registrations
// below. It defines no Python functions (everything goes through torch.ops.fastmezo_native), only a few
// constants describing the build, so the module needs no pybind11.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bindings/args.h"
#include "fastmezo/axpbz.h"

#ifndef FASTMEZO_WITH_CUDA
#define FASTMEZO_WITH_CUDA 0
#endif

// What fastmezo/backends/native_backend.py expects of this library: 2 = axpbz_ takes round_seed and
// axpbz_out exists. A library built from older sources (an editable install does not rebuild by itself)
// is reported as unavailable with the reason instead of failing on the first call.
#define FASTMEZO_API_VERSION 2

namespace {
// The compiler and C++ ABI this module was built with, for diagnostics (scripts/diagnose_native_exceptions.py):
// compared with torch's (torch.__config__.show(), torch._C._GLIBCXX_USE_CXX11_ABI).
#if defined(__clang__)
constexpr const char* kCompiler = "clang " __clang_version__;
#elif defined(__GNUC__)
constexpr const char* kCompiler = "gcc " __VERSION__;
#else
constexpr const char* kCompiler = "unknown";
#endif
#if defined(_GLIBCXX_USE_CXX11_ABI)
constexpr int kCxx11Abi = _GLIBCXX_USE_CXX11_ABI;
#else
constexpr int kCxx11Abi = -1;  // not libstdc++
#endif
}  // namespace

namespace {

constexpr const char* kInPlace = "fastmezo_native::axpbz_";
constexpr const char* kOutOfPlace = "fastmezo_native::axpbz_out";

void run_cpu(const fastmezo::bindings::Call& call, uint64_t seed, bool load_x) {
  if (call.tensors.empty()) return;
  // torch.set_num_threads applies to our OpenMP threads too (whichever OpenMP runtime is loaded).
  fastmezo::cpu::axpbz(call.tensors.data(), static_cast<int64_t>(call.tensors.size()), seed, call.noise, load_x,
                       at::get_num_threads(), call.rounding);
}

void axpbz_cpu(at::TensorList tensors, at::ArrayRef<double> a, at::ArrayRef<double> b, int64_t seed,
               at::IntArrayRef keys, at::IntArrayRef offsets, int64_t noise, bool load_x,
               std::optional<int64_t> round_seed) {
  const auto call = fastmezo::bindings::collect(kInPlace, tensors, nullptr, a, b, keys, offsets, noise, round_seed,
                                                c10::DeviceType::CPU);
  run_cpu(call, static_cast<uint64_t>(seed), load_x);
}

void axpbz_out_cpu(at::TensorList tensors, at::TensorList outs, at::ArrayRef<double> a, at::ArrayRef<double> b,
                   int64_t seed, at::IntArrayRef keys, at::IntArrayRef offsets, int64_t noise,
                   std::optional<int64_t> round_seed) {
  const auto call = fastmezo::bindings::collect(kOutOfPlace, tensors, &outs, a, b, keys, offsets, noise, round_seed,
                                                c10::DeviceType::CPU);
  run_cpu(call, static_cast<uint64_t>(seed), /*load_x=*/true);
}

}  // namespace

// Seeds are uint64 in the noise contract; the schema's int is int64, so callers pass the seed's
// two's-complement value (the bits are what matters); the same for round_seed, the pass's stochastic-
// rounding seed (None: round to nearest). keys are uint32 values, offsets global indices.
//   axpbz_:    tensors[i] <- a[i] * tensors[i] + b[i] * z   (load_x = False: b[i] * z), in place;
//   axpbz_out: outs[i] <- a[i] * tensors[i] + b[i] * z, tensors only read (exact mode's perturbed copies).
TORCH_LIBRARY(fastmezo_native, m) {
  m.def("axpbz_(Tensor(a!)[] tensors, float[] a, float[] b, int seed, int[] keys, int[] offsets, int noise, "
        "bool load_x, int? round_seed=None) -> ()");
  m.def("axpbz_out(Tensor[] tensors, Tensor(a!)[] outs, float[] a, float[] b, int seed, int[] keys, int[] offsets, "
        "int noise, int? round_seed=None) -> ()");
}

TORCH_LIBRARY_IMPL(fastmezo_native, CPU, m) {
  m.impl("axpbz_", &axpbz_cpu);
  m.impl("axpbz_out", &axpbz_out_cpu);
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fastmezo's native library: registers the torch.ops.fastmezo_native operators (C++ CPU kernels, and "
      "CUDA kernels if WITH_CUDA).",
      -1,       // no per-module state
      nullptr,  // no methods: everything is in torch.ops.fastmezo_native
      nullptr,
      nullptr,
      nullptr,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "WITH_CUDA", FASTMEZO_WITH_CUDA) < 0 ||
      PyModule_AddIntConstant(module, "WITH_OPENMP", fastmezo::cpu::has_openmp() ? 1 : 0) < 0 ||
      PyModule_AddIntConstant(module, "NOISE_VERSION", fastmezo::kNoiseVersion) < 0 ||
      PyModule_AddIntConstant(module, "API_VERSION", FASTMEZO_API_VERSION) < 0 ||
      PyModule_AddStringConstant(module, "COMPILER", kCompiler) < 0 ||
      PyModule_AddIntConstant(module, "GLIBCXX_USE_CXX11_ABI", kCxx11Abi) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
