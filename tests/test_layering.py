"""Arrows only point down: `realnet` builds on `sia`, and nothing in `sia` imports `realnet`.

`sia` is installable and usable for anomaly synthesis alone; a `sia` module importing `realnet`
would make the two one tangle (and a cycle, since realnet imports sia everywhere).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SIA = Path(__file__).resolve().parents[1] / "sia"
IMPORTERS = {"import_module", "__import__"}
# A Python import of realnet in a text asset (a card's usage snippet is code users run with sia alone).
IMPORT_LINE = re.compile(r"^\s*(from\s+realnet(\.\w+)*\s+import\b|import\s+realnet\b)", re.MULTILINE)


def _is_realnet(module: str | None) -> bool:
    return module is not None and (module == "realnet" or module.startswith("realnet."))


def realnet_imports(source: str, filename: str = "<source>") -> list[str]:
    """`line: statement` for every import of realnet in Python source: import statements, and
    importlib.import_module / __import__ calls with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if _is_realnet(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module] if node.level == 0 and _is_realnet(node.module) else []
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0] if node.args else None
            literal = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
            names = [literal] if name in IMPORTERS and _is_realnet(literal) else []
        else:
            continue
        found += [f"{node.lineno}: {name}" for name in names]
    return found


def test_the_checker_finds_every_spelling_of_an_import():
    source = ("import os, realnet\nfrom realnet.model import RealNet\nimport realnet.cli as c\n"
              "importlib.import_module('realnet.demo')\n__import__('realnet')\n"
              "from . import realnet\nimport realnetwork\nx = 'realnet.cli'\nfind_spec('realnet')\n")
    assert realnet_imports(source) == ["1: realnet", "2: realnet.model", "3: realnet.cli", "4: realnet.demo",
                                       "5: realnet"]
    assert IMPORT_LINE.search("text\n    from realnet import RealNet\n")
    assert IMPORT_LINE.search("import realnet\n")
    assert not IMPORT_LINE.search("train it with `realnet train --source sia:DIR`\nrealnet.cards renders it\n")


@pytest.mark.parametrize("path", sorted(SIA.rglob("*.py")), ids=lambda p: p.relative_to(SIA).as_posix())
def test_no_sia_module_imports_realnet(path):
    assert realnet_imports(path.read_text(encoding="utf-8"), str(path)) == []


def test_no_sia_text_asset_shows_a_realnet_import():
    """The assets ship in sia's wheel (card templates, the demo photos' notes)."""
    texts = [p for p in (SIA / "assets").rglob("*") if p.suffix in {".md", ".txt", ".json", ".py", ".yaml", ".yml"}]
    assert texts, "no text assets found"
    offenders = [p.relative_to(SIA).as_posix() for p in texts if IMPORT_LINE.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


@pytest.mark.parametrize("code", [
    "import sia",
    # every public name resolved (the lazy exports load their modules), and the CLI and card modules
    "import sia, sia.cli, sia.cards, sia.runs\nfor name in sia.__all__: getattr(sia, name)",
], ids=["import", "public-names"])
def test_using_sia_never_loads_realnet(code):
    check = code + "\nimport sys\nprint(sorted(m for m in sys.modules if m == 'realnet' or m.startswith('realnet.')))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _readme_layout() -> str:
    readme = (SIA.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Code layout", 1)[1].split("\n## ", 1)[0]
    return section.split("```text", 1)[1].split("```", 1)[0]


def test_readme_code_layout_names_every_module_and_no_other():
    listed: dict[str, set[str]] = {}
    package = None
    for line in _readme_layout().splitlines():
        if line and not line.startswith(" "):
            package = line.split("/", 1)[0]
            continue
        if package in ("sia", "realnet"):
            names = line.split("  ")[1] if line.startswith("  ") and not line.startswith("   ") else ""
            listed.setdefault(package, set()).update(w for w in names.split() if w.endswith(".py"))
    for package in ("sia", "realnet"):
        modules = {p.name for p in (SIA.parent / package).glob("*.py") if p.name != "__init__.py"}
        assert listed.get(package) == modules, f"README layout vs {package}/: {listed.get(package, set()) ^ modules}"
