#!/usr/bin/env python
"""Benchmark of WHOLE MeZO steps on OPT models: fastmezo.MeZO against the reference way, with the two
forward passes included.

    python bench/bench_steps.py [--models opt-1.3b,opt-13b] [--dtypes float16] [--configs 16x256,4x256,1x128]
                                [--variants inplace-rn,inplace-sr,exact-rn,exact-sr]
                                [--warmup N] [--reps N] [--out DIR] [--quick] [--smoke]
                                [--opt66b [--opt66b-tokens 256] [--opt66b-max-batch 128]]

For each model and dtype, one process builds a randomly initialised ``OPTForCausalLM`` from its
``OPTConfig`` (the published OPT sizes, bench/shapes.py; no download) directly on the GPU in the target
dtype: constructed with transformers' weight initialisation switched off (no CPU copy, no slow
``_init_weights``), then filled in place (N(0, 0.02) matrices, zero biases, unit layer-norm weights).
The same model instance then serves the reference and every fastmezo variant. Per batch configuration
(batch x tokens, random token ids, labels = input ids, the causal-LM loss):

1. before any timing: the kernels agree with the torch oracle (``fastmezo.reference``): the pass
   benchmark's check (``bench_perturb.check_kernels``: z at two offsets, perturb_ in the dtype); for
   every in-place rounding measured, one ``fastmezo.MeZO`` step over copies of a sample of the model's
   own tensors against the oracle's three passes (within 3 units in the last place); for every exact
   rounding measured, one exact-mode step (``fastmezo.patch(mode="exact")``) of a tiny OPT built in
   the same dtype on the same device: its two losses against forwards of the oracle's W +- eps z, its
   stored weights untouched by the forwards (a step with lr = 0 changes nothing), its update against the oracle's
   theta <- (1 - lr wd) theta - lr g z with g from the two losses. A disagreement aborts the run
   (exit code 1);
2. ``forward``: two forward passes (no_grad, loss as a Python float after each, as the step does): the
   part of a step that is not zeroth-order work;
3. ``reference``: ``reference_mezo.reference_step``: 3 out-of-place perturbation passes with
   ``torch.manual_seed`` + ``torch.normal`` per tensor, 2 forwards, 1 update pass (the paper's trainer);
4. the fastmezo variants (``--variants``, default all four, in this order), each ``MeZO.step``:
   ``inplace-rn`` / ``inplace-sr``: 3 fused in-place passes with in-kernel Philox noise + 2 forwards,
   float16/bfloat16 stores rounded to nearest / stochastically; ``exact-rn`` / ``exact-sr``: exact mode
   (``fastmezo.patch(model, mode="exact")``, hooks materialize W + eps z per group of modules right
   before it runs (``--exact-group-bytes``), 2 out-of-place passes inside the forwards + 1 update pass), the update rounded to nearest /
   stochastically. Exact mode is patched for its rows only and removed with the handle's context
   manager; before the next variant the script verifies that every module holds its own parameter
   objects again, that the hook dictionaries are as before patching and that no ``mezo_step`` is left
   (else RuntimeError). The first exact step after patching (it checks the model's parameter reads
   during one forward) is never timed. In float32 the rounding does not apply (rn = sr).

Reported per configuration: median step time over ``--reps`` steps after ``--warmup`` (CUDA events;
the time between a call's first and last GPU work), the ZO overhead = step - two forwards, the speed-ups
reference / variant of the step and of the overhead, the overhead over the one-pass floor (floor = 2 *
trainable parameter bytes / copy bandwidth measured in this run, as bench_perturb.py does: fastmezo makes
3 passes a step, the reference 4, so 3.0 and 4.0 are their ideals), the peak memory above inference:
``max_memory_allocated`` during the steps minus that during the plain forwards of the same batch
(peak statistics reset in between; exact mode is expected to need about one extra weight tensor: its
hooks materialize groups of modules of at most ``exact_group_bytes`` each, by default the largest
trained tensor's bytes; ``largest_tensor_bytes``, ``exact_group_bytes``, ``exact_hooked_modules`` and
``exact_copy_peak_bytes``, the most bytes of perturbed copies alive at once, are on the rows), and for the exact rows ``overhead_vs_inplace`` = exact
overhead / in-place overhead of the same rounding (target: <= 1.3). On the CPU there are no memory
statistics: reported as n/a. ``--rounding nearest|stochastic`` is a shortcut for the two variants of
that rounding (``inplace-rn,exact-rn`` or ``inplace-sr,exact-sr``); it also sets the OPT-66B search's
rounding.

--opt66b: OPT-66B in fp16 on one GPU (131.4 GB of weights): how large a batch (1, 2, 4, ... up to
--opt66b-max-batch, --opt66b-tokens tokens) each implementation (the reference, fastmezo in place) can
take a step with. Every batch runs a plain forward (the inference peak), then one step of each
implementation still in the race; a ``torch.OutOfMemoryError`` ends that implementation's search (its
cache is emptied and the others go on). An out-of-memory in the middle of a reference step leaves the
(random) weights perturbed: the reference does not undo anything; it does not matter for speed or
memory. Takes a few minutes.

--smoke: tiny OPT ("opt-tiny"), tiny batches, few repetitions, output in a temporary directory; runs on
the CPU (fastmezo's automatic backend there: native, else reference). Times then mean nothing.
Results: ``steps-<UTC time>-<gpu>.json`` and ``.csv`` (and ``opt66b-...csv``) in --out (default
bench/results/), rewritten after every model so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402  (does not import triton)

import bench_perturb as BP  # noqa: E402
from reference_mezo import reference_step  # noqa: E402
from shapes import numel, opt_config_kwargs, opt_param_shapes  # noqa: E402

DTYPES = BP.DTYPES
CheckFailed = BP.CheckFailed

#: batch x tokens of the step benchmark (the DESIGN.md measurements), and the --quick / --smoke subsets.
STEP_CONFIGS = ((16, 256), (4, 256), (1, 128))
QUICK_CONFIGS = ((4, 256), (1, 128))
SMOKE_CONFIGS = ((2, 16), (1, 8))
DEFAULT_MODELS = ("opt-1.3b", "opt-13b")

# The MeZO hyper-parameters of the paper for OPT-13B full-parameter fine-tuning. They do not change the
# speed; lr this small keeps the random weights sane over many timed steps.
EPS = 1e-3
LR = 1e-6
WEIGHT_DECAY = 0.0
INIT_STD = 0.02               # OPT's init_std
FAST_SEED = BP.SEED           # fastmezo base seed (step t uses derive_seed(FAST_SEED, t))
REF_SEED = BP.TORCH_SEED      # the reference's torch.manual_seed of step t: REF_SEED + t

# The model-step check: copies of up to this many elements of each sampled tensor, a weight decay and two
# fixed "losses" that make the update visible (lr * g = 1e-6 * 500 = 5e-4, on top of eps = 1e-3).
CHECK_CAP = 1 << 22
CHECK_LR = 1e-6
CHECK_WD = 0.1
CHECK_LOSSES = (2.0, 1.0)
CHECK_ULPS = 3                # one rounding per pass, each may land one unit off (z within NORMAL_ATOL)
MEZO_UPDATE_PASS = 2          # MeZO's pass index of the update (its stochastic-rounding bits)

# The exact-mode check: one exact step of a tiny OPT (CHECK_EXACT_MODEL, built in the benchmark's dtype
# on its device) with real losses. eps large enough that the two losses differ by far more than the
# tolerance of the loss comparison (so the check sees whether the forwards were perturbed at all), lr
# large enough that the update moves float16 weights by many units in the last place.
CHECK_EXACT_MODEL = "opt-tiny"
CHECK_EXACT_BATCH = (2, 16)
CHECK_EXACT_EPS = 0.05
CHECK_EXACT_LR = 1e-3
CHECK_EXACT_LOSS_RTOL = 2e-4   # |loss - oracle loss| <= RTOL * (1 + |oracle loss|)

#: The fastmezo variants of the step benchmark: name -> (perturbation mode, stochastic rounding).
VARIANTS = {"inplace-rn": ("inplace", False), "inplace-sr": ("inplace", True),
            "exact-rn": ("exact", False), "exact-sr": ("exact", True)}
ROUNDING_NAMES = {False: "nearest", True: "stochastic"}

# The --opt66b search.
OPT66B = "opt-66b"
OPT66B_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

STEP_FIELDS = ["model", "dtype", "batch", "tokens", "impl", "variant", "mode", "rounding", "ms_median", "ms_min",
               "ms_max", "reps", "forward2_ms", "overhead_ms", "passes", "floor_ms", "overhead_x_floor",
               "speedup_step_vs_reference", "speedup_overhead_vs_reference", "zo_share",
               "overhead_vs_inplace", "step_vs_inplace", "peak_bytes", "peak_extra_vs_inference_bytes",
               "exact_copy_peak_bytes", "largest_tensor_bytes", "exact_group_bytes", "exact_hooked_modules",
               "restore_checked", "loss", "backend",
               "n_tensors", "numel", "param_bytes", "bandwidth_gbps", "device", "gpu", "torch", "triton", "cuda",
               "commit", "date"]
OPT66B_FIELDS = ["model", "dtype", "batch", "tokens", "impl", "status", "ms", "peak_bytes",
                 "peak_extra_vs_inference_bytes", "inference_peak_bytes", "loss", "error", "backend",
                 "device", "gpu", "torch", "triton", "cuda", "commit", "date"]
META_FIELDS = ("device", "gpu", "torch", "triton", "cuda", "commit", "date")


class ModelTooLarge(RuntimeError):
    """The model's weights do not fit in the free device memory: the model is skipped, not crashed on."""


