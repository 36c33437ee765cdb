// torch.library registration of the native backend: the schema of fastmezo_native::axpbz_ and its CPU
// kernel (the CUDA kernel registers in ops_cuda.cpp when the library is built with CUDA). The fake
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

namespace {

void axpbz_cpu(at::TensorList tensors, at::ArrayRef<double> a, at::ArrayRef<double> b, int64_t seed,
               at::IntArrayRef keys, at::IntArrayRef offsets, int64_t noise, bool load_x) {
  fastmezo::Noise kind;
  const auto args = fastmezo::bindings::collect(tensors, a, b, keys, offsets, noise, c10::DeviceType::CPU, &kind);
  if (args.empty()) return;
  // torch.set_num_threads applies to our OpenMP threads too (whichever OpenMP runtime is loaded).
  fastmezo::cpu::axpbz(args.data(), static_cast<int64_t>(args.size()), static_cast<uint64_t>(seed), kind, load_x,
                       at::get_num_threads());
}

}  // namespace

// Seeds are uint64 in the noise contract; the schema's int is int64, so callers pass the seed's
// two's-complement value (the bits are what matters). keys are uint32 values, offsets global indices.
TORCH_LIBRARY(fastmezo_native, m) {
  m.def("axpbz_(Tensor(a!)[] tensors, float[] a, float[] b, int seed, int[] keys, int[] offsets, int noise, "
        "bool load_x) -> ()");
}

TORCH_LIBRARY_IMPL(fastmezo_native, CPU, m) {
  m.impl("axpbz_", &axpbz_cpu);
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
      PyModule_AddIntConstant(module, "NOISE_VERSION", fastmezo::kNoiseVersion) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
