// The Python extension module fastmezo._C: the native kernels of the fastmezo operators (fastmezo/ops.py defines
// their schemas) and two ways in to them:
//   scale_add_noise(tensors, outs, a, b, seed, keys, offsets, noise, load_x, round_seed)
//       a direct call (outs None: in place; seed and round_seed as uint64), for eager passes;
//   register_kernels(device_type)
//       registers the CPU or CUDA kernels as that device type's kernels of fastmezo::scale_add_noise_ and
//       ::scale_add_noise_out, when fastmezo chooses the native backend for it (fastmezo/backends);
//   tensor_state(tensors)
//       what a cached plan relies on (fastmezo/plan_cache.py), as bytes: one call instead of five Python
//       maps over the tensors, which cost more host time than a pass's launch on a large model.
//   call_state(items, plain_types)
//       a functional call's tensors argument split into tensors and names, with the fingerprint of the
//       call's identity and state (fastmezo/plan.py call_state): the split, the cache key and the state
//       check of a repeated call in one pass over the items.
//   bump_versions(tensors)
//       torch.autograd.graph.increment_version for a list of tensors, read in place (fastmezo/ops.py).
// Importing the module registers nothing: which backend serves a device is fastmezo's choice, made once.
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include "bindings/args.h"
#include "bindings/kernels.h"
#include "fastmezo/axpbz.h"

#ifndef FASTMEZO_WITH_CUDA
#define FASTMEZO_WITH_CUDA 0
#endif

// What fastmezo/backends/native.py expects of this module: 3 = scale_add_noise and register_kernels, 4 = and
// tensor_state, 5 = and call_state, 6 = and bump_versions. A library
// built from older sources (an editable install does not rebuild by itself) is reported as unavailable with the
// reason instead of failing on the first call.
#define FASTMEZO_API_VERSION 6

