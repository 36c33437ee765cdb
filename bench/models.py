"""Randomly initialised OPT models built from their configurations (bench/shapes.py; nothing downloaded),
directly on the device in the target dtype, so a 13B or 66B model never passes through host memory;
and the batches and closures the step benchmarks feed them."""
from __future__ import annotations

import contextlib
import math
import os
import time

import torch

from bench.common import synchronize
from bench.shapes import numel, opt_config_kwargs, opt_param_shapes

INIT_STD = 0.02  # OPT's init_std


class ModelTooLarge(RuntimeError):
    """The model's weights do not fit in the free device memory: the model is skipped, not crashed on."""


def opt_config(name: str):
    """transformers.OPTConfig of model ``name`` (bench/shapes.py sizes), dropout off, no KV cache."""
    from transformers import OPTConfig

    return OPTConfig(**opt_config_kwargs(name), dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
                     use_cache=False)


def _no_init_weights():
    """transformers' context that skips weight initialisation at construction (the weights are then only
    allocated, and filled once on the device by init_weights_); a null context where this transformers
    version has none (the model is then initialised twice: slower, same result)."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(module, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def param_bytes_of(name: str, dtype: torch.dtype) -> int:
    """Bytes of model ``name``'s parameters (lm_head tied to the embedding, so counted once)."""
    return numel(opt_param_shapes(name)) * element_size(dtype)


def largest_tensor_bytes(name: str, dtype: torch.dtype) -> int:
    return max(math.prod(s) for _, s in opt_param_shapes(name)) * element_size(dtype)


@torch.no_grad()
def init_weights_(model: torch.nn.Module, seed: int = 0, std: float = INIT_STD) -> None:
    """In place, on the model's device: N(0, std) for matrices and embeddings, 0 for biases, 1 for
    layer-norm weights (OPT's initialisation, without the padding row). No temporaries."""
    params = list(model.named_parameters())
    gen = torch.Generator(device=params[0][1].device).manual_seed(seed)
    for name, p in params:
        if name.endswith(".bias"):
            p.zero_()
        elif "layer_norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)


def _check_fits(name: str, dtype: torch.dtype, device: torch.device) -> None:
    need = param_bytes_of(name, dtype)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        # The untied lm_head is allocated during construction before tie_weights frees it: one extra
        # embedding, plus some room for the CUDA context's own allocations.
        largest = largest_tensor_bytes(name, dtype)
        if need + largest + (256 << 20) > free:
            raise ModelTooLarge(f"{name} {str(dtype).split('.')[-1]}: weights need {need / 2**30:.1f} GiB "
                                f"(+{largest / 2**30:.1f} GiB while building), {free / 2**30:.1f} GiB free")
    elif device.type == "cpu":
        try:
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not POSIX: no check
            return
        if need > host // 2:
            raise ModelTooLarge(f"{name}: weights need {need / 2**30:.1f} GiB, more than half of the host's "
                                f"{host / 2**30:.1f} GiB")


def build_model(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0, log=print):
    """A randomly initialised OPTForCausalLM of ``name``, built on ``device`` in ``dtype`` (eval mode).

    Parameters are allocated where they live, in their dtype (``torch.device`` context and default dtype
    during construction). Raises ModelTooLarge if the weights cannot fit in the free device memory.
    """
    from transformers import OPTForCausalLM

    _check_fits(name, dtype, device)
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), _no_init_weights():
            model = OPTForCausalLM(opt_config(name))
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()  # skipped with init_weights under no_init_weights
    if model.lm_head.weight is not model.model.decoder.embed_tokens.weight:
        raise RuntimeError("lm_head is not tied to the embedding: the parameter count would be wrong")
    wrong = [(n, p.device, p.dtype) for n, p in model.named_parameters()
             if p.device.type != device.type or p.dtype != dtype]
    if wrong:
        raise RuntimeError(f"{len(wrong)} parameters were not built on {device} in {dtype}, e.g. {wrong[0]}")
    got, expected = sum(p.numel() for p in model.parameters()), numel(opt_param_shapes(name))
    if got != expected:
        raise RuntimeError(f"{name}: built {got:,} parameters, bench/shapes.py says {expected:,}")
    init_weights_(model, seed)
    model.eval()  # dropout off, as MeZO's forwards run
    synchronize(device)
    log(f"[{name} {str(dtype).split('.')[-1]}] built on {device} in {time.perf_counter() - t0:.1f} s: "
        f"{got:,} parameters, {param_bytes_of(name, dtype) / 1e9:.2f} GB, "
        f"attention {getattr(model.config, '_attn_implementation', '?')}")
    return model


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of every trainable parameter, in named_parameters order (tied ones once):
    what the paper's trainer perturbs."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_batch(vocab: int, batch: int, tokens: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Random token ids, shape (batch, tokens); labels are the same ids (the LM loss)."""
    gen = torch.Generator(device=device).manual_seed(seed + 1000 * batch + tokens)
    return torch.randint(2, vocab, (batch, tokens), generator=gen, device=device)  # 0, 1: bos, pad


def make_closure(model: torch.nn.Module, ids: torch.Tensor):
    """The MeZO closure: one forward pass, returns the causal-LM loss (a 0-dim tensor)."""
    def closure():
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    return closure
