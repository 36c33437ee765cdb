"""What several benchmarks repeat: the device, the provenance record, timing, memory, output files and
command-line parsing.

Every benchmark writes the same provenance (``environment``): the device and GPU name, torch / triton /
CUDA / transformers versions, the git commit (``FASTMEZO_COMMIT`` first: a working tree copied to a GPU
machine can carry a stale ``.git`` whose HEAD is not what runs) and whether the tree was dirty.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# The seeds of the timed passes and steps. They do not change the speed.
FASTMEZO_SEED = 0x5EED_1234_ABCD_0042   # uint64, both words non-zero
BASELINE_SEED = 1234                    # the baseline's torch.manual_seed

#: Provenance columns copied onto every CSV row.
META_FIELDS = ("device", "gpu", "torch", "triton", "cuda", "commit", "date")


class CheckFailed(RuntimeError):
    """The fast kernels disagree with the torch oracle: the timings would be meaningless."""


# ---------------------------------------------------------------------------------------------------
# Device and provenance


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")


def select_device(smoke: bool, script: str) -> torch.device:
    """The CUDA device; without one, the CPU for --smoke runs only, with Triton's interpreter switched
    on (it must be on before triton is imported, so the Triton kernels can run on CPU tensors)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if not smoke:
        raise SystemExit(f"no CUDA device: this benchmark needs a GPU (use --smoke to test {script} on the CPU)")
    if not triton_interpreted():
        if "triton" in sys.modules:
            raise SystemExit(f"no CUDA device, and triton was imported before TRITON_INTERPRET=1 could be "
                             f"set: run as TRITON_INTERPRET=1 python -m {script} --smoke")
        os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu")


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> tuple[str, bool | None]:
    """(commit, dirty): FASTMEZO_COMMIT when set (dirty then unknown), else git's HEAD."""
    given = os.environ.get("FASTMEZO_COMMIT")
    if given:
        return given, None
    head = git("rev-parse", "HEAD")
    if head is None:
        return "unknown", None
    status = git("status", "--porcelain", "--untracked-files=no")
    return head, None if status is None else bool(status)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What ran: device, library versions, commit, date, and the CUDA allocator setting (it changes
    what fits)."""
    import fastmezo

    versions = {}
    for module in ("triton", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001  (recorded, not fatal: a check fails later if it matters)
            versions[module] = f"unavailable ({type(exc).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = props.name
        extra = {"gpu_memory_bytes": props.total_memory, "compute_capability": f"{props.major}.{props.minor}",
                 "multiprocessors": props.multi_processor_count}
    else:
        gpu = f"cpu ({cpu_name()}, {os.cpu_count()} cores)"
        extra = {"torch_num_threads": torch.get_num_threads()}
    sha, dirty = commit()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": gpu,
        **extra,
        "torch": torch.__version__,
        "triton": versions["triton"],
        "transformers": versions["transformers"],
        "cuda": torch.version.cuda or "none",
        "fastmezo": getattr(fastmezo, "__version__", "unknown"),
        "noise_version": getattr(fastmezo, "NOISE_VERSION", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": sha,
        "dirty": dirty,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    }


def fastmezo_backend(device: torch.device, backend: str | None = None) -> str:
    """The name of the fastmezo backend that runs tensors on ``device``: the automatic choice, or
    ``backend`` if it can run there (fastmezo raises, with the reason, if it cannot)."""
    from fastmezo import backends

    chosen = backends.select(device, backend)
    return getattr(chosen, "NAME", chosen)


def backend_runs(name: str, device: torch.device) -> bool:
    try:
        fastmezo_backend(device, name)
    except Exception:  # noqa: BLE001  (unavailable, or unknown to this fastmezo: either way, not usable)
        return False
    return True


@contextlib.contextmanager
def cpu_threads(device: torch.device, smoke: bool):
    """One intra-op thread for smoke runs on the CPU, restored afterwards: on tiny tensors threads only
    add overhead, and OpenMP passes slow down by orders of magnitude on an oversubscribed machine."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and smoke:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# Timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn, device):
    """fn followed by a synchronize of ``device``, so wall-clock timers (pytest-benchmark) see the GPU
    work."""
    device = torch.device(device)

    def call():
        fn()
        synchronize(device)
    return call