namespace fastmezo {
namespace bindings {
namespace {

constexpr const char* kInPlace = "fastmezo::scale_add_noise_";
constexpr const char* kOutOfPlace = "fastmezo::scale_add_noise_out";

// The compiler and C++ ABI this module was built with, for diagnostics: compared with torch's
// (torch.__config__.show(), torch._C._GLIBCXX_USE_CXX11_ABI).
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

void run_cpu(const Call& call, uint64_t seed, bool load_x) {
  if (call.tensors.empty()) return;
  // torch.set_num_threads applies to our OpenMP threads too (whichever OpenMP runtime is loaded).
  fastmezo::cpu::axpbz(call.tensors.data(), static_cast<int64_t>(call.tensors.size()), seed, call.noise, load_x,
                       at::get_num_threads(), call.rounding);
}

int64_t schema_int(uint64_t bits) { return static_cast<int64_t>(bits); }

// The direct call: the kernel of the tensors' device.
void scale_add_noise(const std::vector<at::Tensor>& tensors, const std::optional<std::vector<at::Tensor>>& outs,
                     const std::vector<double>& a, const std::vector<double>& b, uint64_t seed,
                     const std::vector<int64_t>& keys, const std::vector<int64_t>& offsets, int64_t noise,
                     bool load_x, std::optional<uint64_t> round_seed) {
  if (tensors.empty()) return;
  std::optional<int64_t> round_arg;
  if (round_seed.has_value()) round_arg = schema_int(*round_seed);
  const bool cuda = tensors[0].device().is_cuda();
#if FASTMEZO_WITH_CUDA
  if (cuda) {
    if (outs.has_value()) {
      scale_add_noise_out_cuda(tensors, *outs, a, b, schema_int(seed), keys, offsets, noise, round_arg);
    } else {
      scale_add_noise_cuda(tensors, a, b, schema_int(seed), keys, offsets, noise, load_x, round_arg);
    }
    return;
  }
#else
  TORCH_CHECK(!cuda, "fastmezo._C was built without CUDA kernels");
#endif
  if (outs.has_value()) {
    scale_add_noise_out_cpu(tensors, *outs, a, b, schema_int(seed), keys, offsets, noise, round_arg);
  } else {
    scale_add_noise_cpu(tensors, a, b, schema_int(seed), keys, offsets, noise, load_x, round_arg);
  }
}

// Registrations live as long as the process: never destroyed, so nothing depends on the order in which the
// dispatcher and this module are torn down at exit.
std::mutex registration_mutex;
std::vector<std::string>* registered = new std::vector<std::string>();

void register_kernels(const std::string& device_type) {
  std::lock_guard<std::mutex> guard(registration_mutex);
  for (const auto& done : *registered) {
    if (done == device_type) return;
  }
  torch::Library* lib = nullptr;
  if (device_type == "cpu") {
    lib = new torch::Library(torch::Library::IMPL, "fastmezo", c10::DispatchKey::CPU, __FILE__, __LINE__);
    lib->impl("scale_add_noise_", &scale_add_noise_cpu);
    lib->impl("scale_add_noise_out", &scale_add_noise_out_cpu);
#if FASTMEZO_WITH_CUDA
  } else if (device_type == "cuda") {
    lib = new torch::Library(torch::Library::IMPL, "fastmezo", c10::DispatchKey::CUDA, __FILE__, __LINE__);
    lib->impl("scale_add_noise_", &scale_add_noise_cuda);
    lib->impl("scale_add_noise_out", &scale_add_noise_out_cuda);
#endif
  } else {
    TORCH_CHECK(false, "fastmezo._C has no kernels for device type ", device_type);
  }
  registered->push_back(device_type);
}

}  // namespace

void scale_add_noise_cpu(at::TensorList tensors, at::ArrayRef<double> a, at::ArrayRef<double> b, int64_t seed,
                         at::IntArrayRef keys, at::IntArrayRef offsets, int64_t noise, bool load_x,
                         std::optional<int64_t> round_seed) {
  const auto call = collect(kInPlace, tensors, nullptr, a, b, keys, offsets, noise, round_seed, c10::DeviceType::CPU);
  run_cpu(call, static_cast<uint64_t>(seed), load_x);
}

void scale_add_noise_out_cpu(at::TensorList tensors, at::TensorList outs, at::ArrayRef<double> a,
                             at::ArrayRef<double> b, int64_t seed, at::IntArrayRef keys, at::IntArrayRef offsets,
                             int64_t noise, std::optional<int64_t> round_seed) {
  const auto call = collect(kOutOfPlace, tensors, &outs, a, b, keys, offsets, noise, round_seed,
                            c10::DeviceType::CPU);
  run_cpu(call, static_cast<uint64_t>(seed), /*load_x=*/true);
}

// Per tensor: data address, dtype, device type and index, number of dimensions, sizes, strides, packed as
// int64 words. Two states are equal exactly when every tensor kept all of these (each tensor's words include
// its dimension count, which says how many sizes and strides follow, so the packing cannot line up two
// different lists). Tensors without storage (meta) count as address 0.
void push_state(std::vector<int64_t>& words, const at::Tensor& t) {
  const bool has_data = t.has_storage() && !t.is_meta();
  words.push_back(has_data ? reinterpret_cast<int64_t>(t.const_data_ptr()) : 0);
  words.push_back(static_cast<int64_t>(t.scalar_type()));
  words.push_back((static_cast<int64_t>(t.device().type()) << 16) | static_cast<uint16_t>(t.device().index()));
  words.push_back(t.dim());
  for (const auto size : t.sizes()) words.push_back(size);
  for (const auto stride : t.strides()) words.push_back(stride);
}

// f(tensor) for every tensor of ``tensors``, after checking that every item is one (nothing is applied
// when one is not). A list or tuple is read in place: building a vector of tensors from it cost more than
// the reads themselves. Any other iterable of tensors goes through pybind11's conversion.
template <typename F>
void for_each_tensor(pybind11::handle tensors, const char* what, F&& f) {
  PyObject* seq = tensors.ptr();
  if (PyList_CheckExact(seq) || PyTuple_CheckExact(seq)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(items[i])) {
        throw pybind11::type_error(std::string(what) + ": item " + std::to_string(i) + " is not a tensor");
      }
    }
    for (Py_ssize_t i = 0; i < n; ++i) f(THPVariable_Unpack(items[i]));
  } else {
    for (const auto& t : tensors.cast<std::vector<at::Tensor>>()) f(t);
  }
}

pybind11::bytes tensor_state(pybind11::handle tensors) {
  std::vector<int64_t> words;
  for_each_tensor(tensors, "tensor_state", [&](const at::Tensor& t) { push_state(words, t); });
  return pybind11::bytes(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(int64_t));
}

// The version counter of every tensor bumped, as torch.autograd.graph.increment_version bumps it: an
// inference tensor has no counter and is skipped.
void bump_versions(pybind11::handle tensors) {
  for_each_tensor(tensors, "bump_versions", [](const at::Tensor& t) {
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  });
}

// A 64-bit digest of 8-byte words (a multiply-xorshift mix per word): the dict hash of a call's
// fingerprint, which Python would otherwise compute over tens of kilobytes with SipHash on every call.
// Equal fingerprints are still compared byte for byte, so a collision costs a comparison, never a wrong hit.
uint64_t mix(uint64_t h, uint64_t word) {
  h = (h ^ word) * 0x9E3779B97F4A7C15ULL;
  return h ^ (h >> 29);
}

