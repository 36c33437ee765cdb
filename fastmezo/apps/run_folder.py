"""The results folder of a fine-tuning run (``--out``): whose results it holds, and their updates.

results.json is the run's record: the command line(s), the settings (``config``), a status per
method (pending, running, done, interrupted, failed), the rows of the methods done (``methods``) and
the state of the run (running, done, interrupted, failed). It is rewritten at every change, with
results.md and results.csv made from the rows there, each atomically (:func:`report.write_atomic`),
so a run stopped at any point, even by SIGKILL, leaves a consistent record of what it finished.
comparison.png is drawn when a run ends.

When the folder already holds a record (checked before anything is written):
  * a run still in progress there (its process alive on this machine): refused;
  * another run's results (other settings, or another set of methods): refused, unless
    ``overwrite`` (start over) or ``resume`` with the same settings;
  * ``resume``: the settings must be the same (the error names those that differ); the methods
    done there are kept and skipped, the selected others run, and the table holds them all;
  * the same command again, without ``resume``: starts over.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from . import report

#: Options that do not change any result (where outputs go, how they are shown, which methods of
#: the grid run), and those that set hyper-parameters of some methods (compared through each
#: method's resolved hyper-parameters instead): everything else in the config must match for --resume.
NOT_SETTINGS = ("out", "overwrite", "resume", "no_progress", "methods", "full", "set", "lr", "eps", "steps",
                "ft_steps")


def _json(value):
    return json.loads(json.dumps(value))


def settings_of(config: dict) -> dict:
    """The options of ``config`` that change results, as JSON would store them."""
    return _json({k: v for k, v in config.items() if k not in NOT_SETTINGS})


def _differences(old: dict, new: dict) -> list:
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def _alive_here(record) -> bool:
    """Whether the process that wrote ``record`` still runs on this machine as a fastmezo job."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:  # a reused pid runs something else
            return b"fastmezo" in f.read()
    except OSError:
        return False


def _hparams(record) -> dict:
    """method -> hyper-parameters; a record written before they were kept there has them in its rows."""
    return record.get("hparams") or {row["method"]: row.get("hparams") for row in record.get("methods", [])}


def _statuses(record) -> dict:
    """method -> status; a record written before statuses existed holds only finished methods."""
    if "status" in record:
        return dict(record["status"])
    return {row["method"]: "done" for row in record.get("methods", [])}


