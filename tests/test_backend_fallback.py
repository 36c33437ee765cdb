"""The automatic backend choice says when it falls back (once), and an explicit choice still fails loudly."""
import warnings

import pytest
import torch

from fastmezo import backends


def _native_missing(monkeypatch):
    monkeypatch.setattr(backends.native, "unavailable_reason", lambda device: "fastmezo._C is not built (test)")
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def test_fallback_warns_once_with_the_reason(monkeypatch):
    _native_missing(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"native backend cannot run cpu tensors \(fastmezo._C is not built"):
        assert backends.select(torch.device("cpu")) is backends.oracle
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # the second time: silent
        assert backends.select(torch.device("cpu")) is backends.oracle


def test_explicit_choice_still_raises(monkeypatch):
    _native_missing(monkeypatch)
    with pytest.raises(backends.BackendUnavailable, match="not built"):
        backends.select(torch.device("cpu"), "native")
    monkeypatch.setenv(backends.ENV_VAR, "native")
    with pytest.raises(backends.BackendUnavailable, match="not built"):
        backends.select(torch.device("cpu"))


def test_unknown_names_are_refused_before_anything_loads(monkeypatch):
    with pytest.raises(ValueError, match="unknown fastmezo backend 'cuda'.*triton, native, oracle"):
        backends.requested("cuda")
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"'fast' \\(from {backends.ENV_VAR}\\)"):
        backends.requested()