// The fast cases of a functional call's tensors argument (fastmezo/functional.py _split): a list or tuple
// of plain tensors (their exact type is one of plain_types), or of (str, plain tensor) tuples. Returns None
// for anything else (the caller takes its general path), else (tensors, names or None, fingerprint,
// digest). The fingerprint holds the number of tensors, then per tensor the address of its Python object
// (its identity, as id()) and its state as tensor_state packs it, then the names' UTF-8 bytes, each after
// its length (the dimension counts and the number of tensors make that layout unambiguous): equal
// fingerprints mean the same tensor objects, each with the state it had, under the same names. The caller
// keeps the objects alive (the plan cache holds weak references that drop an entry when one dies), so an
// equal address is the same object.
pybind11::object call_state(pybind11::handle items, pybind11::handle plain_types) {
  namespace py = pybind11;
  PyObject* seq = items.ptr();
  if (!(PyList_CheckExact(seq) || PyTuple_CheckExact(seq)) || !PyTuple_CheckExact(plain_types.ptr())) {
    return py::none();
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n == 0) return py::none();
  PyObject** objects = PySequence_Fast_ITEMS(seq);
  PyObject** types = PySequence_Fast_ITEMS(plain_types.ptr());
  const Py_ssize_t n_types = PyTuple_GET_SIZE(plain_types.ptr());
  const auto plain = [&](PyObject* obj) {
    for (Py_ssize_t i = 0; i < n_types; ++i) {
      if (reinterpret_cast<PyObject*>(Py_TYPE(obj)) == types[i]) return THPVariable_Check(obj);
    }
    return false;
  };
  const bool named = PyTuple_CheckExact(objects[0]);
  py::list tensors(n);
  py::object names = py::none();
  py::list name_list(named ? n : 0);
  std::vector<int64_t> words;
  words.reserve(static_cast<size_t>(n) * 9 + 1);
  words.push_back(n);
  std::string text;
  if (named) text.reserve(static_cast<size_t>(n) * 64);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = objects[i];
    if (named) {
      if (!PyTuple_CheckExact(obj) || PyTuple_GET_SIZE(obj) != 2) return py::none();
      PyObject* name = PyTuple_GET_ITEM(obj, 0);
      if (!PyUnicode_CheckExact(name)) return py::none();
      Py_ssize_t length = 0;
      const char* utf8 = PyUnicode_AsUTF8AndSize(name, &length);
      if (utf8 == nullptr) {  // not encodable (a lone surrogate): the general path handles such a name
        PyErr_Clear();
        return py::none();
      }
      const int64_t size = length;
      text.append(reinterpret_cast<const char*>(&size), sizeof(size));
      text.append(utf8, static_cast<size_t>(length));
      Py_INCREF(name);
      PyList_SET_ITEM(name_list.ptr(), i, name);
      obj = PyTuple_GET_ITEM(obj, 1);
    }
    if (!plain(obj)) return py::none();
    Py_INCREF(obj);
    PyList_SET_ITEM(tensors.ptr(), i, obj);
    words.push_back(reinterpret_cast<int64_t>(obj));
    push_state(words, THPVariable_Unpack(obj));
  }
  text.resize((text.size() + 7) / 8 * 8, '\0');
  std::string fingerprint(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(int64_t));
  fingerprint += text;
  uint64_t digest = 0x243F6A8885A308D3ULL;
  for (size_t at = 0; at < fingerprint.size(); at += 8) {
    uint64_t word;
    std::memcpy(&word, fingerprint.data() + at, sizeof(word));
    digest = mix(digest, word);
  }
  if (named) names = std::move(name_list);
  return py::make_tuple(std::move(tensors), std::move(names), py::bytes(fingerprint), py::int_(digest));
}

}  // namespace bindings
}  // namespace fastmezo

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  m.doc() = "fastmezo's native library: CPU (OpenMP) and, if WITH_CUDA, CUDA kernels of the fastmezo operators.";
  // A failed check raises RuntimeError with a message that starts with the operator's name (no C++
  // backtrace: the message is for the user).
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  m.def("scale_add_noise", &fastmezo::bindings::scale_add_noise, py::arg("tensors"), py::arg("outs"), py::arg("a"),
        py::arg("b"), py::arg("seed"), py::arg("keys"), py::arg("offsets"), py::arg("noise"), py::arg("load_x"),
        py::arg("round_seed"), py::call_guard<py::gil_scoped_release>());
  m.def("register_kernels", &fastmezo::bindings::register_kernels, py::arg("device_type"));
  m.def("tensor_state", &fastmezo::bindings::tensor_state, py::arg("tensors"));
  m.def("call_state", &fastmezo::bindings::call_state, py::arg("items"), py::arg("plain_types"));
  m.def("bump_versions", &fastmezo::bindings::bump_versions, py::arg("tensors"));
  m.attr("WITH_CUDA") = FASTMEZO_WITH_CUDA;
  m.attr("WITH_OPENMP") = fastmezo::cpu::has_openmp() ? 1 : 0;
  m.attr("NOISE_VERSION") = fastmezo::kNoiseVersion;
  m.attr("API_VERSION") = FASTMEZO_API_VERSION;
  m.attr("COMPILER") = fastmezo::bindings::kCompiler;
  m.attr("GLIBCXX_USE_CXX11_ABI") = fastmezo::bindings::kCxx11Abi;
}