class RunFolder:
    """The record of one run in ``out``; see the module's docstring for the rules of :meth:`__init__`.

    ``results`` is the record (the dict written as results.json). ``order`` lists every method the
    table can hold, in table order (the selected ones, plus those kept from the run resumed)."""

    def __init__(self, out, *, command, config, model, methods, hparams, order, overwrite=False, resume=False):
        self.out = Path(out)
        self.paths = report.output_paths(self.out)
        if overwrite and resume:
            raise ValueError("--overwrite and --resume exclude each other: start over, or continue the run there")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {out}: exists and is not a folder")
        try:
            old = self._read_record()
        except ValueError:
            if not overwrite:
                raise
            old = None  # unreadable, and to be replaced anyway
        if old is None and resume:
            raise ValueError(f"--resume: {self.paths['json']} does not exist: nothing to resume")
        kept = [] if old is None else self._check(old, config, model, methods, hparams, overwrite, resume)
        self.fresh = not resume
        names = list(dict.fromkeys([*(r["method"] for r in kept), *methods]))
        names.sort(key=order.index)
        status = {name: "pending" for name in names}
        status.update({row["method"]: "done" for row in kept})
        all_hparams = {**{row["method"]: row.get("hparams") for row in kept}, **_json(hparams)}
        earlier = (old.get("commands") or [old.get("command", "?")]) if resume else []
        old = old or {}
        self.results = dict(command=command, commands=[*earlier, command], config=config, model=model,
                            state="running", status=status, hparams={n: all_hparams[n] for n in names}, errors={},
                            pid=os.getpid(), host=socket.gethostname(),
                            started=time.strftime("%Y-%m-%d %H:%M:%S"), methods=kept,
                            wall_seconds=old.get("wall_seconds", 0.0) if resume else 0.0)
        self._wall_before = self.results["wall_seconds"]
        self._wall_start = time.perf_counter()

    def _check(self, old, config, model, methods, hparams, overwrite, resume):
        """Refuse (ValueError) what the rules forbid; returns the rows kept from ``old`` (--resume)."""
        if _alive_here(old) and old.get("state") == "running":
            raise ValueError(f"--out {self.out}: a run is in progress there (pid {old['pid']}: "
                             f"{old.get('command')}); wait for it, or choose another --out")
        there, here = settings_of(old.get("config", {})), settings_of(config)
        same_settings = there == here and old.get("model") == model
        done_there = [m for m, s in _statuses(old).items() if s == "done"]
        if resume:
            if not same_settings:
                diff = _differences(there, here)
                if old.get("model") != model:
                    diff.append(f"model: {old.get('model')!r} there, {model!r} here")
                raise ValueError(f"--resume: {self.paths['json']} was made with other settings ("
                                 + "; ".join(diff) + "); resume with the same options, or use --overwrite "
                                 "or another --out")
            kept = [row for row in old.get("methods", []) if row["method"] in done_there]
            for row in kept:
                name = row["method"]
                if name in hparams and row.get("hparams") != _json(hparams[name]):
                    raise ValueError(f"--resume: {name} was done there with {row.get('hparams')}, here it "
                                     f"would run with {hparams[name]}; resume with the same options, or use "
                                     "--overwrite or another --out")
            return kept
        same_run = same_settings and set(_statuses(old)) == set(methods) and _hparams(old) == _json(hparams)
        if not (same_run or overwrite):
            raise ValueError(
                f"--out {self.out} holds the results of another run (`{old.get('command', '?')}`; done: "
                f"{', '.join(done_there) or 'none'}); pass --overwrite to replace them, --resume to "
                "continue that run (same settings), or choose another --out")
        return []

    def _read_record(self):
        path = self.paths["json"]
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--out {self.out}: cannot read {path.name} ({exc}); use --overwrite or "
                             "another --out") from None
        if not isinstance(record, dict):
            raise ValueError(f"--out {self.out}: {path.name} is not a results record; use --overwrite "
                             "or another --out")
        return record

    # -- the run's steps ---------------------------------------------------------------------------

    @property
    def done(self) -> list:
        return [name for name, s in self.results["status"].items() if s == "done"]

    def begin(self, **meta):
        """Record the run's description (task, sizes, versions) and write; a fresh run also removes
        an earlier run's plot, which no longer matches the table."""
        self.results.update(meta)
        if self.fresh and self.paths["png"].exists():
            self.paths["png"].unlink()
        self.write()

    def set_status(self, name, status, error=None):
        self.results["status"][name] = status
        if error is not None:
            self.results["errors"][name] = error
        self.write()

    def finish(self, name, row):
        """Method ``name`` is done: its row joins the table, in table order."""
        rows = [r for r in self.results["methods"] if r["method"] != name] + [row]
        order = list(self.results["status"])
        self.results["methods"] = sorted(rows, key=lambda r: order.index(r["method"]))
        self.results["errors"].pop(name, None)
        self.set_status(name, "done")

    def end(self, state, plot=True):
        """The run stops in ``state`` (done, interrupted, failed): methods still running are marked
        interrupted; the tables and (if ``plot``) the plot are written."""
        for name, s in self.results["status"].items():
            if s == "running":
                self.results["status"][name] = "interrupted"
        self.results["state"] = state
        self.write()
        if plot:
            try:
                report.write_plot(self.results, self.out)
            except ImportError as exc:  # matplotlib missing: the tables are there
                print(f"note: no comparison.png ({exc})", flush=True)
        return self.paths

    def write(self):
        self.results["wall_seconds"] = self._wall_before + time.perf_counter() - self._wall_start
        report.write_tables(self.results, self.out)
