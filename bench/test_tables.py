"""bench/tables.py: README.md's generated tables match the newest results (a stale table fails here),
the newest folder of a kind wins, numbers and ratios come from the JSON, an unknown layout is refused."""
import json
import shutil

import pytest

from bench import tables


def test_readme_tables_are_up_to_date():
    assert tables.MARKER.search(tables.README.read_text()), "README.md has no generated tables"
    assert tables.main(["--check"]) == 0, "README.md's tables are stale: run python -m bench.tables"


def _results(tmp_path, user_ms, date="2026-12-02"):
    results = tmp_path / "results"
    folder = results / f"{date}-h200-user-view"
    folder.mkdir(parents=True)
    data = json.loads((tables.newest("h200-user-view") / "results.json").read_text())
    rows = [r for r in data["rows"] if r["model"] == "opt-13b"]
    for r in rows:
        if r["what"] == "perturb_ gaussian (round to nearest)":
            r["user_ms"] = user_ms
    data["rows"] = rows
    data["environment"]["commit"] = f"c{date[-2:]}"
    (folder / "results.json").write_text(json.dumps(data))
    return results, data


def test_the_newest_folder_fills_the_table_with_ratios_from_its_json(tmp_path):
    results, _ = _results(tmp_path, 30.0, "2026-12-01")
    _, data = _results(tmp_path, 40.0, "2026-12-05")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- tables:h200-user-view begin -->\nold\n<!-- tables:h200-user-view end -->\nrest\n")
    assert tables.main(["--readme", str(readme), "--results", str(results), "--check"]) == 1
    assert tables.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end -->\nrest\n") and "old" not in text
    assert "commit c05" in text and "2026-12-05-h200-user-view" in text and "c01" not in text
    ref = next(r["user_ms"] for r in data["rows"] if r["what"] == "reference perturb")
    row = next(line for line in text.splitlines() if "perturb_ gaussian (round to nearest)" in line)
    assert "| 40.0 ms |" in row and f"| {ref / 40.0:.2f}x |" in row
    assert tables.main(["--readme", str(readme), "--results", str(results), "--check"]) == 0


def test_an_unknown_layout_is_refused_by_name(tmp_path):
    folder = tmp_path / "results" / "2026-12-09-h200-newthing"
    folder.mkdir(parents=True)
    shutil.copy(tables.newest("h200-user-view") / "COMMAND.md", folder)
    (folder / "results.json").write_text(json.dumps({"environment": {"gpu": "x"}, "rows": [{"speed": 1}]}))
    with pytest.raises(tables.LayoutError, match="2026-12-09-h200-newthing.*unknown results.json layout"):
        tables.render_folder(folder)
    with pytest.raises(tables.LayoutError, match="no results folder of kind 'h200-other'"):
        tables.newest("h200-other", tmp_path / "results")
