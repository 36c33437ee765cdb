"""Checks of bench/shapes.py: parameter counts, and (where transformers is installed) the exact
names, order and shapes of OPTForCausalLM built on the meta device (no memory, no download)."""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # in case transformers imports triton: interpreter without a GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.shapes import EXPECTED_TOTALS, OPT_CONFIGS, numel, opt_config_kwargs, opt_param_shapes  # noqa: E402

# (model, tensors, approximate size) as the brief and the published model cards state them.
SIZES = [("opt-125m", 196, 125e6), ("opt-1.3b", 388, 1.3e9), ("opt-13b", 644, 12.9e9), ("opt-66b", 1028, 66e9)]


@pytest.mark.parametrize("model, tensors, approx", SIZES)
def test_counts(model, tensors, approx):
    shapes = opt_param_shapes(model)
    assert len(shapes) == tensors
    assert numel(shapes) == EXPECTED_TOTALS[model]
    assert abs(numel(shapes) / approx - 1) < 0.02


def test_published_counts():
    """The three counts that facebook/opt-* publish, to the parameter."""
    assert numel(opt_param_shapes("opt-125m")) == 125_239_296
    assert numel(opt_param_shapes("opt-1.3b")) == 1_315_758_080
    assert numel(opt_param_shapes("opt-13b")) == 12_853_473_280


@pytest.mark.parametrize("model", list(OPT_CONFIGS))
def test_layout(model):
    shapes = opt_param_shapes(model)
    names = [name for name, _ in shapes]
    hidden, ffn, layers, _, vocab, max_pos = OPT_CONFIGS[model]
    assert len(set(names)) == len(names)
    assert not any(name.startswith("lm_head") for name in names)  # tied to embed_tokens
    d = dict(shapes)
    assert d["model.decoder.embed_tokens.weight"] == (vocab, hidden)
    assert d["model.decoder.embed_positions.weight"] == (max_pos + 2, hidden)
    assert d[f"model.decoder.layers.{layers - 1}.fc1.weight"] == (ffn, hidden)
    assert d[f"model.decoder.layers.{layers - 1}.fc2.weight"] == (hidden, ffn)
    assert len(shapes) == 4 + 16 * layers


def test_names_accepted():
    assert opt_param_shapes("facebook/opt-125m") == opt_param_shapes("opt-125m")
    with pytest.raises(ValueError, match="unknown model"):
        opt_param_shapes("opt-7b")


@pytest.mark.parametrize("model", ["opt-125m", "opt-1.3b", "opt-13b", "opt-66b", "opt-tiny"])
def test_matches_transformers(model):
    """Same names, order and shapes as transformers' OPTForCausalLM, built on the meta device."""
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(**opt_config_kwargs(model))
    with torch.device("meta"):
        hf = transformers.OPTForCausalLM(config)
    got = [(name, tuple(p.shape)) for name, p in hf.named_parameters()]
    assert got == opt_param_shapes(model)
    assert hf.lm_head.weight is hf.model.decoder.embed_tokens.weight
    assert sum(p.numel() for p in hf.parameters()) == numel(opt_param_shapes(model))
    assert all(math.prod(s) > 0 for _, s in got)
