"""The automatic backend choice says when it falls back (once), and an explicit choice still fails loudly."""
import warnings

import pytest
import torch

from fastmezo import backends


def _native_missing(monkeypatch):
    real = backends.unavailable_reason

    def reason(name, device):
        return "fastmezo._C is not built (test)" if name == "native" else real(name, device)

    monkeypatch.setattr(backends, "unavailable_reason", reason)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def test_fallback_warns_once_with_the_reason(monkeypatch):
    _native_missing(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"native backend cannot run cpu tensors \(fastmezo._C is not built"):
        assert backends.select(torch.device("cpu")) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # the second time: silent
        assert backends.select(torch.device("cpu")) == "reference"


def test_explicit_choice_still_raises(monkeypatch):
    _native_missing(monkeypatch)
    with pytest.raises(backends.BackendUnavailable, match="not built"):
        backends.select(torch.device("cpu"), "native")
