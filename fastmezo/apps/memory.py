"""Peak memory of one phase of a run (a method's training), on CUDA or on a CPU.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the start of the
phase: the peak of memory held by tensors (weights included), the measure of the MeZO paper.

CPU (Linux): the peak resident set size of the process during the phase. At the start the kernel's
high-water mark is reset to the current RSS (``echo 5 > /proc/self/clear_refs``), at the end it is
read back (``VmHWM`` in /proc/self/status). This counts everything resident: the Python runtime,
torch, the model, and what the phase adds (activations, gradients, optimizer state); so the
fine-tuning job runs each method in a fresh process (see :mod:`fastmezo.apps.isolation`) where
nothing of another method is left in the allocator's caches. ``extra`` (peak minus the memory at
the start of the phase) is what training adds on top of the loaded model. Where the high-water mark
cannot be reset (not Linux, or /proc not writable) the peak is ``ru_maxrss`` (a peak since the
process started), and ``kind`` says so.
"""
from __future__ import annotations

import resource
import sys

import torch

_MIB = 2.0 ** 20


def _proc_status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _MIB if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as m: ...``; then ``m.peak_mib``, ``m.extra_mib``
    (peak minus the memory in use at entry) and ``m.kind`` (what was measured, in words)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mib = self.start_mib = self.extra_mib = None
        self.kind = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = torch.cuda.memory_allocated(self.device) / _MIB
            self.kind = "CUDA max_memory_allocated"
        elif _reset_high_water_mark() and _proc_status_kib("VmHWM") is not None:
            self.start_mib = _proc_status_kib("VmRSS") / 1024
            self.kind = "peak RSS of the method's process (VmHWM)"
        else:
            self.start_mib = _maxrss_mib()
            self.kind = "max RSS since the process started (ru_maxrss)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / _MIB
        elif self.kind.startswith("peak RSS"):
            self.peak_mib = _proc_status_kib("VmHWM") / 1024
        else:
            self.peak_mib = _maxrss_mib()
        self.extra_mib = max(self.peak_mib - self.start_mib, 0.0)
        return False
