#!/usr/bin/env python
"""Benchmark of WHOLE MeZO steps on OPT models: fastmezo.MeZO against the reference way, with the two
forward passes included.

    python bench/bench_steps.py [--models opt-1.3b,opt-13b] [--dtypes float16] [--configs 16x256,4x256,1x128]
                                [--warmup N] [--reps N] [--out DIR] [--quick] [--smoke]
                                [--opt66b [--opt66b-tokens 256] [--opt66b-max-batch 128]]

For each model and dtype, one process builds a randomly initialised ``OPTForCausalLM`` from its
``OPTConfig`` (the published OPT sizes, bench/shapes.py; no download) directly on the GPU in the target
dtype: constructed with transformers' weight initialisation switched off (no CPU copy, no slow
``_init_weights``), then filled in place (N(0, 0.02) matrices, zero biases, unit layer-norm weights).
The same model instance then serves both optimizers. Per batch configuration (batch x tokens, random
token ids, labels = input ids, the causal-LM loss):

1. before any timing: the kernels agree with the torch oracle (``fastmezo.reference``): the pass
   benchmark's check (``bench_perturb.check_kernels``: z at two offsets, perturb_ in the dtype), and one
   ``fastmezo.MeZO`` step over copies of a sample of the model's own tensors against the oracle's three
   passes (within 3 units in the last place). A disagreement aborts the run (exit code 1);
2. ``forward``: two forward passes (no_grad, loss as a Python float after each, as the step does): the
   part of a step that is not zeroth-order work;
3. ``reference``: ``reference_mezo.reference_step``: 3 out-of-place perturbation passes with
   ``torch.manual_seed`` + ``torch.normal`` per tensor, 2 forwards, 1 update pass (the paper's trainer);
4. ``fastmezo``: ``fastmezo.MeZO.step``: 3 fused in-place passes with in-kernel Philox noise, 2 forwards.

Reported per configuration: median step time over ``--reps`` steps after ``--warmup`` (CUDA events;
the time between a call's first and last GPU work), the ZO overhead = step - two forwards, the speed-ups
reference / fastmezo of the step and of the overhead, the overhead over the one-pass floor (floor = 2 *
trainable parameter bytes / copy bandwidth measured in this run, as bench_perturb.py does: fastmezo makes
3 passes a step, the reference 4, so 3.0 and 4.0 are their ideals), and the peak memory above inference:
``max_memory_allocated`` during the steps minus that during the plain forwards of the same batch
(peak statistics reset in between). On the CPU there are no memory statistics: reported as n/a.

--opt66b: OPT-66B in fp16 on one GPU (131.4 GB of weights): how large a batch (1, 2, 4, ... up to
--opt66b-max-batch, --opt66b-tokens tokens) each implementation can take a step with. Every batch runs a
plain forward (the inference peak), then one step of each implementation still in the race; a
``torch.OutOfMemoryError`` ends that implementation's search (its cache is emptied and the others go
on). An out-of-memory in the middle of a reference step leaves the (random) weights perturbed: the
reference does not undo anything; it does not matter for speed or memory. Takes a few minutes.

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

# The --opt66b search.
OPT66B = "opt-66b"
OPT66B_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

STEP_FIELDS = ["model", "dtype", "batch", "tokens", "impl", "rounding", "ms_median", "ms_min", "ms_max", "reps",
               "forward2_ms", "overhead_ms", "passes", "floor_ms", "overhead_x_floor",
               "speedup_step_vs_reference", "speedup_overhead_vs_reference", "zo_share",
               "peak_bytes", "peak_extra_vs_inference_bytes", "loss", "backend", "n_tensors", "numel",
               "param_bytes", "bandwidth_gbps", "device", "gpu", "torch", "triton", "cuda", "commit", "date"]
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
        records.append({"what": "MeZO.step", "tensor": name, "dtype": str(x.dtype).split(".")[-1],
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


def bench_config(model, opt, ref, batch: int, tokens: int, device: torch.device, floor_ms: float,
                 warmup: int, reps: int, log=print, label: str = "") -> list[dict]:
    """Time two forwards, the reference step and the fastmezo step at one batch size. Three rows."""
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

    skipped_before = opt.skipped_steps
    fwd_times, fwd_peak = timed(forwards, device, warmup, reps)
    ref_times, ref_peak = timed(lambda: ref.step(closure), device, warmup, reps)
    fast_times, fast_peak = timed(lambda: opt.step(closure), device, warmup, reps)
    if opt.skipped_steps != skipped_before:
        raise RuntimeError(f"{label} {batch}x{tokens}: fastmezo skipped {opt.skipped_steps - skipped_before} "
                           "steps (non-finite loss): its times would lack the update pass")
    for what, value in (("reference loss", ref.last_loss), ("reference projected gradient", ref.last_projected_grad),
                        ("fastmezo loss", opt.loss_plus), ("fastmezo projected gradient", opt.projected_grad)):
        if value is None or not math.isfinite(value):
            raise RuntimeError(f"{label} {batch}x{tokens}: {what} is {value}")

    fwd_ms = statistics.median(fwd_times)
    ref_ms, fast_ms = statistics.median(ref_times), statistics.median(fast_times)
    rows = [{"impl": "forward", "passes": 0, "times": fwd_times, "ms_median": fwd_ms, "peak_bytes": fwd_peak,
             "loss": loss0},
            {"impl": "reference", "passes": 4, "times": ref_times, "ms_median": ref_ms, "peak_bytes": ref_peak,
             "loss": ref.last_loss},
            {"impl": "fastmezo", "passes": 3, "times": fast_times, "ms_median": fast_ms, "peak_bytes": fast_peak,
             "loss": opt.loss_plus}]
    ref_overhead = ref_ms - fwd_ms
    for r in rows:
        times = r.pop("times")
        overhead = None if r["impl"] == "forward" else r["ms_median"] - fwd_ms
        r.update({"batch": batch, "tokens": tokens, "ms_min": min(times), "ms_max": max(times), "reps": len(times),
                  "forward2_ms": fwd_ms, "overhead_ms": overhead, "floor_ms": floor_ms,
                  "overhead_x_floor": None if overhead is None else overhead / floor_ms,
                  "speedup_step_vs_reference": None if overhead is None else ref_ms / r["ms_median"],
                  "speedup_overhead_vs_reference": None if overhead is None else _ratio(ref_overhead, overhead),
                  "zo_share": None if overhead is None else overhead / r["ms_median"],
                  "peak_extra_vs_inference_bytes": None if r["peak_bytes"] is None or fwd_peak is None
                  else r["peak_bytes"] - fwd_peak})
    fast = rows[2]
    log(f"[{label}] {batch}x{tokens}: 2 forwards {fwd_ms:.2f} ms | reference step {ref_ms:.2f} ms "
        f"(overhead {ref_overhead:.2f}) | fastmezo step {fast_ms:.2f} ms (overhead {fast['overhead_ms']:.2f}) "
        f"| step speed-up {fast['speedup_step_vs_reference']:.2f}x, overhead speed-up "
        f"{_fmt(fast['speedup_overhead_vs_reference'], '.2f')}x | extra memory reference "
        f"{_fmt_mb(rows[1]['peak_extra_vs_inference_bytes'])}, fastmezo {_fmt_mb(fast['peak_extra_vs_inference_bytes'])}")
    return rows


def bench_model(name: str, dtype_name: str, device: torch.device, configs, bandwidth: float, warmup: int,
                reps: int, backend: str, log=print, check: bool = True,
                rounding: str | None = None) -> tuple[dict, list[dict], list[dict]]:
    """Build one model in one dtype, check the kernels on its tensors, time every batch configuration.
    Returns (summary, rows, check records); a model that does not fit is reported as skipped."""
    dtype = DTYPES[dtype_name]
    shapes = opt_param_shapes(name)
    pbytes = param_bytes_of(name, dtype)
    floor_ms = 2 * pbytes / bandwidth * 1e3
    label = f"{name} {dtype_name}"
    summary = {"model": name, "dtype": dtype_name, "n_tensors": len(shapes), "numel": numel(shapes),
               "param_bytes": pbytes, "floor_ms": floor_ms}
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
    try:
        named = trainable(model)
        if check:
            records = check_model_step(named, device, backend, rounding=rounding)
            log(f"[{label}] model-step check passed: {len(records)} of the model's tensors, "
                f"max |diff| {max(r['max_abs_diff'] for r in records):.3g}")
        if device.type == "cuda":
            summary["weights_allocated_bytes"] = torch.cuda.memory_allocated(device)
        opt = make_optimizer(model, backend, rounding)
        ref = ReferenceStepper(model)
        summary["rounding"] = rounding_of(opt)
        for batch, tokens in configs:
            for r in bench_config(model, opt, ref, batch, tokens, device, floor_ms, warmup, reps, log, label):
                r.update({"model": name, "dtype": dtype_name, "backend": backend, "n_tensors": len(named),
                          "rounding": rounding_of(opt) if r["impl"] == "fastmezo" else "nearest",
                          "numel": summary["numel"], "param_bytes": pbytes, "bandwidth_gbps": bandwidth / 1e9})
                rows.append(r)
    finally:
        # The optimizer, the closures and the exception traceback (if any) hold the parameters: drop the
        # model before the next one is built.
        model = opt = ref = named = None  # noqa: F841
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
             + ", rounding " + ", ".join(sorted({r["rounding"] for r in result["rows"] if r["impl"] == "fastmezo"}) or ["-"])]
    for s in result["models"]:
        line = (f"  {s['model']} {s['dtype']}: {s['numel']:,} parameters, {s['param_bytes'] / 1e9:.3f} GB, "
                f"floor {s['floor_ms']:.3f} ms")
        lines.append(line + (f"  SKIPPED ({s['skipped']})" if "skipped" in s else ""))
    header = ["model", "dtype", "batch", "impl", "step ms", "overhead ms", "x floor", "step speedup",
              "overhead speedup", "ZO share", "extra MiB"]
    body = []
    for r in result["rows"]:
        body.append([r["model"], r["dtype"], f"{r['batch']}x{r['tokens']}", r["impl"],
                     _fmt(r["ms_median"], ".2f"), _fmt(r["overhead_ms"], ".2f"), _fmt(r["overhead_x_floor"], ".2f"),
                     _fmt(r["speedup_step_vs_reference"], ".2f"), _fmt(r["speedup_overhead_vs_reference"], ".2f"),
                     _fmt(None if r["zo_share"] is None else 100 * r["zo_share"], ".0f") + ("%" if r["zo_share"] is not None else ""),
                     _fmt(None if r["peak_extra_vs_inference_bytes"] is None
                          else r["peak_extra_vs_inference_bytes"] / 2**20, ".0f")])
    lines += ["", *_align(header, body, numeric_from=4),
              "forward = two forward passes; overhead = step - forward; x floor = overhead / one-pass floor "
              "(ideal: 3 passes fastmezo, 4 reference); extra = peak above a plain forward"]
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
    parser.add_argument("--rounding", default=None, choices=("stochastic", "nearest"),
                        help="how fastmezo.MeZO rounds float16/bfloat16 stores (default: MeZO's own default, "
                             "stochastic; the reference always rounds to nearest)")
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
    if args.step_warmup is None:
        args.step_warmup = 1 if args.smoke else 2
    if args.step_reps is None:
        args.step_reps = 2 if args.smoke else 3 if args.quick else 5
    if args.step_warmup < 0 or args.step_reps < 1:
        parser.error("--warmup must be >= 0 and --reps >= 1")
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
                     "backend": backend, "rounding": args.rounding or "MeZO default", "eps": EPS, "lr": LR, "weight_decay": WEIGHT_DECAY, "init_std": INIT_STD,
                     "fastmezo_seed": FAST_SEED, "reference_seed": REF_SEED, "opt66b": args.opt66b},
        "bandwidth": bandwidth,
        "checks": checks,
        "models": [],
        "rows": [],
    }
    paths = output_paths(out_dir, env)
    for name in args.models:
        for dtype_name in args.dtypes:
            summary, rows, records = bench_model(name, dtype_name, device, args.configs, bw, args.step_warmup,
                                                 args.step_reps, backend, log, rounding=args.rounding)
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
