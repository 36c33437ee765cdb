"""The layers of docs/design.md: importing the library loads no app or lab dependency, no Triton and no
native library (backends load on first use), and the library's modules import only layers below them."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_fastmezo_loads_no_app_dependency():
    code = ("import sys, torch\n"
            "before = set(sys.modules)\n"
            "import fastmezo\n"
            "new = {m.split('.')[0] if not m.startswith('fastmezo') else m for m in set(sys.modules) - before}\n"
            "print(sorted(new))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(ast.literal_eval(out.strip()))
    for name in ("peft", "matplotlib", "tqdm", "transformers", "triton", "fastmezo._C", "fastmezo.apps",
                 "fastmezo.tasks", "fastmezo.kernels", "bench", "safetensors"):
        assert name not in loaded, f"import fastmezo loaded {name}"
    assert "fastmezo.engine" in loaded and "fastmezo.ops" in loaded      # the check sees fastmezo's own


# Each library module and the fastmezo modules it may import (docs/design.md, "Layers").
ALLOWED = {
    "noise": set(),
    "oracle": {"noise"},
    "checks": {"noise"},
    "backends": {"backends", "oracle", "kernels"},
    "ops": {"backends", "checks", "noise"},
    "plan": {"backends", "ops", "checks", "noise"},
    "engine": {"noise", "checks", "plan"},
}


def _fastmezo_imports(path: pathlib.Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = (node.module or "").split(".")
            if path.parent.name == "backends" and node.level == 1:
                found.add("backends")
                continue
            found.add(parts[0] if node.module else "")
            if not node.module:
                found.update(alias.name for alias in node.names)
    return found - {""}


def test_lower_layers_import_only_what_is_below_them():
    for name, allowed in ALLOWED.items():
        paths = sorted((ROOT / "fastmezo" / "backends").glob("*.py")) if name == "backends" else \
            [ROOT / "fastmezo" / f"{name}.py"]
        for path in paths:
            extra = _fastmezo_imports(path) - allowed - {name}
            assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}, above its layer"
