"""Run one function in a fresh forked process and get its (picklable) result back; stop it cleanly
on SIGINT / SIGTERM.

Why fork: the fine-tuning job measures each method's peak memory on a CPU as the peak RSS of a
process. In one long process, memory freed by an earlier method stays in the allocator's caches and
hides (or inflates) the next method's. A forked child starts from the parent, which has only
imported modules and built the data set (no model, no torch computation, no tokenizer threads), so
every method starts from the same state. Fork costs milliseconds, where a spawned interpreter would
pay the imports of torch and transformers (seconds) once per method.

Forking is used only where it is safe and available: on Linux, and never once CUDA is in use (a
CUDA context does not survive fork); elsewhere the function runs in this process.

Signals: inside :func:`stop_on_signals`, SIGINT and SIGTERM raise :class:`Interrupted` (in the
parent and in a child alike), so ``finally`` blocks and context managers clean up (temporary files
above all). A parent interrupted while its child works stops the child (SIGTERM, then SIGKILL after
a grace period) and waits for it before the exception goes on: one process tree, stopped as a whole
whether the signal went to the parent only or to the whole process group. On Linux a child also
gets SIGTERM if its parent dies without that chance (SIGKILL), so it is never left training alone.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import traceback

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: Seconds an interrupted child gets to unwind (finish the current torch operation, remove its
#: temporary files) before it is killed.
CHILD_GRACE_SECONDS = 5.0


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so that ``except Exception``
    does not swallow it. ``exit_code`` is the shell's convention, 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum


def _ignore(signum, frame):
    pass


def _raise_interrupted(signum, frame):
    # Later signals are ignored: the first one's cleanup (stopping the child, writing the results)
    # must not itself be cut short. It is bounded by CHILD_GRACE_SECONDS; SIGKILL still works. (A
    # Python no-op rather than SIG_IGN: a second signal may already be pending, and Python reports
    # a pending signal whose handler became SIG_IGN as an error.)
    for s in STOP_SIGNALS:
        signal.signal(s, _ignore)
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Inside, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread; the previous
    handlers come back at the exit. Does nothing outside the main thread (Python delivers signals
    to the main thread only)."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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


def _die_with_parent(parent_pid) -> None:
    """Linux: SIGTERM to this process when the parent dies (PR_SET_PDEATHSIG), so a parent killed
    by SIGKILL leaves no child training on. If the parent died before this was set, exit now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(128 + int(signal.SIGTERM))


def _send(conn, message):
    try:
        conn.send(message)
    except OSError:  # the parent is gone or stopped listening: nobody to tell
        pass


def _child(conn, fn, args, kwargs, single_thread, parent_pid):
    _die_with_parent(parent_pid)
    for s in STOP_SIGNALS:  # fresh handlers (the parent's may already have been used)
        signal.signal(s, _raise_interrupted)
    if single_thread:
        # The parent had started threads (e.g. an OpenMP pool, inside a long test session): GNU
        # OpenMP is not fork-safe, and the child's first parallel region waits forever for pool
        # threads that were not forked. One thread never enters a parallel region.
        torch.set_num_threads(1)
    try:
        result = fn(*args, **kwargs)
        _send(conn, ("ok", result))
    except Interrupted as exc:  # unwound (temporary files removed); the parent knows why
        _send(conn, ("interrupted", exc.signum))
    except BaseException as exc:  # report everything else, then exit
        text = traceback.format_exc()
        try:
            pickle.dumps(exc)
            _send(conn, ("error", exc, text))
        except Exception:
            _send(conn, ("error", None, text))
    finally:
        conn.close()


def _stop(proc) -> None:
    """SIGTERM to the child, SIGKILL if it has not exited after the grace period; then reap it."""
    if proc.is_alive():
        proc.terminate()
        proc.join(CHILD_GRACE_SECONDS)
    if proc.is_alive():
        proc.kill()
    proc.join()


def run_isolated(fn, *args, isolate: bool = True, what: str = "the task", **kwargs):
    """``fn(*args, **kwargs)``, in a forked child if ``isolate``, else here. An exception in the child
    is raised again here (same type where it can be pickled), with the child's traceback attached.

    An exception in this process while the child works (:class:`Interrupted` from a signal, above
    all) stops the child and waits for it to exit before it goes on. A child stopped by a signal sent
    to it alone (not through this process) raises :class:`Interrupted` here too."""
    if not isolate:
        return fn(*args, **kwargs)
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child_conn, fn, args, kwargs, _thread_count() > 1, os.getpid()),
                       daemon=True)
    proc.start()
    child_conn.close()  # so that recv() sees EOF if the child dies without answering
    try:
        try:
            message = parent_conn.recv()
        except EOFError:
            message = None
        proc.join()
    except BaseException:
        _stop(proc)
        raise
    finally:
        parent_conn.close()
    if message is None:
        if proc.exitcode is not None and -proc.exitcode in STOP_SIGNALS:
            raise Interrupted(-proc.exitcode)
        raise RuntimeError(f"{what} died in its subprocess without a result (exit code {proc.exitcode}; "
                           "killed for memory?)")
    if message[0] == "ok":
        return message[1]
    if message[0] == "interrupted":
        raise Interrupted(message[1])
    _, exc, text = message
    if exc is None:
        raise RuntimeError(f"{what} failed in its subprocess:\n{text}")
    raise exc from RuntimeError(f"{what} failed in its subprocess; its traceback:\n{text}")