# ---------------------------------------------------------------------------------------------------
# Device and environment


def select_device(smoke: bool, script: str = "bench/bench_steps.py") -> torch.device:
    """The CUDA device; without one, the CPU for --smoke runs only (with Triton's interpreter switched
    on before triton is imported, so the pass check can run the Triton kernels on CPU tensors)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if not smoke:
        raise SystemExit(f"no CUDA device: this benchmark needs a GPU (use --smoke to test {script} on the CPU)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        if "triton" in sys.modules:
            raise SystemExit(f"no CUDA device, and triton was imported before TRITON_INTERPRET=1 could be "
                             f"set: run as TRITON_INTERPRET=1 python {script} --smoke")
        os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu")


def environment(device: torch.device) -> dict:
    """bench_perturb's environment record (device, versions, commit, date), plus transformers and the
    CUDA allocator settings, which change what fits."""
    import transformers

    env = BP.environment(device)
    env["transformers"] = transformers.__version__
    env["pytorch_cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    return env


def resolve_backend(device: torch.device, backend: str | None) -> str:
    """The fastmezo backend MeZO will run on ``device`` (automatic choice unless one is named)."""
    from fastmezo import backends

    return backends.select(device, backend)


# ---------------------------------------------------------------------------------------------------
# The model


def opt_config(name: str):
    """transformers.OPTConfig of model ``name`` (bench/shapes.py sizes), dropout off, no KV cache."""
    from transformers import OPTConfig

    config = OPTConfig(**opt_config_kwargs(name), dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
                       use_cache=False)
    return config


def _no_init_weights():
    """transformers' context that skips weight initialisation at construction (torch.nn.init and
    init_weights): the weights are then only allocated, and filled once, on the GPU, by init_weights_.
    A null context where this transformers version has none (the model is then initialised twice:
    slower, same result)."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(module, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def param_bytes_of(name: str, dtype: torch.dtype) -> int:
    """Bytes of model ``name``'s parameters (lm_head tied to the embedding, so counted once)."""
    return numel(opt_param_shapes(name)) * torch.tensor([], dtype=dtype).element_size()


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


def build_model(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0, log=print):
    """A randomly initialised OPTForCausalLM of ``name``, built on ``device`` in ``dtype`` (eval mode).

    Parameters are allocated where they live, in their dtype (``torch.device`` context and default dtype
    during construction), so a 13B or 66B model never passes through host memory. Raises ModelTooLarge
    if the weights cannot fit in the free device memory.
    """
    from transformers import OPTForCausalLM

    need = param_bytes_of(name, dtype)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        # The untied lm_head is allocated during construction before tie_weights frees it: one extra
        # embedding, plus some room for the CUDA context's own allocations.
        largest = max(math.prod(s) for _, s in opt_param_shapes(name)) * torch.tensor([], dtype=dtype).element_size()
        if need + largest + (256 << 20) > free:
            raise ModelTooLarge(f"{name} {str(dtype).split('.')[-1]}: weights need {need / 2**30:.1f} GiB "
                                f"(+{largest / 2**30:.1f} GiB while building), {free / 2**30:.1f} GiB free")
    elif device.type == "cpu":
        try:
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not POSIX: no check
            host = None
        if host is not None and need > host // 2:
            raise ModelTooLarge(f"{name}: weights need {need / 2**30:.1f} GiB, more than half of the host's "
                                f"{host / 2**30:.1f} GiB")
    config = opt_config(name)
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), _no_init_weights():
            model = OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()  # skipped with init_weights under no_init_weights
    if model.lm_head.weight is not model.model.decoder.embed_tokens.weight:
        raise RuntimeError("lm_head is not tied to the embedding: the parameter count would be wrong")
    wrong = [(n, p.device, p.dtype) for n, p in model.named_parameters()
             if p.device.type != device.type or p.dtype != dtype]
    if wrong:
        raise RuntimeError(f"{len(wrong)} parameters were not built on {device} in {dtype}, e.g. {wrong[0]}")
    got = sum(p.numel() for p in model.parameters())
    if got != numel(opt_param_shapes(name)):
        raise RuntimeError(f"{name}: built {got:,} parameters, bench/shapes.py says {numel(opt_param_shapes(name)):,}")
    init_weights_(model, seed)
    model.eval()  # dropout off, as MeZO's forwards run
    BP.synchronize(device)
    log(f"[{name} {str(dtype).split('.')[-1]}] built on {device} in {time.perf_counter() - t0:.1f} s: "
        f"{got:,} parameters, {need / 1e9:.2f} GB, attention {getattr(model.config, '_attn_implementation', '?')}")
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


def rounding_kwargs(rounding: str | None) -> dict:
    """MeZO keyword arguments for ``--rounding``: {} for MeZO's own default (None), else
    ``stochastic_rounding=True/False``; a clear error where this fastmezo has no such option."""
    if rounding is None:
        return {}
    import fastmezo

    if "stochastic_rounding" not in inspect.signature(fastmezo.MeZO).parameters:
        raise SystemExit(f"--rounding {rounding}: this fastmezo.MeZO has no stochastic_rounding option")
    return {"stochastic_rounding": rounding == "stochastic"}


def rounding_of(opt) -> str:
    """How a MeZO optimizer rounds its low-precision stores: "stochastic" or "nearest"."""
    return "stochastic" if getattr(opt, "stochastic_rounding", False) else "nearest"


def make_optimizer(model: torch.nn.Module, backend: str, rounding: str | None = None, seed: int = FAST_SEED):
    """fastmezo.MeZO over the model's trainable parameters, weight decay skipped on bias and norm
    parameters as in the reference; rounding None keeps MeZO's default (see rounding_kwargs)."""
    import fastmezo

    groups = fastmezo.param_groups(model, weight_decay=WEIGHT_DECAY, lr=LR, eps=EPS)
    return fastmezo.MeZO(groups, lr=LR, eps=EPS, seed=seed, backend=backend, **rounding_kwargs(rounding))


def parse_variants(text: str) -> list[str]:
    """'exact-sr,inplace-rn' -> ['inplace-rn', 'exact-sr'] (VARIANTS order, duplicates dropped); 'all' is
    all four. Raises ValueError naming an unknown variant."""
    names = [v.strip().lower() for v in text.split(",") if v.strip()]
    if "all" in names:
        names = [v for v in names if v != "all"] + list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; expected a comma-separated subset of "
                         f"{', '.join(VARIANTS)} (or 'all')")
    if not names:
        raise ValueError("--variants is empty")
    return [v for v in VARIANTS if v in names]


def variants_of_rounding(rounding: str | None) -> list[str]:
    """The variants --rounding selects: all four for None, else the in-place and exact one of it."""
    return [v for v, (_, sr) in VARIANTS.items() if rounding is None or ROUNDING_NAMES[sr] == rounding]


