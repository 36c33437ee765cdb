#!/usr/bin/env python
"""Why does a C++ error raised by fastmezo_native::axpbz_ (TORCH_CHECK -> c10::Error) kill the process
with SIGSEGV on the GPU machine instead of raising RuntimeError? Run there, from the repository root:

    python scripts/diagnose_native_exceptions.py 2>&1 | tee diagnose_native.txt

It imports nothing of fastmezo in this process except to locate the library (the crashing calls run in
subprocesses), and prints:
  1. torch's build (torch.__config__.show(), its C++ ABI flag, the compiler recorded in libc10's .comment);
  2. how fastmezo._C was built: the compiler and _GLIBCXX_USE_CXX11_ABI it records (fastmezo._C.COMPILER,
     GLIBCXX_USE_CXX11_ABI), every compiler named in its .comment section (a mix means nvcc's host
     compiler and the C++ compiler differed), NEEDED / RPATH / RUNPATH, the symbol versions it requires
     (GLIBCXX_*, CXXABI_*, GCC_*), and whether it carries its own copy of the C++ runtime or the unwinder
     (static libstdc++ / libgcc: __gxx_personality_v0 or _Unwind_RaiseException defined in it);
  3. the compilers setup.py would pick now (CXX / c++ for .cpp, CC or gcc for nvcc's host side) and
     which libstdc++ / libgcc_s each would link (-print-file-name);
  4. which libstdc++ and libgcc_s the process actually loads (from /proc/self/maps after importing torch
     and fastmezo._C), and the newest GLIBCXX version each provides;
  5. experiments, each a fresh interpreter: a control (an error raised inside torch itself), the bad
     call on CPU tensors, the same with TORCH_SHOW_CPP_STACKTRACES=0 / 1, with the build compiler's
     libstdc++ + libgcc_s preloaded (LD_PRELOAD), and with the system ones preloaded; for each: raised /
     SIGSEGV / other. If gdb is installed, the crashing call once more under gdb for the native backtrace.
Reading the result: see the hints printed at the end.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

BAD_CALL = textwrap.dedent("""
    import torch, importlib
    importlib.import_module("fastmezo._C")
    try:
        torch.ops.fastmezo_native.axpbz_([torch.zeros(4, dtype=torch.float64)], [1.0], [1.0], 0, [0], [0], 0, True)
    except RuntimeError as exc:
        print("RAISED:", str(exc).splitlines()[0])
""")
CONTROL_CALL = textwrap.dedent("""
    import torch
    try:
        torch.zeros(2, 3) @ torch.zeros(4, 5)
    except RuntimeError as exc:
        print("RAISED:", str(exc).splitlines()[0])
