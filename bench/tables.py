"""README speed and memory tables, regenerated from the benchmark results in one command.

    python -m bench.tables            rewrite README.md's generated tables
    python -m bench.tables --check    exit 1 when README.md differs from what it would write

A generated table sits between two marker comments in README.md:

    <!-- tables:h200-user-view begin -->
    ...
    <!-- tables:h200-user-view end -->

The marker names a kind, ``<device>-<what>`` as in the folder names bench/results/<date>-<device>-<what>
(a folder ``2026-12-02-h200-distributed-w1`` is of kind ``h200-distributed``); the newest folder of that
kind (by date, then name) fills the table. Everything is computed from its results.json: ratios to the
reference and to the floor, the GPU, library versions and commit; each table links its folder. A
results.json whose layout this module does not know (a new benchmark) is an error naming the folder.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
MARKER = re.compile(r"(<!-- tables:([\w.-]+) begin -->\n)(.*?)(<!-- tables:\2 end -->)", re.S)
FOLDER = re.compile(r"(\d{4}-\d{2}-\d{2})-(.+)")


class LayoutError(ValueError):
    """A results folder this module cannot render."""


def newest(kind: str, results: Path = RESULTS) -> Path:
    """The newest results folder of ``kind`` (its name after the date is the kind, or the kind and a suffix)."""
    found = []
    for folder in results.iterdir():
        m = FOLDER.fullmatch(folder.name)
        if m and (m.group(2) == kind or m.group(2).startswith(kind + "-")) and (folder / "results.json").exists():
            found.append((m.group(1), folder.name, folder))
    if not found:
        raise LayoutError(f"no results folder of kind {kind!r} in {results} (expected <date>-{kind}[-...])")
    return max(found)[2]


# -- formatting -------------------------------------------------------------------------------------
def _ms(v) -> str:
    return "" if v is None else f"{v:.3g} ms" if v < 10 else f"{v:.1f} ms"


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _environment(data: dict) -> dict:
    env = data.get("environment") or data.get("env")
    if env is None and data.get("runs"):
        env = data["runs"][0].get("environment")
    if not isinstance(env, dict) or "gpu" not in env:
        raise LayoutError("no environment (gpu, versions, commit) in results.json")
    return env


def _source(folder: Path, env: dict, base: Path) -> str:
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda") if env.get(k))
    dirty = " (uncommitted changes)" if env.get("dirty") else ""
    rel = Path(os.path.relpath(folder, base)).as_posix()        # a link from the page's folder
    return (f"{env['gpu']}, {versions}; commit {env.get('commit') or 'unknown'}{dirty}, "
            f"{str(env.get('date', ''))[:10]}; [{rel}/]({rel}/)")


# -- one renderer per layout ------------------------------------------------------------------------
def _user_view(data: dict) -> str:
    rows_by_model: dict = {}
    for r in data["rows"]:
        rows_by_model.setdefault(r["model"], []).append(r)
    out = []
    for model, rows in rows_by_model.items():
        by_what = {r["what"]: r for r in rows}
        ref_perturb = by_what.get("reference perturb", {}).get("user_ms")
        ref_update = by_what.get("reference update", {}).get("user_ms")
        ref_step = None if ref_perturb is None or ref_update is None else 3 * ref_perturb + ref_update
        for r in rows:
            what = r["what"]
            if what.startswith("reference"):
                continue
            ref = (ref_step if what.startswith("MeZO.step") else ref_update if what.startswith("restore")
                   else ref_perturb if what.startswith("perturb_") and r["tensors"] > 1 else None)
            host = r["host_ms"]
            out.append([f"{model} ({r['tensors']} tensors)" if r["tensors"] > 1 else model, f"`{what}`",
                        _ms(r["user_ms"]), _ms(r["queued_ms"]), f"{host:.2f} ms", _x(r["x_floor"]),
                        _ms(ref), "" if ref is None else _x(ref / r["user_ms"])])
    bw = data["copy_bandwidth_bytes_per_s"] / 1e12
    return (f"Floor: one read and one write of every parameter at the measured {bw:.2f} TB/s (a step's "
            "overhead is three passes: its ideal ratio is 3); speed-up over the reference in the same run "
            "(a step's: three perturb passes and one update).\n\n"
            + _table(["shapes", "call", "user view", "queued", "host", "x floor", "reference", "speed-up"], out))


def _steps(data: dict) -> str:
    variants = data["settings"]["variants"]
    groups: dict = {}
    for r in data["rows"]:
        groups.setdefault((r["model"], r["batch"], r["tokens"]), {})[r["variant"]] = r
    time_rows, mem_rows = [], []
    for (model, batch, tokens), by in groups.items():
        fwd, ref = by["forward"], by.get("reference")
        label = f"{model}, {batch}x{tokens}"
        cells = [label, _ms(fwd["ms_median"]), "" if ref is None else _ms(ref["ms_median"])]
        mem = [label, "" if ref is None else f"{(ref['peak_bytes'] - fwd['peak_bytes']) / 2**20:.0f} MiB"]
        for v in variants:
            r = by.get(v)
            speed = None if r is None or ref is None else ref["ms_median"] / r["ms_median"]
            cells.append("" if r is None else f"{_ms(r['ms_median'])} ({_x(speed)})")
            mem.append("" if r is None else f"{(r['peak_bytes'] - fwd['peak_bytes']) / 2**20:.0f} MiB")
        time_rows.append(cells)
        mem_rows.append(mem)
    return ("Median whole step (two forwards + the passes), speed-up over the reference in brackets:\n\n"
            + _table(["model, batch x tokens", "2 forwards", "reference"] + variants, time_rows)
            + "\nPeak memory above the two forwards:\n\n"
            + _table(["model, batch x tokens", "reference"] + variants, mem_rows))


def _replay(data: dict) -> str:
    rows = [[str(r["k"]), _ms(r["ms_per_step"]), _x(r["speedup"])] for r in data["rows"]]
    return (f"Replay of {data['steps']} recorded steps, {data['model']} {data['dtype']}, {data['mode']} mode "
            "(k steps fused per pass):\n\n" + _table(["k", "per step", "speed-up"], rows))


def _distributed(data: dict) -> str:
    rows = [[str(r["world"]), f"{r['batch']}x{r['tokens']}", r["mode"], _ms(r["plain_ms"]), _ms(r["dp_ms"]),
             f"{100 * r['dp_overhead']:.1f}%", f"{r['comm_bytes']:.0f} B", f"{r['peak_mib']:.0f} MiB",
             "yes" if r["replicas_equal"] else "NO"]
            for run in data["runs"] for r in run["rows"]]
    return _table(["world", "batch x tokens", "mode", "plain step", "data parallel", "overhead", "traffic a step",
                   "peak", "replicas equal"], rows)


def render_folder(folder: Path, base: Path = ROOT) -> str:
    """The Markdown of one results folder (links relative to ``base``): its source line, then its tables."""
    data = json.loads((folder / "results.json").read_text())
    rows = data.get("rows") or [{}]
    if data.get("benchmark") == "steps":
        body = _steps(data)
    elif "user_ms" in rows[0] and "queued_ms" in rows[0]:
        body = _user_view(data)
    elif "ms_per_step" in rows[0] and "k" in rows[0]:
        body = _replay(data)
    elif data.get("runs") and "dp_ms" in (data["runs"][0].get("rows") or [{}])[0]:
        body = _distributed(data)
    else:
        raise LayoutError(f"{folder}: unknown results.json layout (keys {sorted(data)}); add a renderer to "
                          "bench/tables.py")
    return f"({_source(folder, _environment(data), base)})\n\n{body}"


def regenerate(text: str, results: Path = RESULTS, base: Path = ROOT) -> str:
    """``text`` with every marked table rendered again from the newest folder of its kind."""
    def fill(m):
        return m.group(1) + render_folder(newest(m.group(2), results), base) + m.group(4)
    return MARKER.sub(fill, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not what this would write")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    if not MARKER.search(text):
        print(f"{args.readme}: no <!-- tables:KIND begin --> markers", file=sys.stderr)
        return 1
    new = regenerate(text, args.results, args.readme.resolve().parent)
    if args.check:
        if new != text:
            print(f"{args.readme}: the generated tables are stale; run python -m bench.tables", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