def time_ms(fn, device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls of fn after ``warmup`` untimed calls.

    On CUDA each call is bracketed by CUDA events, so a call's time is the span between its first and
    its last GPU work, including any gaps where the GPU waited for the host (launch overhead). On the
    CPU, wall-clock time.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def host_ms(fn, device: torch.device, reps: int = 20) -> float:
    """Median host time of one call (synchronized between calls, not inside): what launching costs the
    Python thread."""
    synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        synchronize(device)
    return statistics.median(times)


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak memory one call of fn allocates above what is allocated before it (CUDA only, else None)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, reps: int) -> dict:
    """Device copy bandwidth: one tensor of nbytes copied into another, (read + written bytes) / time.
    The one-pass floor of a benchmark is 2 * parameter bytes / this bandwidth."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = time_ms(lambda: dst.copy_(src), device, warmup, reps)
    del src, dst
    free_memory(device)
    ms = statistics.median(times)
    moved = 2 * (nbytes // 4) * 4
    return {"copy_bytes": nbytes // 4 * 4, "bytes_moved": moved, "ms_median": ms, "ms_min": min(times),
            "reps": reps, "bandwidth_bytes_per_s": moved / (ms * 1e-3)}


def default_copy_bandwidth(device: torch.device, smoke: bool) -> dict:
    """copy_bandwidth with the benchmarks' sizes: 1 GiB on a GPU, 32 MiB on the CPU."""
    nbytes = (32 << 20) if device.type == "cpu" else (1 << 30)
    return copy_bandwidth(device, nbytes, warmup=3, reps=5 if smoke else 50)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of x's dtype at each value of x, as float32."""
    mantissa_bits = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[x.dtype]
    xf = x.float().abs()
    exponent = torch.floor(torch.log2(torch.clamp(xf, min=torch.finfo(x.dtype).tiny)))
    return torch.pow(2.0, exponent - mantissa_bits)


# ---------------------------------------------------------------------------------------------------
# Output


def run_stem(prefix: str, env: dict) -> str:
    """'<prefix>-<UTC time>-<gpu slug>': the file name stem of one run's outputs."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = "".join(c if c.isalnum() else "-" for c in env["gpu"].lower()).strip("-")
    slug = "-".join(part for part in slug.split("-") if part)[:40]
    return f"{prefix}-{stamp}-{slug}"


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: Path, fields, rows, meta: dict | None = None) -> None:
    """One row per dict (only ``fields``), with the run's provenance ``meta`` on every row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: row.get(k) for k in fields}, **(meta or {})})


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def fmt_mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def align(header, body, numeric_from: int) -> list[str]:
    """Rows of text columns, left-aligned before ``numeric_from``, right-aligned from there."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]

    def fmt_row(cells):
        return "  ".join(str(c).rjust(w) if i >= numeric_from else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt_row(header), fmt_row(["-" * w for w in widths])] + [fmt_row(b) for b in body]


# ---------------------------------------------------------------------------------------------------
# Command line


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_models(text: str, parser) -> list[str]:
    """'opt-1.3b,opt-13b' -> names checked against bench/shapes.py; 'none' is the empty list."""
    from bench.shapes import opt_param_shapes

    models = [m for m in split_list(text) if m.lower() != "none"]
    for m in models:
        try:
            opt_param_shapes(m)
        except ValueError as exc:
            parser.error(str(exc))
    return models


def parse_dtypes(text: str, parser) -> list[str]:
    dtypes = split_list(text)
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"unknown dtype {d!r}; expected one of {', '.join(DTYPES)}")
    return dtypes


def main_exit(main) -> None:
    """Run a benchmark's main; a failed kernel check exits with code 1 and the reason."""
    try:
        code = main()
    except CheckFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
