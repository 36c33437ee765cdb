"""fastmezo: fused GPU kernels for MeZO, the memory-efficient zeroth-order optimizer
(Malladi et al., 2023), with Philox noise generated inside the kernels.

    import fastmezo
    opt = fastmezo.MeZO(model.parameters(), lr=1e-6, eps=1e-3, seed=0)
    loss = opt.step(lambda: model(**batch).loss)

or ``handle = fastmezo.patch(model); model.mezo_step(batch)``. The fused passes are in
:mod:`fastmezo.functional`; the noise contract in :mod:`fastmezo.noise` and docs/noise.md; how the
layers fit (op contract, plans, the step engine) in docs/design.md.
Importing fastmezo never imports triton or a native library: backends load on first use.
"""
from . import distributed, exact, functional, integrations, noise, paired
from .backends import BackendUnavailable
from .distributed import data_parallel
from .noise import NOISE_VERSION, derive_seed, key_from_name
from .optim import MeZO, param_groups
from .patch_handle import MeZOPatch
from .patching import patch
from .replayer import replay
from .trajectory import Trajectory
from .variants import MeZOVariant

__version__ = "0.1.0"

__all__ = ["MeZO", "MeZOPatch", "patch", "param_groups", "MeZOVariant", "data_parallel", "replay", "Trajectory",
           "functional", "exact", "paired", "integrations", "noise", "distributed", "derive_seed",
           "key_from_name", "NOISE_VERSION", "BackendUnavailable", "__version__"]
