"""The read check of the first perturbed forward (:class:`_ReadCheck`): a TorchFunctionMode that
reports a stored trained parameter (or a view of its memory) reaching a torch function while the
forwards should see its perturbed copy instead.

Apart from fastmezo.exact because two perturbation providers use it: exact mode's hooks
(fastmezo.exact.ExactPerturbation) and paired mode's wrapped forwards (fastmezo.paired). Each gives it
the storages to watch and a ``_read_outside(name, func)`` that raises its own mode's error, and pauses it
(``paused``) around fastmezo's own reads of the stored weights.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


class _ReadCheck(TorchFunctionMode):
    """Raises ExactModeError when a stored, perturbed-in-this-forward tensor (or any view of its
    memory) is an argument of a torch function: that read bypasses the owning module's hooks and
    would see the unperturbed weight. Attribute reads (``p.device``, ``p.dtype``, ``p.shape``) are
    fine. Used for one forward only: it costs a Python call per torch function."""

    def __init__(self, provider, storages):
        super().__init__()
        self.provider = provider
        self.storages = storages          # (device, storage data_ptr) -> parameter name
        self.paused = 0                   # > 0 inside fastmezo's own hooks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and getattr(func, "__name__", "") != "__get__":
            for arg in tree_flatten((args, kwargs))[0]:
                if isinstance(arg, torch.Tensor) and arg.numel():
                    name = self.storages.get((arg.device, arg.untyped_storage().data_ptr()))
                    if name is not None:
                        self.provider._read_outside(name, func)
        return func(*args, **kwargs)
