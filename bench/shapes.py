"""Parameter shapes of OPT models, computed from their configurations (no weights, no downloads).

``opt_param_shapes(name)`` returns ``[(param_name, shape), ...]`` exactly as
``transformers.OPTForCausalLM(config).named_parameters()`` yields them: same names, same order, same
shapes. ``lm_head.weight`` is tied to ``model.decoder.embed_tokens.weight`` and ``named_parameters``
lists a shared tensor once, so it is not in the list (and not perturbed twice). The learned position
embedding has ``max_position_embeddings + 2`` rows (OPT's offset of 2).

The sizes are those of the published facebook/opt-* configurations. ``"opt-tiny"`` is not a real
model: a scaled-down OPT (hidden 64, 2 layers, small vocabulary) for smoke runs on a CPU.

Run ``python -m bench.shapes`` to print the tensor and parameter counts; the counts are also checked
against the published totals when this module is imported (``_check_totals``).
"""
from __future__ import annotations

import math

#: name -> (hidden_size, ffn_dim, num_hidden_layers, num_attention_heads, vocab_size, max_position_embeddings)
OPT_CONFIGS = {
    "opt-125m": (768, 3072, 12, 12, 50272, 2048),
    "opt-1.3b": (2048, 8192, 24, 32, 50272, 2048),
    "opt-13b": (5120, 20480, 40, 40, 50272, 2048),
    "opt-66b": (9216, 36864, 64, 72, 50272, 2048),
    # Not a real model: a tiny OPT-shaped parameter set for --smoke runs (CPU, Triton interpreter).
    "opt-tiny": (64, 256, 2, 4, 1024, 128),
}

#: Parameter counts of the real models (lm_head tied, so counted once), for the self-check: the
#: published counts of opt-125m, opt-1.3b and opt-13b, and for all four the count of
#: OPTForCausalLM(OPTConfig(...)) built on the meta device (bench/test_shapes.py checks that again).
EXPECTED_TOTALS = {
    "opt-125m": 125_239_296,
    "opt-1.3b": 1_315_758_080,
    "opt-13b": 12_853_473_280,
    "opt-66b": 65_719_701_504,
}

#: OPT's learned position embedding has this many extra rows (transformers OPTLearnedPositionalEmbedding).
POSITION_OFFSET = 2

_LAYER_LINEARS = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj")


def opt_shapes_from_sizes(hidden: int, ffn: int, layers: int, vocab: int = 50272,
                          max_positions: int = 2048) -> list[tuple[str, tuple[int, ...]]]:
    """(param_name, shape) pairs of an OPTForCausalLM with pre-layer-norm decoder layers and biases
    (every OPT except opt-350m), in ``named_parameters()`` order.

    OPTDecoder creates embed_tokens, embed_positions and final_layer_norm before its layers, so they
    come first; each layer lists self_attn (k, v, q, out projections), self_attn_layer_norm, fc1, fc2,
    final_layer_norm.
    """
    p = "model.decoder."
    shapes: list[tuple[str, tuple[int, ...]]] = [
        (p + "embed_tokens.weight", (vocab, hidden)),
        (p + "embed_positions.weight", (max_positions + POSITION_OFFSET, hidden)),
        (p + "final_layer_norm.weight", (hidden,)),
        (p + "final_layer_norm.bias", (hidden,)),
    ]
    for i in range(layers):
        q = f"{p}layers.{i}."
        for lin in _LAYER_LINEARS:
            shapes.append((q + lin + ".weight", (hidden, hidden)))
            shapes.append((q + lin + ".bias", (hidden,)))
        shapes += [
            (q + "self_attn_layer_norm.weight", (hidden,)),
            (q + "self_attn_layer_norm.bias", (hidden,)),
            (q + "fc1.weight", (ffn, hidden)),
            (q + "fc1.bias", (ffn,)),
            (q + "fc2.weight", (hidden, ffn)),
            (q + "fc2.bias", (hidden,)),
            (q + "final_layer_norm.weight", (hidden,)),
            (q + "final_layer_norm.bias", (hidden,)),
        ]
    return shapes


def opt_param_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(param_name, shape) pairs of OPT model ``name`` ("opt-125m", "opt-1.3b", "opt-13b", "opt-66b",
    or the fake "opt-tiny"); a "facebook/" prefix is accepted."""
    key = name.split("/")[-1].lower()
    if key not in OPT_CONFIGS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(OPT_CONFIGS)}")
    hidden, ffn, layers, _heads, vocab, max_pos = OPT_CONFIGS[key]
    return opt_shapes_from_sizes(hidden, ffn, layers, vocab, max_pos)


def numel(shapes) -> int:
    """Total number of elements of a shape list."""
    return sum(math.prod(shape) for _, shape in shapes)


def opt_config_kwargs(name: str) -> dict:
    """Keyword arguments of ``transformers.OPTConfig`` for model ``name`` (for cross-checks)."""
    hidden, ffn, layers, heads, vocab, max_pos = OPT_CONFIGS[name.split("/")[-1].lower()]
    return dict(hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                vocab_size=vocab, max_position_embeddings=max_pos, word_embed_proj_dim=hidden,
                do_layer_norm_before=True, enable_bias=True, tie_word_embeddings=True)


def _check_totals() -> None:
    """Every real model's shape list adds up to its published parameter count."""
    for name, expected in EXPECTED_TOTALS.items():
        got = numel(opt_param_shapes(name))
        if got != expected:  # pragma: no cover  (a bug in this file)
            raise AssertionError(f"{name}: shapes add up to {got:,} parameters, expected {expected:,}")


_check_totals()


if __name__ == "__main__":
    for model in OPT_CONFIGS:
        s = opt_param_shapes(model)
        print(f"{model:10s} {len(s):4d} tensors {numel(s):>16,d} parameters")
