"""The kernels on a CUDA device where the CPU tests cannot reach: a tensor of more than 2**31 elements
(element indices past int32 in the kernels' address and counter arithmetic). Skipped without CUDA."""
import pytest
import torch

from fastmezo import functional as F
from fastmezo import oracle as R

from conftest import HAS_CUDA, NATIVE_DEVICES

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

BACKENDS = ["triton"] + (["native"] if "cuda" in NATIVE_DEVICES else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_past_int32_indices(backend):
    """perturb_ of zeros by 1.0 * z writes z itself: at the first and last elements and on both sides of
    2**31 it is the oracle's z (rounded to float16) for the same element index."""
    n = (1 << 31) + 5
    if torch.cuda.mem_get_info()[0] < 2 * n + (1 << 30):
        pytest.skip("needs about 5.3 GB of free GPU memory")
    x = torch.zeros(n, dtype=torch.float16, device="cuda")
    idx = torch.tensor([0, 1, (1 << 31) - 1, 1 << 31, (1 << 31) + 1, n - 1], device="cuda")
    F.perturb_([x], 1234, 1.0, backend=backend)
    want = R.noise_at(idx, 1234, 0, "gaussian").half()
    got = x[idx]
    # z within the contract's tolerance, then one float16 rounding
    assert torch.allclose(got.float(), want.float(), atol=2e-3, rtol=1e-3), (got, want)
    assert bool((x[-4096:] != 0).any())