def variant_rounding(variant: str) -> str:
    """'nearest' or 'stochastic'."""
    return ROUNDING_NAMES[VARIANTS[variant][1]]


def variant_mode(variant: str) -> str:
    """'inplace' or 'exact'."""
    return VARIANTS[variant][0]


def inplace_twin(variant: str) -> str:
    """The in-place variant with the same rounding (the exact rows' yardstick)."""
    return "inplace-" + variant.split("-", 1)[1]


def model_hooks_state(model: torch.nn.Module) -> dict:
    """What exact mode changes and must give back: every module's own parameter objects, its forward
    (pre-)hook dictionaries, and the instance attributes fastmezo.patch adds. Holds references to the
    model's own parameters only (no copies)."""
    return {"params": [(m, n, p) for m in model.modules() for n, p in m._parameters.items()],
            "hooks": [(m, tuple(m._forward_pre_hooks), tuple(m._forward_hooks),
                       tuple(getattr(m, "_forward_hooks_always_called", {}))) for m in model.modules()],
            "attrs": sorted(k for k in ("mezo_step", "_fastmezo_patch") if k in model.__dict__)}


def verify_restored(model: torch.nn.Module, before: dict, what: str = "exact mode", exact=None) -> dict:
    """Raise RuntimeError unless the model is as ``before`` (model_hooks_state) says: the same parameter
    object in every module (no perturbed copy left swapped in), the same hook dictionaries (exact
    mode's hooks gone), no attribute of fastmezo.patch; and, for an exact-mode provider, no copy alive
    and no hook active. Returns a small record of what was checked."""
    problems = []
    moved = [n for m, n, p in before["params"] if m._parameters.get(n) is not p]
    if moved:
        problems.append(f"{len(moved)} module parameters are not the stored tensors again (e.g. {moved[0]!r})")
    now = model_hooks_state(model)
    if [h[1:] for h in now["hooks"]] != [h[1:] for h in before["hooks"]]:
        extra = sum(len(a[1]) + len(a[2]) - len(b[1]) - len(b[2]) for a, b in zip(now["hooks"], before["hooks"]))
        problems.append(f"forward hooks differ from before ({extra:+d} hooks)")
    if now["attrs"] != before["attrs"]:
        problems.append(f"attributes {now['attrs']} left on the model (before: {before['attrs']})")
    if exact is not None and (exact.active or exact.live_tensors):
        problems.append(f"the exact-mode provider is still active ({exact.live_tensors} copies alive)")
    if problems:
        raise RuntimeError(f"{what} did not leave the model as it was: " + "; ".join(problems))
    return {"params_checked": len(before["params"]), "hooks": sum(len(h[1]) + len(h[2]) for h in now["hooks"])}


@contextlib.contextmanager
def fastmezo_variant(model: torch.nn.Module, variant: str, backend: str, optimizers: dict | None = None,
                     seed: int = FAST_SEED, lr: float = LR, eps: float = EPS, weight_decay: float = WEIGHT_DECAY,
                     group_bytes: int | None = None):
    """Yields (optimizer, exact provider or None) for one variant on ``model``. In-place: the optimizer
    of ``optimizers[variant]`` (made and stored there if missing). Exact: ``fastmezo.patch(model,
    mode="exact", ...)`` as a context manager, removed on exit, after which verify_restored runs (a
    model not given back raises RuntimeError); index keys and param_groups as make_optimizer, so the
    variants differ only in the mode and the rounding. ``group_bytes``: exact mode's group budget
    (fastmezo.exact.plan_groups; None = its default)."""
    import fastmezo

    mode, stochastic = VARIANTS[variant]
    rounding = ROUNDING_NAMES[stochastic]
    if mode == "inplace":
        optimizers = {} if optimizers is None else optimizers
        if variant not in optimizers:
            optimizers[variant] = make_optimizer(model, backend, rounding, seed)
        yield optimizers[variant], None
        return
    before = model_hooks_state(model)
    with fastmezo.patch(model, mode="exact", lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, keys="index",
                        backend=backend, group_bytes=group_bytes, **rounding_kwargs(rounding)) as handle:
        yield handle.optimizer, handle.exact
    verify_restored(model, before, f"exact mode ({variant})", handle.exact)


