"""Shared test set-up.

Triton kernels run on CPU tensors through the interpreter, which must be switched on before triton is
imported: without a GPU this file sets TRITON_INTERPRET=1 before anything imports triton. With a GPU,
the same tests run the compiled kernels on CUDA tensors.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

# Where the Triton kernels run in this session: compiled on the GPU, or interpreted on the CPU.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def _native_devices():
    """Devices the native library (fastmezo._C) runs here: none where it is not built."""
    from fastmezo.backends import native as native_backend

    devices = ["cpu"] if native_backend.unavailable_reason(torch.device("cpu")) is None else []
    if HAS_CUDA and native_backend.unavailable_reason(torch.device("cuda")) is None:
        devices.append("cuda")
    return devices


NATIVE_DEVICES = _native_devices()
HAS_NATIVE = bool(NATIVE_DEVICES)

# Tolerances (docs/noise.md): normals from a fast backend against the float64 oracle, in absolute
# terms per unit of |z| (transcendentals differ by a few ulp between libm, numpy and GPU intrinsics).
NORMAL_ATOL = 1e-5


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensors: intra-op threads only add overhead (tens of times slower on a
    2-core machine). The previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_device():
    """The device on which the triton backend runs here (skips if triton is missing)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return TRITON_DEVICE


def backend_devices():
    """(backend, device) pairs that can run in this session."""
    pairs = [("oracle", "cpu")]
    if HAS_TRITON:
        pairs.append(("triton", TRITON_DEVICE))
    if HAS_CUDA:
        pairs.append(("oracle", "cuda"))
    pairs.extend(("native", device) for device in NATIVE_DEVICES)
    return pairs


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at each value of x (as float32), for "within one ulp" checks."""
    mantissa_bits = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[x.dtype]
    xf = x.float().abs()
    exponent = torch.floor(torch.log2(torch.clamp(xf, min=torch.finfo(x.dtype).tiny)))
    return torch.pow(2.0, exponent - mantissa_bits)