""")


def section(title):
    print(f"\n===== {title} " + "=" * max(0, 90 - len(title)))


def run(cmd, env=None, timeout=120):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"<{type(exc).__name__}: {exc}>"
    return p.returncode, (p.stdout + p.stderr)


def sh(cmd, timeout=60):
    code, out = run(["bash", "-c", cmd], timeout=timeout)
    return out.strip() if out else ""


def outcome(code, out):
    if code is None:
        return f"could not run: {out}"
    if code == 0 and "RAISED:" in out:
        return "OK, raised RuntimeError"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"KILLED BY {name}"
    if code in (139, 134):
        return f"exit {code} ({'SIGSEGV' if code == 139 else 'SIGABRT'} in a shell)"
    return f"exit {code}"


def max_version(path, prefix):
    """The newest symbol version with this prefix that a library defines (e.g. GLIBCXX_3.4.30)."""
    out = sh(f"strings -a '{path}' | grep -E '^{prefix}[0-9.]+$' | sort -uV | tail -1")
    return out or "?"


def main():
    section("python / environment")
    print(sys.version)
    for var in ("CC", "CXX", "CUDA_HOME", "PATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "TORCH_SHOW_CPP_STACKTRACES",
                "CONDA_PREFIX"):
        print(f"{var}={os.environ.get(var, '<unset>')}")

    section("torch")
    import torch
    print(torch.__version__, "cuda", torch.version.cuda)
    print("torch._C._GLIBCXX_USE_CXX11_ABI =", getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "?"))
    print(torch.__config__.show())
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    for lib in ("libc10.so", "libtorch_cpu.so", "libtorch_python.so"):
        p = os.path.join(torch_lib, lib)
        if os.path.exists(p):
            print(f"{lib} .comment:", sh(f"readelf -p .comment '{p}' 2>/dev/null | grep -oE 'GCC: .*|clang version [^ ]*' | sort -u"))
    print("torch's bundled C++ runtimes:", glob.glob(os.path.join(torch_lib, "libstdc++*")) +
          glob.glob(os.path.join(torch_lib, "libgcc_s*")) or "none")

    section("fastmezo._C")
    import importlib.util
    spec = importlib.util.find_spec("fastmezo._C")
    if spec is None or not spec.origin:
        print("fastmezo._C is not built: nothing to diagnose")
        return 1
    so = spec.origin
    print("library:", so)
    code, out = run([sys.executable, "-c", "import importlib; m = importlib.import_module('fastmezo._C'); "
                     "print('COMPILER', getattr(m, 'COMPILER', '? (built before this was recorded)')); "
                     "print('GLIBCXX_USE_CXX11_ABI', getattr(m, 'GLIBCXX_USE_CXX11_ABI', '?')); "
                     "print('WITH_CUDA', m.WITH_CUDA)"])
    print(out.strip())
    print(".comment (every compiler that built an object in it):")
    print(textwrap.indent(sh(f"readelf -p .comment '{so}' | grep -oE 'GCC: .*|clang version [^ ]*|NVIDIA.*' | sort -u"), "    "))
    print("dynamic section:")
    print(textwrap.indent(sh(f"readelf -d '{so}' | grep -E 'NEEDED|RPATH|RUNPATH|FLAGS'"), "    "))
    print("required symbol versions:", sh(f"objdump -T '{so}' | grep -oE '(GLIBCXX|CXXABI|GCC)_[0-9.]+' | sort -uV | tr '\\n' ' '"))
    defined = sh(f"nm -D --defined-only '{so}' | grep -E ' (__gxx_personality_v0|_Unwind_RaiseException|_Unwind_Resume|__cxa_throw)$'")
    print("C++ runtime / unwinder defined INSIDE the library (static libstdc++ / libgcc):", defined or "none (good)")
    print("ldd:")
    print(textwrap.indent(sh(f"ldd '{so}'"), "    "))

    section("compilers setup.py would use now")
    cxx = os.environ.get("CXX", "c++")
    cc = os.environ.get("CC")
    for what, comp in (("C++ (CXX or c++)", cxx), ("nvcc host (-ccbin $CC, else gcc on PATH)", cc or "gcc")):
        path = shutil.which(comp) or comp
        print(f"{what}: {path} -> {os.path.realpath(path) if os.path.exists(path) else '?'}")
        print("    version:", sh(f"'{path}' --version | head -1"))
        for lib in ("libstdc++.so.6", "libgcc_s.so.1"):
            print(f"    links {lib}:", os.path.realpath(sh(f"'{path}' -print-file-name={lib}") or "?"))
        print("    default C++ ABI:", sh(f"printf '#include <string>\\nint abi = _GLIBCXX_USE_CXX11_ABI;\\n' | '{path}' -x c++ -E - 2>/dev/null | tail -1"))
    print("nvcc:", shutil.which("nvcc"), sh("nvcc --version | tail -2 | tr '\\n' ' '"))

    section("C++ runtimes loaded by the process (after import torch, fastmezo._C)")
    code, out = run([sys.executable, "-c", "import torch, importlib; importlib.import_module('fastmezo._C'); "
                     "import re; libs = sorted({l.split()[-1] for l in open('/proc/self/maps') if "
                     "re.search(r'lib(stdc\\+\\+|gcc_s|gomp|c10)[^/]*\\.so', l)}); print('\\n'.join(libs))"])
    loaded = [line for line in out.split() if line.startswith("/")]
    for lib in loaded:
        extra = ""
        if "libstdc++" in lib:
            extra = "  newest " + max_version(lib, "GLIBCXX_")
        elif "libgcc_s" in lib:
            extra = "  newest " + max_version(lib, "GCC_")
        print(lib + extra)
    if code != 0:
        print(out)

    section("experiments (each in a fresh interpreter)")
    base_env = dict(os.environ)
    build_cxx = shutil.which(cxx) or cxx
    build_libstdcxx = os.path.realpath(sh(f"'{build_cxx}' -print-file-name=libstdc++.so.6") or "")
    build_libgcc = os.path.realpath(sh(f"'{build_cxx}' -print-file-name=libgcc_s.so.1") or "")
    system_libstdcxx = next((p for p in ("/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/usr/lib64/libstdc++.so.6")
                             if os.path.exists(p)), None)
    system_libgcc = next((p for p in ("/lib/x86_64-linux-gnu/libgcc_s.so.1", "/usr/lib64/libgcc_s.so.1",
                                      "/lib64/libgcc_s.so.1") if os.path.exists(p)), None)
    experiments = [
        ("control: an error raised inside torch", CONTROL_CALL, {}),
        ("bad argument to fastmezo_native::axpbz_ (CPU tensors)", BAD_CALL, {}),
        ("same, TORCH_SHOW_CPP_STACKTRACES=0", BAD_CALL, {"TORCH_SHOW_CPP_STACKTRACES": "0"}),
        ("same, TORCH_SHOW_CPP_STACKTRACES=1", BAD_CALL, {"TORCH_SHOW_CPP_STACKTRACES": "1"}),
    ]
    if os.path.exists(build_libstdcxx) and os.path.exists(build_libgcc):
        experiments.append((f"same, LD_PRELOAD the build compiler's runtime ({build_libstdcxx})", BAD_CALL,
                            {"LD_PRELOAD": f"{build_libstdcxx}:{build_libgcc}"}))
    if system_libstdcxx and system_libgcc:
        experiments.append((f"same, LD_PRELOAD the system runtime ({system_libstdcxx})", BAD_CALL,
                            {"LD_PRELOAD": f"{system_libstdcxx}:{system_libgcc}"}))
    crashed = False
    results = {}
    for title, code_text, env_extra in experiments:
        env = dict(base_env, **env_extra)
        code, out = run([sys.executable, "-X", "faulthandler", "-c", code_text], env=env)
        verdict = outcome(code, out)
        results[title] = verdict
        crashed |= "KILLED" in verdict or "exit 139" in verdict
        print(f"- {title}: {verdict}")
        if "OK" not in verdict:
            print(textwrap.indent(out.strip()[-1500:], "      "))

    if crashed and shutil.which("gdb"):
        section("native backtrace of the crash (gdb)")
        with open("/tmp/fastmezo_bad_call.py", "w") as f:
            f.write(BAD_CALL)
        code, out = run(["gdb", "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info sharedlibrary",
                         "--args", sys.executable, "/tmp/fastmezo_bad_call.py"], timeout=300)
        keep = [l for l in out.splitlines() if l.startswith(("#", "Thread", "Program received")) or "libstdc++" in l
                or "libgcc_s" in l or "_C." in l]
        print("\n".join(keep[-80:]))
    elif crashed:
        print("\n(gdb not found: install it, or run `catchsegv python /tmp/fastmezo_bad_call.py`, for the native backtrace)")

    section("hints")
    print(textwrap.dedent("""\
        * fastmezo._C's GLIBCXX_USE_CXX11_ABI differs from torch._C._GLIBCXX_USE_CXX11_ABI: an ABI mismatch
          (recent torch no longer adds -D_GLIBCXX_USE_CXX11_ABI; a GCC configured for the old ABI, as some
          /opt toolchains are, then builds old-ABI code). setup.py now passes torch's value explicitly.
        * .comment lists two GCC versions: nvcc's host compiler differed from the C++ compiler. setup.py now
          passes -ccbin <the C++ compiler> to nvcc unless CC is set.
        * The library requires a GLIBCXX/CXXABI/GCC version newer than the loaded libstdc++/libgcc_s
          provides, or the crash goes away with the build compiler's runtime preloaded: the build compiler's
          runtime is newer than the one the process uses. Rebuild with the compiler torch was built with
          (CXX=g++-<that version> CC=gcc-<that version>), or set FASTMEZO_STATIC_LIBSTDCXX=1 (links libstdc++
          and libgcc statically; a last resort).
        * Crash only with TORCH_SHOW_CPP_STACKTRACES=1, inside backtrace/_Unwind_Backtrace in gdb: the
          stack-trace capture of c10::Error cannot walk our frames' unwind tables (compiler/unwinder mismatch).
        * The control crashes too: the environment (not fastmezo) is broken."""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
