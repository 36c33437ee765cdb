"""Run one function in a fresh forked process and get its (picklable) result back.

Why: the fine-tuning job measures each method's peak memory on a CPU as the peak RSS of a process.
In one long process, memory freed by an earlier method stays in the allocator's caches and hides (or
inflates) the next method's. A forked child starts from the parent, which has only imported modules
and built the data set (no model, no torch computation, no tokenizer threads), so every method
starts from the same state. Fork costs milliseconds, where a spawned interpreter would pay the
imports of torch and transformers (seconds) once per method.

Forking is used only where it is safe and available: on Linux, and never once CUDA is in use (a
CUDA context does not survive fork); elsewhere the function runs in this process.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import traceback

import torch


def can_fork(device) -> bool:
    """Whether methods on ``device`` can run in forked children here."""
    return (sys.platform.startswith("linux") and torch.device(device).type == "cpu"
            and not torch.cuda.is_initialized())


def _thread_count() -> int:
    """Threads of this process (Linux); 1 where it cannot be read."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _child(conn, fn, args, kwargs, single_thread):
    if single_thread:
        # The parent had started threads (e.g. an OpenMP pool, inside a long test session): GNU
        # OpenMP is not fork-safe, and the child's first parallel region waits forever for pool
        # threads that were not forked. One thread never enters a parallel region.
        torch.set_num_threads(1)
    try:
        result = fn(*args, **kwargs)
        conn.send(("ok", result))
    except BaseException as exc:  # report everything, KeyboardInterrupt included, then exit
        text = traceback.format_exc()
        try:
            pickle.dumps(exc)
            conn.send(("error", exc, text))
        except Exception:
            conn.send(("error", None, text))
    finally:
        conn.close()


def run_isolated(fn, *args, isolate: bool = True, what: str = "the task", **kwargs):
    """``fn(*args, **kwargs)``, in a forked child if ``isolate``, else here. An exception in the child
    is raised again here (same type where it can be pickled), with the child's traceback attached."""
    if not isolate:
        return fn(*args, **kwargs)
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child_conn, fn, args, kwargs, _thread_count() > 1), daemon=True)
    proc.start()
    child_conn.close()  # so that recv() sees EOF if the child dies without answering
    try:
        message = parent_conn.recv()
    except EOFError:
        message = None
    finally:
        proc.join()
        parent_conn.close()
    if message is None:
        raise RuntimeError(f"{what} died in its subprocess without a result (exit code {proc.exitcode}; "
                           "killed for memory?)")
    if message[0] == "ok":
        return message[1]
    _, exc, text = message
    if exc is None:
        raise RuntimeError(f"{what} failed in its subprocess:\n{text}")
    raise exc from RuntimeError(f"{what} failed in its subprocess; its traceback:\n{text}")
