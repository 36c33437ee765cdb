"""The largest batch OPT-66B (fp16, one GPU: 131.4 GB of weights) takes a MeZO step with, for fastmezo in
place and for the baseline: batches 1, 2, 4, ... until each runs out of memory.

Every batch runs a plain forward first (the inference peak), then one step of each implementation still
in the race; an out-of-memory error ends that implementation's search (its cache is emptied and the
others go on). An out-of-memory in the middle of a baseline step leaves the random weights perturbed
(the baseline undoes nothing), which changes neither speed nor memory.
"""
from __future__ import annotations

import os
import time

import torch

from bench.common import DTYPES, free_memory, synchronize
from bench.models import ModelTooLarge, build_model, make_batch, make_closure, param_bytes_of
from bench.step_variants import BaselineStepper, make_optimizer

OPT66B = "opt-66b"
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FIELDS = ["model", "dtype", "batch", "tokens", "impl", "status", "ms", "peak_bytes",
          "peak_extra_vs_inference_bytes", "inference_peak_bytes", "loss", "error", "backend"]


def prepare_allocator(opt66b: bool) -> None:
    """For the search, ask the CUDA caching allocator for expandable segments (less fragmentation when
    131 GB of weights leave a few GB), unless the user set PYTORCH_CUDA_ALLOC_CONF. Must run before the
    first CUDA allocation; the environment record keeps the setting."""
    if opt66b and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error: torch's own, or one raised as a RuntimeError by CUDA or cuBLAS."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def attempt(fn, device: torch.device, *args) -> dict:
    """Run fn(*args) once: {"status": "ok", "ms", "peak_bytes"} or {"status": "oom", "error"}. After an
    out-of-memory error the traceback (which holds the failed call's tensors) is dropped and the cache
    emptied before returning, so the next attempt starts clean."""
    result = {"status": "ok", "ms": None, "peak_bytes": None, "error": None}
    oom = None
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001  (only out-of-memory errors are swallowed)
        if not is_oom(exc):
            raise
        oom = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if oom is not None:
        result.update(status="oom", error=oom)
        free_memory(device)
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


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def search_max_batch(model, device: torch.device, tokens: int, batches, backend: str, log=print,
                     label: str = "", steppers=None, rounding: str | None = None) -> tuple[list[dict], dict]:
    """For batches in increasing order: a plain forward (the inference peak), then one step of each
    implementation that has not yet run out of memory. Returns (rows, {impl: largest batch or None}).

    ``steppers``: {impl: step(closure)}; default fastmezo.MeZO and the baseline step on ``model``.
    Each implementation takes one untimed step at the smallest batch first (Triton compiles there).
    """
    if steppers is None:
        opt, ref = make_optimizer(model, backend, rounding), BaselineStepper(model)
        steppers = {"fastmezo": opt.step, "reference": ref.step}
    alive = list(steppers)
    largest = {impl: None for impl in steppers}
    rows = []
    warmed = set()
    for batch in batches:
        if not alive:
            break
        closure = make_closure(model, make_batch(model.config.vocab_size, batch, tokens, device))
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
                log(f"[{label}] {batch}x{tokens}: {impl} step {res['ms']:.1f} ms, peak {_gib(res['peak_bytes'])}, "
                    f"above inference {'n/a' if extra is None else f'{extra / 2**20:.0f} MiB'}")
    return rows, largest


def bench_opt66b(device: torch.device, dtype_name: str, tokens: int, max_batch: int, backend: str,
                 log=print, name: str = OPT66B, rounding: str | None = None) -> dict:
    """Build OPT-66B (or ``name``) on the GPU and search the largest batch each implementation can step
    with. Returns {"summary", "rows", "largest"}; a model that does not fit is reported skipped."""
    dtype = DTYPES[dtype_name]
    label = f"{name} {dtype_name}"
    batches = [b for b in BATCHES if b <= max_batch]
    out = {"summary": {"model": name, "dtype": dtype_name, "tokens": tokens, "batches": batches,
                       "param_bytes": param_bytes_of(name, dtype)},
           "rows": [], "largest": {}}
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
        out["rows"], out["largest"] = search_max_batch(model, device, tokens, batches, backend, log, label,
                                                       rounding=rounding)
    finally:
        model = None
        free_memory(device)
    for r in out["rows"]:
        r.update({"model": name, "dtype": dtype_name, "backend": backend})
    log(f"[{label}] largest batch x {tokens} tokens: " + ", ".join(
        f"{impl} {b if b is not None else 'none'}" for impl, b in out["largest"].items()))
    return out