class ReferenceStepper:
    """The reference step (reference_mezo.reference_step) over the model's trainable parameters, with
    a fresh torch seed per step, as the paper's trainer draws one."""

    def __init__(self, model: torch.nn.Module, seed: int = REF_SEED):
        named = trainable(model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.seed = seed
        self.steps = 0
        self.last_loss = self.last_projected_grad = None

    def step(self, closure):
        loss, grad = reference_step(self.params, self.names, closure, self.seed + self.steps, EPS, LR,
                                    WEIGHT_DECAY)
        self.steps += 1
        self.last_loss, self.last_projected_grad = float(loss), grad
        return loss


# ---------------------------------------------------------------------------------------------------
# Correctness before timing


def sample_tensors(named, cap: int = CHECK_CAP) -> list[tuple[str, torch.Tensor]]:
    """A sample of the model's own tensors, one of each kind (embedding, attention weight, biases,
    layer norms, the last MLP weight), as copies: whole when at most ``cap`` elements, else their first
    ``cap`` elements (flat). The model is not touched."""
    wanted = ("embed_tokens.weight", "q_proj.weight", "fc1.bias", "self_attn_layer_norm.weight",
              "fc2.weight", "final_layer_norm.bias")
    picked, seen = [], set()
    for key in wanted:
        hits = [(n, p) for n, p in named if n.endswith(key)]
        if not hits:
            continue
        name, p = hits[-1] if key.startswith("fc2") else hits[0]  # fc2: the last layer's
        if name in seen:
            continue
        seen.add(name)
        t = p.detach()
        picked.append((name, t.clone() if t.numel() <= cap else t.reshape(-1)[:cap].clone()))
    return picked


def check_model_step(named, device: torch.device, backend: str, cap: int = CHECK_CAP,
                     rounding: str | None = None) -> list[dict]:
    """One fastmezo.MeZO step over copies of a sample of the model's tensors (in their dtype), with
    constant losses, against the torch oracle: z from ``fastmezo.reference.noise`` and the three
    documented passes  x1 = x + eps z,  x2 = x1 - 2 eps z,  x3 = (1 - lr wd) (x2 + eps z) - lr g z,
    each computed in float32 and rounded once (``axpbz_reference``; to nearest, or stochastically with
    the oracle's rounding bits of each pass when the optimizer rounds stochastically, docs/noise.md
    section 8). The optimizer is configured as the timed one (``rounding``). Every element must agree
    within CHECK_ULPS units in the last place (plus the normals' tolerance scaled by the step sizes),
    and the step must change the sample. Raises CheckFailed listing the failures."""
    import fastmezo
    from fastmezo import reference as R

    sample = sample_tensors(named, cap)
    copies = [t.clone() for _, t in sample]
    opt = fastmezo.MeZO(copies, lr=CHECK_LR, eps=EPS, weight_decay=CHECK_WD, seed=FAST_SEED, backend=backend,
                        **rounding_kwargs(rounding))
    stochastic = rounding_of(opt) == "stochastic"
    losses = iter(CHECK_LOSSES)
    opt.step(lambda: next(losses))
    if opt.skipped_steps:
        raise CheckFailed("the check step was skipped by fastmezo.MeZO")
    seed = fastmezo.derive_seed(FAST_SEED, 0)
    grad = (CHECK_LOSSES[0] - CHECK_LOSSES[1]) / (2 * EPS)
    a = 1.0 - CHECK_LR * CHECK_WD
    b = a * EPS - CHECK_LR * grad
    passes = ((1.0, EPS), (1.0, -2 * EPS), (a, b))  # MeZO's pass indices 0, 1, 2
    records, failures, changed = [], [], 0
    for key, ((name, x), got) in enumerate(zip(sample, copies)):
        z = R.noise(x.numel(), seed, key, "gaussian", device=device).reshape(x.shape)
        index = torch.arange(x.numel(), dtype=torch.int64, device=device) if stochastic else None
        expect = x
        for pass_index, (pa, pb) in enumerate(passes):
            r = None
            if stochastic and x.dtype in (torch.float16, torch.bfloat16):
                r = R.rounding_bits_at(index, fastmezo.noise.rounding_seed(seed, pass_index), key)
            expect = R.axpbz_reference(expect, pa, pb, z) if r is None else R.axpbz_reference(expect, pa, pb, z, r)
        err = (got.float() - expect.float()).abs()
        # ulps of the largest intermediate value |x| + 2 eps |z|: the backend's z differs from the
        # oracle's in the last bits, which can flip the rounding of a perturbed value by one of *its*
        # ulps, and that difference survives the later passes even where the result is near zero.
        scale = (x.float().abs() + 2 * EPS * z.abs()).to(x.dtype)
        tol = CHECK_ULPS * torch.maximum(BP._ulp(expect), BP._ulp(scale)) + 4 * EPS * BP.NORMAL_ATOL * (1 + z.abs())
        ok = bool((err <= tol).all())
        changed += int((got != x).sum())
        records.append({"what": "MeZO.step", "mode": "inplace", "tensor": name, "dtype": str(x.dtype).split(".")[-1],
                        "rounding": rounding_of(opt), "numel": x.numel(), "max_abs_diff": err.max().item(),
                        "ok": ok})
        if not ok:
            failures.append(f"{name}: max |diff| {err.max().item():.3g} (tolerance {CHECK_ULPS} ulp)")
        del z, index, expect, err, tol
    del copies, sample
    BP.free_memory(device)
    if changed == 0:
        failures.append("the step changed none of the sampled elements")
    if failures:
        raise CheckFailed("fastmezo.MeZO disagrees with the torch oracle on the model's tensors; not timing "
                          "it:\n  " + "\n  ".join(failures))
    return records


def check_exact_step(dtype: torch.dtype, device: torch.device, backend: str, rounding: str | None = None,
                     name: str = CHECK_EXACT_MODEL) -> list[dict]:
    """One exact-mode step (``fastmezo.patch(model, mode="exact")``, configured as the timed exact
    variants: index keys, param_groups, ``rounding``) of a tiny OPT built in ``dtype`` on ``device``,
    with its real causal-LM losses, against the torch oracle (``fastmezo.reference``):

    * the forwards saw W +- eps z: each loss matches a forward (``torch.func.functional_call``) with
      the oracle's perturbed weights, x + (+-eps) z computed in float32 and rounded to nearest, within
      CHECK_EXACT_LOSS_RTOL; and those two oracle losses differ by far more than that (else the check
      could not tell a perturbed forward from a plain one);
    * the forwards only read the stored weights: a second step with lr = 0 leaves them bit-identical
      (checked this way because exact mode's read check forbids touching them inside a forward);
    * the update: every tensor equals  (1 - lr wd) theta - lr g z  (per group wd; g = (l+ - l-) / 2 eps
      from the step's own losses; rounded once, to nearest or with the oracle's rounding bits of pass
      index 2) within CHECK_ULPS units in the last place, and the step changed the weights;
    * the patch is removed afterwards and the model is as before (verify_restored).

    Raises CheckFailed listing the failures; returns one record for the losses and one for the update."""
    import fastmezo
    from fastmezo import reference as R
    from torch.func import functional_call

    model = build_model(name, dtype, device, log=lambda *a: None)
    named = trainable(model)
    start = {n: p.detach().clone() for n, p in named}
    ids = make_batch(model.config.vocab_size, *CHECK_EXACT_BATCH, device)
    kwargs = {"input_ids": ids, "labels": ids, "use_cache": False}
    failures = []

    def closure():
        return model(**kwargs).loss

    before = model_hooks_state(model)
    eps, lr = CHECK_EXACT_EPS, CHECK_EXACT_LR
    with fastmezo.patch(model, mode="exact", lr=lr, eps=eps, weight_decay=CHECK_WD, seed=FAST_SEED, keys="index",
                        backend=backend, **rounding_kwargs(rounding)) as handle:
        opt = handle.optimizer
        opt.step(closure)                                  # step 0: the one checked below
        loss_plus, loss_minus, skipped = opt.loss_plus, opt.loss_minus, opt.skipped_steps
        after = {n: p.detach().clone() for n, p in named}
        for group in opt.param_groups:                     # step 1 with lr = 0: the forwards only read
            group["lr"] = 0.0
        opt.step(closure)
        touched = [n for n, p in named if not torch.equal(p, after[n])]
        for group in opt.param_groups:
            group["lr"] = lr
    verify_restored(model, before, "exact mode (check)", handle.exact)
    stochastic = rounding_of(opt) == "stochastic" and dtype in (torch.float16, torch.bfloat16)
    rounding_name = rounding_of(opt)
    if skipped or opt.skipped_steps:
        raise CheckFailed(f"the exact-mode check step was skipped (losses {loss_plus}, {loss_minus})")
    if touched:
        failures.append(f"a step with lr = 0 changed stored weights ({touched[0]!r}, ...): the forwards wrote "
                        "into them")

    seed = fastmezo.derive_seed(FAST_SEED, 0)
    perturbed = {1: {}, -1: {}}
    diffs, changed, total, key = [], 0, 0, 0
    for gi, group in enumerate(opt.param_groups):
        g = (loss_plus - loss_minus) / (2 * group["eps"])
        a, b = 1.0 - group["lr"] * group["weight_decay"], -group["lr"] * g
        for pname in group["param_names"]:
            x, got = start[pname], after[pname]
            z = R.noise(x.numel(), seed, key, "gaussian", device=device).reshape(x.shape)
            for sign in (1, -1):
                perturbed[sign][pname] = R.axpbz_reference(x, 1.0, sign * eps, z)
            r = None
            if stochastic:
                index = torch.arange(x.numel(), dtype=torch.int64, device=device)
                r = R.rounding_bits_at(index, fastmezo.noise.rounding_seed(seed, MEZO_UPDATE_PASS), key)
            expect = R.axpbz_reference(x, a, b, z) if r is None else R.axpbz_reference(x, a, b, z, r)
            err = (got.float() - expect.float()).abs()
            scale = (x.float().abs() + abs(b) * z.abs()).to(x.dtype)
            tol = CHECK_ULPS * torch.maximum(BP._ulp(expect), BP._ulp(scale)) + 4 * abs(b) * BP.NORMAL_ATOL * (1 + z.abs())
            diffs.append(err.max().item())
            if not bool((err <= tol).all()):
                failures.append(f"update of {pname}: max |diff| {err.max().item():.3g} (tolerance {CHECK_ULPS} ulp)")
            changed += int((got != x).sum())
            total += x.numel()
            key += 1
    if changed == 0:
        failures.append("the exact-mode step changed none of the weights")

    with torch.no_grad():
        oracle = {sign: float(functional_call(model, perturbed[sign], (), kwargs).loss) for sign in (1, -1)}
    tol_loss = {sign: CHECK_EXACT_LOSS_RTOL * (1 + abs(oracle[sign])) for sign in (1, -1)}
    loss_diff = {1: abs(loss_plus - oracle[1]), -1: abs(loss_minus - oracle[-1])}
    for sign, which in ((1, "+eps"), (-1, "-eps")):
        if not loss_diff[sign] <= tol_loss[sign]:
            failures.append(f"loss at theta {which} z: {loss_plus if sign == 1 else loss_minus} against the "
                            f"oracle's {oracle[sign]} (tolerance {tol_loss[sign]:.2g})")
    if not abs(oracle[1] - oracle[-1]) > 10 * max(tol_loss.values()):
        failures.append(f"the oracle's two losses ({oracle[1]}, {oracle[-1]}) are too close for the loss check "
                        "to mean anything (raise CHECK_EXACT_EPS)")
    model = named = start = after = perturbed = None  # noqa: F841  (free the tiny model before timing)
    BP.free_memory(device)
    dname = str(dtype).split(".")[-1]
    records = [{"what": "MeZO.step losses", "mode": "exact", "tensor": f"{name} forwards", "dtype": dname,
                "rounding": rounding_name, "numel": 2, "max_abs_diff": max(loss_diff.values()),
                "loss_plus": loss_plus, "loss_minus": loss_minus, "oracle_loss_plus": oracle[1],
                "oracle_loss_minus": oracle[-1], "ok": not any(f.startswith(("loss", "the oracle", "a step"))
                                                               for f in failures)},
               {"what": "MeZO.step", "mode": "exact", "tensor": f"{name}: all {key} tensors", "dtype": dname,
                "rounding": rounding_name, "numel": total, "max_abs_diff": max(diffs), "changed": changed,
                "ok": not any(f.startswith(("update", "the exact")) for f in failures)}]
    if failures:
        raise CheckFailed("fastmezo exact mode disagrees with the torch oracle on a tiny OPT; not timing it:\n  "
                          + "\n  ".join(failures))
    return records


# ---------------------------------------------------------------------------------------------------
# Measurements


def timed(fn, device: torch.device, warmup: int, reps: int) -> tuple[list[float], int | None]:
    """(milliseconds of each timed call, peak bytes allocated during all calls or None on the CPU).
    Peak statistics are reset first, so the peak is this function's alone (the weights included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = BP.time_ms(fn, device, warmup, reps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return times, peak


def _ratio(num, den):
    """num / den, or None when it means nothing (a missing or non-positive denominator)."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _is_oom(exc: BaseException) -> bool:
    """An out-of-memory error: torch's own, or one raised as a RuntimeError by CUDA or cuBLAS."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def bench_config(model, ref, batch: int, tokens: int, device: torch.device, floor_ms: float, warmup: int,
                 reps: int, log=print, label: str = "", variants=tuple(VARIANTS), backend: str | None = None,
                 optimizers: dict | None = None, exact_group_bytes: int | None = None) -> list[dict]:
    """Time two forwards, the reference step and each fastmezo variant's step at one batch size, all on
    ``model``. Rows: forward, reference, then one per variant (``variants`` order).

    In-place variants use ``optimizers[variant]`` (made there if missing, so a caller can keep their step
    counts across configurations). Each exact variant patches the model for its own rows only: one
    untimed step (the read check of exact mode's first forward), then the timed ones, then the patch is
    removed and verify_restored checks the model before anything else runs on it."""
    if backend is None:
        backend = resolve_backend(device, None)
    optimizers = {} if optimizers is None else optimizers
    largest_tensor_bytes = max(p.numel() * p.element_size() for p in model.parameters())
    ids = make_batch(model.config.vocab_size, batch, tokens, device)
    closure = make_closure(model, ids)
    with torch.no_grad():
        loss0 = float(closure())
    if not math.isfinite(loss0):
        # MeZO would skip every step (no update pass) and the reference would write NaN into the weights:
        # the times would be of something else.
        raise RuntimeError(f"{label} {batch}x{tokens}: the random model's loss is {loss0}; not timing")

    @torch.no_grad()
    def forwards():
        float(closure())
        float(closure())

    fwd_times, fwd_peak = timed(forwards, device, warmup, reps)
    ref_times, ref_peak = timed(lambda: ref.step(closure), device, warmup, reps)
    for what, value in (("reference loss", ref.last_loss), ("reference projected gradient", ref.last_projected_grad)):
        if value is None or not math.isfinite(value):
            raise RuntimeError(f"{label} {batch}x{tokens}: {what} is {value}")
    plain = {"mode": None, "rounding": "nearest", "exact_copy_peak_bytes": None, "restore_checked": False,
             "largest_tensor_bytes": largest_tensor_bytes, "exact_hooked_modules": None, "exact_group_bytes": None}
    rows = [{"impl": "forward", "variant": "forward", **plain, "passes": 0, "times": fwd_times, "peak_bytes": fwd_peak,
             "loss": loss0},
            {"impl": "reference", "variant": "reference", **plain, "passes": 4, "times": ref_times,
             "peak_bytes": ref_peak, "loss": ref.last_loss}]
    for variant in variants:
        mode = variant_mode(variant)
        with fastmezo_variant(model, variant, backend, optimizers, group_bytes=exact_group_bytes) as (opt, exact):
            if exact is not None:
                opt.step(closure)   # untimed: exact mode's first forward runs under its read check
                exact.reset_peak()
            skipped_before = opt.skipped_steps
            times, peak = timed(lambda: opt.step(closure), device, warmup, reps)
            copy_peak = None if exact is None else exact.peak_bytes
            hooked = None if exact is None else len(exact.groups)
            group_bytes = None if exact is None else exact.group_bytes
        # (exact mode is removed here, and the model verified as before patching)
        if opt.skipped_steps != skipped_before:
            raise RuntimeError(f"{label} {batch}x{tokens}: {variant} skipped {opt.skipped_steps - skipped_before} "
                               "steps (non-finite loss): its times would lack the update pass")
        for what, value in (("loss", opt.loss_plus), ("projected gradient", opt.projected_grad)):
            if value is None or not math.isfinite(value):
                raise RuntimeError(f"{label} {batch}x{tokens}: {variant} {what} is {value}")
        rows.append({"impl": "fastmezo", "variant": variant, "mode": mode, "rounding": rounding_of(opt),
                     "passes": 3, "times": times, "peak_bytes": peak, "loss": opt.loss_plus,
                     "exact_copy_peak_bytes": copy_peak, "restore_checked": exact is not None,
                     "largest_tensor_bytes": largest_tensor_bytes, "exact_hooked_modules": hooked,
                     "exact_group_bytes": group_bytes})

    fwd_ms = statistics.median(fwd_times)
    ref_ms = statistics.median(ref_times)
    ref_overhead = ref_ms - fwd_ms
    for r in rows:
        times = r.pop("times")
        r["ms_median"] = statistics.median(times)
        overhead = None if r["impl"] == "forward" else r["ms_median"] - fwd_ms
        r.update({"batch": batch, "tokens": tokens, "ms_min": min(times), "ms_max": max(times), "reps": len(times),
                  "forward2_ms": fwd_ms, "overhead_ms": overhead, "floor_ms": floor_ms,
                  "overhead_x_floor": None if overhead is None else overhead / floor_ms,
                  "speedup_step_vs_reference": None if overhead is None else ref_ms / r["ms_median"],
                  "speedup_overhead_vs_reference": None if overhead is None else _ratio(ref_overhead, overhead),
                  "zo_share": None if overhead is None else overhead / r["ms_median"],
                  "peak_extra_vs_inference_bytes": None if r["peak_bytes"] is None or fwd_peak is None
                  else r["peak_bytes"] - fwd_peak})
    by_variant = {r["variant"]: r for r in rows}
    for r in rows:
        twin = by_variant.get(inplace_twin(r["variant"])) if r["mode"] == "exact" else None
        r["overhead_vs_inplace"] = None if twin is None else _ratio(r["overhead_ms"], twin["overhead_ms"])
        r["step_vs_inplace"] = None if twin is None else r["ms_median"] / twin["ms_median"]
    log(f"[{label}] {batch}x{tokens}: 2 forwards {fwd_ms:.2f} ms | reference step {ref_ms:.2f} ms "
        f"(overhead {ref_overhead:.2f}, extra memory {_fmt_mb(rows[1]['peak_extra_vs_inference_bytes'])})")
    for r in rows[2:]:
        versus = "" if r["mode"] != "exact" else \
            (f" | overhead / {inplace_twin(r['variant'])}'s {_fmt(r['overhead_vs_inplace'], '.2f')}x | perturbed "
             f"copies alive at most {_fmt_mb(r['exact_copy_peak_bytes'])} (largest weight {_fmt_mb(largest_tensor_bytes)}; "
             f"{r['exact_hooked_modules']} hooked modules, groups of at most {_fmt_mb(r['exact_group_bytes'])})")
        log(f"[{label}] {batch}x{tokens}:   {r['variant']:<10} step {r['ms_median']:.2f} ms (overhead "
            f"{r['overhead_ms']:.2f}) | step speed-up {r['speedup_step_vs_reference']:.2f}x, overhead speed-up "
            f"{_fmt(r['speedup_overhead_vs_reference'], '.2f')}x | extra memory "
            f"{_fmt_mb(r['peak_extra_vs_inference_bytes'])}{versus}")
    return rows


def bench_model(name: str, dtype_name: str, device: torch.device, configs, bandwidth: float, warmup: int,
                reps: int, backend: str, log=print, check: bool = True, rounding: str | None = None,
                variants=None, exact_group_bytes: int | None = None) -> tuple[dict, list[dict], list[dict]]:
    """Build one model in one dtype, check the kernels (every rounding and mode measured), time every
    batch configuration with the reference and each variant (default: those of ``rounding``, all four
    when it is None). Returns (summary, rows, check records); a model that does not fit is skipped."""
    variants = list(variants) if variants is not None else variants_of_rounding(rounding)
    dtype = DTYPES[dtype_name]
    shapes = opt_param_shapes(name)
    pbytes = param_bytes_of(name, dtype)
    largest = max(math.prod(s) for _, s in shapes) * torch.tensor([], dtype=dtype).element_size()
    floor_ms = 2 * pbytes / bandwidth * 1e3
    label = f"{name} {dtype_name}"
    summary = {"model": name, "dtype": dtype_name, "n_tensors": len(shapes), "numel": numel(shapes),
               "param_bytes": pbytes, "largest_tensor_bytes": largest, "floor_ms": floor_ms, "variants": variants}
    try:
        t0 = time.perf_counter()
        model = build_model(name, dtype, device, log=log)
        summary["build_s"] = time.perf_counter() - t0
    except ModelTooLarge as exc:
        summary["skipped"] = str(exc)
        log(f"[{label}] skipped: {exc}")
        return summary, [], []
    summary["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    rows, records = [], []
    opt = ref = optimizers = None
    try:
        named = trainable(model)
        if check:
            for rnd in dict.fromkeys(variant_rounding(v) for v in variants if variant_mode(v) == "inplace"):
                got = check_model_step(named, device, backend, rounding=rnd)
                records += got
                log(f"[{label}] model-step check passed (in place, rounding {rnd}): {len(got)} of the model's "
                    f"tensors, max |diff| {max(r['max_abs_diff'] for r in got):.3g}")
            for rnd in dict.fromkeys(variant_rounding(v) for v in variants if variant_mode(v) == "exact"):
                got = check_exact_step(dtype, device, backend, rounding=rnd)
                records += got
                log(f"[{label}] exact-mode check passed (rounding {rnd}, {CHECK_EXACT_MODEL} in {dtype_name} on "
                    f"{device.type}): losses within {got[0]['max_abs_diff']:.3g} of the oracle's, update max "
                    f"|diff| {got[1]['max_abs_diff']:.3g}")
        if device.type == "cuda":
            summary["weights_allocated_bytes"] = torch.cuda.memory_allocated(device)
        optimizers = {}
        ref = ReferenceStepper(model)
        summary["rounding"] = sorted({variant_rounding(v) for v in variants})
        for batch, tokens in configs:
            for r in bench_config(model, ref, batch, tokens, device, floor_ms, warmup, reps, log, label,
                                  variants=variants, backend=backend, optimizers=optimizers,
                                  exact_group_bytes=exact_group_bytes):
                r.update({"model": name, "dtype": dtype_name, "backend": backend, "n_tensors": len(named),
                          "numel": summary["numel"], "param_bytes": pbytes, "largest_tensor_bytes": largest,
                          "bandwidth_gbps": bandwidth / 1e9})
                rows.append(r)
    finally:
        # The optimizers, the closures and the exception traceback (if any) hold the parameters: drop the
        # model before the next one is built.
        model = opt = ref = named = optimizers = None  # noqa: F841
        BP.free_memory(device)
    return summary, rows, records


# ---------------------------------------------------------------------------------------------------
# OPT-66B: the largest batch that fits


def attempt(fn, device: torch.device, *args) -> dict:
    """Run fn(*args) once: {"status": "ok", "ms", "peak_bytes"} or {"status": "oom", "error"}. After an
    out-of-memory error the traceback (which holds the failed call's tensors) is dropped and the cache
    emptied before returning, so the next attempt starts clean."""
    result = {"status": "ok", "ms": None, "peak_bytes": None, "error": None}
    oom = None
    BP.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001  (only out-of-memory errors are swallowed)
        if not _is_oom(exc):
            raise
        oom = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if oom is not None:
        result.update(status="oom", error=oom)
        BP.free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        return result
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize(device)
        result["ms"] = start.elapsed_time(end)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        result["ms"] = (time.perf_counter() - t0) * 1e3
    return result


def search_max_batch(model, device: torch.device, tokens: int, batches, backend: str, log=print,
                     label: str = "", steppers=None, rounding: str | None = None) -> tuple[list[dict], dict]:
    """For batches in increasing order: a plain forward (the inference peak), then one step of each
    implementation that has not yet run out of memory. Returns (rows, {impl: largest batch or None}).

    ``steppers``: {impl: step(closure)}; default fastmezo.MeZO and the reference step on ``model``.
    Each implementation takes one untimed step at the smallest batch first (Triton compiles there).
    """
    if steppers is None:
        opt, ref = make_optimizer(model, backend, rounding), ReferenceStepper(model)
        steppers = {"fastmezo": opt.step, "reference": ref.step}
    alive = list(steppers)
    largest = {impl: None for impl in steppers}
    rows = []
    warmed = set()
    for batch in batches:
        if not alive:
            break
        ids = make_batch(model.config.vocab_size, batch, tokens, device)
        closure = make_closure(model, ids)
        loss = {}

        @torch.no_grad()
        def forward(closure=closure, loss=loss):
            loss["v"] = float(closure())

        inference = attempt(forward, device)
        base = {"batch": batch, "tokens": tokens, "inference_peak_bytes": inference["peak_bytes"]}
        if inference["status"] == "oom":
            log(f"[{label}] {batch}x{tokens}: a plain forward runs out of memory; search over")
            rows += [{**base, "impl": impl, "status": "forward oom", "error": inference["error"]} for impl in alive]
            break
        rows.append({**base, "impl": "forward", "status": "ok", "ms": inference["ms"],
                     "peak_bytes": inference["peak_bytes"], "peak_extra_vs_inference_bytes": 0, "loss": loss["v"]})
        for impl in list(alive):
            step = steppers[impl]
            if impl not in warmed:
                warm = attempt(step, device, closure)
                warmed.add(impl)
                if warm["status"] == "oom":
                    alive.remove(impl)
                    rows.append({**base, "impl": impl, "status": "oom", "error": warm["error"]})
                    log(f"[{label}] {batch}x{tokens}: {impl} out of memory")
                    continue
            res = attempt(step, device, closure)
            extra = None if res["peak_bytes"] is None or inference["peak_bytes"] is None \
                else res["peak_bytes"] - inference["peak_bytes"]
            rows.append({**base, "impl": impl, **res, "peak_extra_vs_inference_bytes": extra})
            if res["status"] == "oom":
                alive.remove(impl)
                log(f"[{label}] {batch}x{tokens}: {impl} out of memory")
            else:
                largest[impl] = batch
                log(f"[{label}] {batch}x{tokens}: {impl} step {res['ms']:.1f} ms, peak {_fmt_gb(res['peak_bytes'])}, "
                    f"above inference {_fmt_mb(extra)}")
    return rows, largest


def bench_opt66b(device: torch.device, dtype_name: str, tokens: int, max_batch: int, backend: str,
                 log=print, name: str = OPT66B, check: bool = True, rounding: str | None = None) -> dict:
    """Build OPT-66B (or ``name``) on the GPU and search the largest batch each implementation can step
    with. Returns {"summary", "rows", "largest", "checks"}; a model that does not fit is reported
    skipped."""
    dtype = DTYPES[dtype_name]
    label = f"{name} {dtype_name}"
    batches = [b for b in OPT66B_BATCHES if b <= max_batch]
    out = {"summary": {"model": name, "dtype": dtype_name, "tokens": tokens, "batches": batches,
                       "param_bytes": param_bytes_of(name, dtype)},
           "rows": [], "largest": {}, "checks": []}
    if device.type == "cuda":
        out["summary"]["gpu_free_bytes_before"] = torch.cuda.mem_get_info(device)[0]
    elif out["summary"]["param_bytes"] > (1 << 30):
        # No free-memory check on the CPU: refuse rather than try to allocate 131 GB of host memory.
        out["summary"]["skipped"] = f"{name} needs a GPU ({out['summary']['param_bytes'] / 1e9:.0f} GB of weights)"
        log(f"[{label}] skipped: {out['summary']['skipped']}")
        return out
    try:
        model = build_model(name, dtype, device, log=log)
    except ModelTooLarge as exc:
        out["summary"]["skipped"] = str(exc)
        log(f"[{label}] skipped: {exc}")
        return out
    try:
        if device.type == "cuda":
            out["summary"]["weights_allocated_bytes"] = torch.cuda.memory_allocated(device)
            out["summary"]["free_after_build_bytes"] = torch.cuda.mem_get_info(device)[0]
            log(f"[{label}] {out['summary']['free_after_build_bytes'] / 2**30:.1f} GiB free after building")
        if check:
            # A smaller sample here: the oracle's temporaries must fit next to 131 GB of weights.
            out["checks"] = check_model_step(trainable(model), device, backend, cap=1 << 20, rounding=rounding)
            log(f"[{label}] model-step check passed")
        out["rows"], out["largest"] = search_max_batch(model, device, tokens, batches, backend, log, label,
                                                       rounding=rounding)
    finally:
        model = None
        BP.free_memory(device)
    for r in out["rows"]:
        r.update({"model": name, "dtype": dtype_name, "backend": backend})
    log(f"[{label}] largest batch x {tokens} tokens: " + ", ".join(
        f"{impl} {b if b is not None else 'none'}" for impl, b in out["largest"].items()))
    return out


# ---------------------------------------------------------------------------------------------------
# Output


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _fmt_mb(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def _fmt_gb(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _write_csv(path: Path, fields, rows, meta) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: row.get(k) for k in fields}, **meta})


def output_paths(out_dir: Path, env: dict) -> dict:
    """The run's file names: steps-<UTC time>-<gpu>.{json,csv} and opt66b-<same>.csv."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = "".join(c if c.isalnum() else "-" for c in env["gpu"].lower()).strip("-")
    slug = "-".join(part for part in slug.split("-") if part)[:40]
    return {"json": out_dir / f"steps-{stamp}-{slug}.json", "csv": out_dir / f"steps-{stamp}-{slug}.csv",
            "opt66b_csv": out_dir / f"opt66b-{stamp}-{slug}.csv"}


def write_results(paths: dict, result: dict) -> None:
    """(Re)write the JSON, the step CSV and, when there are OPT-66B rows, their CSV; every CSV row
    carries the run's device, versions, commit and date."""
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    meta = {k: result["environment"][k] for k in META_FIELDS}
    _write_csv(paths["csv"], STEP_FIELDS, result["rows"], meta)
    if result.get("opt66b"):
        _write_csv(paths["opt66b_csv"], OPT66B_FIELDS, result["opt66b"]["rows"], meta)


def format_table(result: dict) -> str:
    """The step rows (and the OPT-66B search) as aligned text."""
    env = result["environment"]
    lines = [f"device {env['gpu']} | torch {env['torch']} triton {env['triton']} cuda {env['cuda']} "
             f"transformers {env['transformers']} | commit {env['commit'][:12]} | {env['date']}",
             f"copy bandwidth {result['bandwidth']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; floor = 2 * "
             "trainable parameter bytes / bandwidth; fastmezo backend " + result["settings"]["backend"]
             + ", variants " + ", ".join(result["settings"].get("variants") or ["-"])]
    for s in result["models"]:
        line = (f"  {s['model']} {s['dtype']}: {s['numel']:,} parameters, {s['param_bytes'] / 1e9:.3f} GB, "
                f"floor {s['floor_ms']:.3f} ms")
        lines.append(line + (f"  SKIPPED ({s['skipped']})" if "skipped" in s else ""))
    header = ["model", "dtype", "batch", "impl", "step ms", "overhead ms", "x floor", "step speedup",
              "overhead speedup", "ZO share", "extra MiB", "exact/inplace"]
    body = []
    for r in result["rows"]:
        body.append([r["model"], r["dtype"], f"{r['batch']}x{r['tokens']}", r.get("variant") or r["impl"],
                     _fmt(r["ms_median"], ".2f"), _fmt(r["overhead_ms"], ".2f"), _fmt(r["overhead_x_floor"], ".2f"),
                     _fmt(r["speedup_step_vs_reference"], ".2f"), _fmt(r["speedup_overhead_vs_reference"], ".2f"),
                     _fmt(None if r["zo_share"] is None else 100 * r["zo_share"], ".0f") + ("%" if r["zo_share"] is not None else ""),
                     _fmt(None if r["peak_extra_vs_inference_bytes"] is None
                          else r["peak_extra_vs_inference_bytes"] / 2**20, ".0f"),
                     _fmt(r.get("overhead_vs_inplace"), ".2f") if r.get("mode") == "exact" else ""])
    lines += ["", *_align(header, body, numeric_from=4),
              "forward = two forward passes; overhead = step - forward; x floor = overhead / one-pass floor "
              "(ideal: 3 passes fastmezo, 4 reference); extra = peak above a plain forward; exact/inplace = "
              "overhead of exact mode / overhead in place, same rounding (target <= 1.3)"]
    big = result.get("opt66b")
    if big:
        s = big["summary"]
        lines += ["", f"{s['model']} {s['dtype']}, {s['tokens']} tokens: "
                  + (f"SKIPPED ({s['skipped']})" if "skipped" in s else "largest batch "
                     + ", ".join(f"{k} {v if v is not None else 'none'}" for k, v in big["largest"].items()))]
        body = [[f"{r['batch']}x{r['tokens']}", r["impl"], r["status"], _fmt(r.get("ms"), ".1f"),
                 _fmt(None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**30, ".2f"),
                 _fmt(None if r.get("peak_extra_vs_inference_bytes") is None
                      else r["peak_extra_vs_inference_bytes"] / 2**20, ".0f")] for r in big["rows"]]
        if body:
            lines += _align(["batch", "impl", "status", "ms", "peak GiB", "extra MiB"], body, numeric_from=3)
    return "\n".join(lines)


def _align(header, body, numeric_from: int) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]

    def fmt_row(cells):
        return "  ".join(str(c).rjust(w) if i >= numeric_from else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt_row(header), fmt_row(["-" * w for w in widths])] + [fmt_row(b) for b in body]


# ---------------------------------------------------------------------------------------------------
# Main


def parse_configs(text: str) -> list[tuple[int, int]]:
    """'16x256,4x256' -> [(16, 256), (4, 256)]."""
    configs = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        b, _, t = part.partition("x")
        if not (b.isdigit() and t.isdigit() and int(b) > 0 and int(t) > 0):
            raise ValueError(f"bad batch configuration {part!r}: expected BATCHxTOKENS, e.g. 16x256")
        configs.append((int(b), int(t)))
    return configs


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The options bench_steps.py and run_all.py share (run_all adds --models/--dtypes/--quick/--smoke)."""
    parser.add_argument("--configs", default=None,
                        help="batch x tokens, comma-separated (default 16x256,4x256,1x128; --quick 4x256,1x128; "
                             "--smoke 2x16,1x8)")
    parser.add_argument("--step-warmup", "--warmup", dest="step_warmup", type=int, default=None,
                        help="untimed steps per measurement (default 2; 1 with --smoke)")
    parser.add_argument("--step-reps", "--reps", dest="step_reps", type=int, default=None,
                        help="timed steps per measurement, median reported (default 5; 3 with --quick, 2 with --smoke)")
    parser.add_argument("--backend", default=None, choices=("triton", "native", "reference"),
                        help="fastmezo backend (default: automatic, triton on CUDA; the choice is recorded)")
    parser.add_argument("--variants", default=None,
                        help="fastmezo variants timed next to the reference, comma-separated: inplace-rn, "
                             "inplace-sr, exact-rn, exact-sr (in place or exact mode; float16/bfloat16 stores "
                             "rounded to nearest or stochastically), or 'all' (default: all four)")
    parser.add_argument("--exact-group-bytes", type=int, default=None,
                        help="exact mode's group budget (fastmezo.patch(group_bytes=...)): the most bytes of "
                             "perturbed copies one hooked module makes; 0 = one hooked module per module owning "
                             "a trained parameter (default: fastmezo's, the largest trained tensor, >= 16 MiB)")
    parser.add_argument("--rounding", default=None, choices=("stochastic", "nearest"),
                        help="shortcut for the variants of one rounding: nearest = inplace-rn,exact-rn, "
                             "stochastic = inplace-sr,exact-sr; also the rounding of the --opt66b search "
                             "(default there: MeZO's own, stochastic). The reference always rounds to nearest")
    parser.add_argument("--opt66b", action="store_true",
                        help="also search the largest batch OPT-66B (fp16, one GPU) takes a step with, for "
                             "fastmezo and the reference (a few minutes)")
    parser.add_argument("--opt66b-tokens", type=int, default=256, help="tokens per sequence in the search (default 256)")
    parser.add_argument("--opt66b-max-batch", type=int, default=128, help="largest batch tried (default 128)")
    parser.add_argument("--opt66b-dtype", default="float16", choices=tuple(DTYPES), help="default float16")


def finish_args(args, parser) -> argparse.Namespace:
    """Defaults that depend on --quick / --smoke, and validation."""
    try:
        args.configs = parse_configs(args.configs) if args.configs else list(
            SMOKE_CONFIGS if args.smoke else QUICK_CONFIGS if args.quick else STEP_CONFIGS)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        variants = parse_variants(args.variants) if args.variants else None
    except ValueError as exc:
        parser.error(str(exc))
    if variants is not None and args.rounding is not None:
        wrong = [v for v in variants if variant_rounding(v) != args.rounding]
        if wrong:
            parser.error(f"--rounding {args.rounding} contradicts --variants {','.join(variants)} ({wrong[0]}); "
                         "give --variants alone")
    args.variants = variants if variants is not None else variants_of_rounding(args.rounding)
    if args.step_warmup is None:
        args.step_warmup = 1 if args.smoke else 2
    if args.step_reps is None:
        args.step_reps = 2 if args.smoke else 3 if args.quick else 5
    if args.step_warmup < 0 or args.step_reps < 1:
        parser.error("--warmup must be >= 0 and --reps >= 1")
    if args.exact_group_bytes is not None and args.exact_group_bytes < 0:
        parser.error("--exact-group-bytes must be >= 0")
    if args.opt66b_tokens < 1 or args.opt66b_max_batch < 1:
        parser.error("--opt66b-tokens and --opt66b-max-batch must be >= 1")
    return args


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help="comma-separated: opt-125m, opt-1.3b, opt-13b, opt-66b, opt-tiny, or 'none' "
                             "(default opt-1.3b,opt-13b; --quick opt-1.3b; --smoke opt-tiny)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated: float16, bfloat16, float32 (default float16; float32 with "
                             "--smoke on the CPU)")
    parser.add_argument("--out", default=None,
                        help="output directory (default bench/results/; a temporary directory with --smoke)")
    parser.add_argument("--quick", action="store_true", help="opt-1.3b, 2 batch configurations, 3 timed steps")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny OPT, tiny batches: checks that the script runs (on the CPU without a GPU)")
    add_step_arguments(parser)
    args = parser.parse_args(argv)
    args.models = parse_models(args.models, args.smoke, args.quick, parser)
    args.dtypes = parse_dtypes(args.dtypes, args.smoke, parser)
    return finish_args(args, parser)


def parse_models(text, smoke: bool, quick: bool, parser) -> list[str]:
    if text is None:
        text = "opt-tiny" if smoke else "opt-1.3b" if quick else ",".join(DEFAULT_MODELS)
    models = [m.strip() for m in text.split(",") if m.strip() and m.strip().lower() != "none"]
    for m in models:
        try:
            opt_param_shapes(m)
        except ValueError as exc:
            parser.error(str(exc))
    return models


def parse_dtypes(text, smoke: bool, parser) -> list[str]:
    if text is None:
        text = "float32" if (smoke and not torch.cuda.is_available()) else "float16"
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"unknown dtype {d!r}; expected one of {', '.join(DTYPES)}")
    return dtypes


@contextlib.contextmanager
def cpu_threads(device: torch.device, smoke: bool):
    """One intra-op thread for smoke runs on the CPU, restored afterwards: on tiny tensors threads only
    add overhead, and fastmezo's native OpenMP passes slow down by orders of magnitude when a busy
    2-core machine is oversubscribed."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and smoke:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(args, device: torch.device, env: dict, out_dir: Path, bandwidth: dict | None = None, log=print) -> dict:
    """The step benchmark with parsed arguments (shared by main and run_all). ``bandwidth``: a copy
    bandwidth record measured earlier in the same run (bench_perturb.copy_bandwidth), else measured here."""
    with cpu_threads(device, args.smoke):
        return _run(args, device, env, out_dir, bandwidth, log)


def _run(args, device, env, out_dir, bandwidth, log) -> dict:
    backend = resolve_backend(device, args.backend)
    log(f"fastmezo step benchmark on {env['gpu']} ({device}); torch {env['torch']}, triton {env['triton']}, "
        f"cuda {env['cuda']}, transformers {env['transformers']}, commit {env['commit'][:12]}; fastmezo backend {backend}")

    if bandwidth is None:
        copy_bytes = (32 << 20) if device.type == "cpu" else (1 << 30)
        bandwidth = BP.copy_bandwidth(device, copy_bytes, warmup=3, reps=5 if args.smoke else 50)
    bw = bandwidth["bandwidth_bytes_per_s"]
    log(f"copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)")

    all_dtypes = sorted(set(args.dtypes) | ({args.opt66b_dtype} if args.opt66b else set()))
    checks = BP.check_kernels(device, [DTYPES[d] for d in all_dtypes], (1 << 16) if args.smoke else (1 << 20),
                              backend)
    log(f"kernel check passed ({backend}): {len(checks)} comparisons with the torch oracle")

    result = {
        "benchmark": "steps",
        "environment": env,
        "settings": {"smoke": args.smoke, "quick": args.quick, "models": args.models, "dtypes": args.dtypes,
                     "configs": [f"{b}x{t}" for b, t in args.configs], "warmup": args.step_warmup,
                     "reps": args.step_reps, "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
                     "backend": backend, "variants": list(args.variants),
                     "rounding": args.rounding or "per variant", "eps": EPS, "lr": LR, "weight_decay": WEIGHT_DECAY, "init_std": INIT_STD,
                     "fastmezo_seed": FAST_SEED, "reference_seed": REF_SEED, "opt66b": args.opt66b,
                     "exact_group_bytes": args.exact_group_bytes},
        "bandwidth": bandwidth,
        "checks": checks,
        "models": [],
        "rows": [],
    }
    paths = output_paths(out_dir, env)
    for name in args.models:
        for dtype_name in args.dtypes:
            summary, rows, records = bench_model(name, dtype_name, device, args.configs, bw, args.step_warmup,
                                                 args.step_reps, backend, log, variants=args.variants,
                                                 exact_group_bytes=args.exact_group_bytes)
            result["models"].append(summary)
            result["checks"] += records
            meta = {k: env[k] for k in META_FIELDS}
            result["rows"] += [{**r, **meta} for r in rows]
            write_results(paths, result)  # after every model: a run cut short keeps what it measured
    if args.opt66b:
        big = bench_opt66b(device, args.opt66b_dtype, args.opt66b_tokens, args.opt66b_max_batch, backend, log,
                           rounding=args.rounding)
        result["checks"] += big.pop("checks")
        result["opt66b"] = big
    write_results(paths, result)
    result["files"] = {k: str(v) for k, v in paths.items() if k != "opt66b_csv" or result.get("opt66b")}
    log(f"wrote {paths['json']}\nwrote {paths['csv']}" + (f"\nwrote {paths['opt66b_csv']}" if args.opt66b else "") + "\n")
    log(format_table(result))
    return result


def prepare_allocator(opt66b: bool) -> None:
    """For the OPT-66B search, ask the CUDA caching allocator for expandable segments (less fragmentation
    when 131 GB of weights leave a few GB), unless the user set PYTORCH_CUDA_ALLOC_CONF. Must run before
    the first CUDA allocation; recorded in the environment."""
    if opt66b and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def main(argv=None) -> dict:
    """Run the step benchmark; returns the result dict (also written to --out)."""
    args = parse_args(argv)
    prepare_allocator(args.opt66b)
    device = select_device(args.smoke)
    env = environment(device)
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="fastmezo-steps-smoke-")) if args.smoke else HERE / "results")
    return run(args, device, env, out_dir, log=lambda *a: print(*a, flush=True))


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
