"""The package's layering: imports point down (cli -> benchmarks -> serve -> runtime -> engine -> export -> core),
intra-project imports are relative (so editors and structure tools can follow them from the files), and the
run-time path (opening engines, generating) never loads the exporters."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "export": 1, "engine": 2, "runtime": 3, "serve": 4, "benchmarks": 5, "cli": 6}
"""Top-level folders installed as `megafusion.<name>`, lowest first; a module may import its own layer or below."""


def _imports(path: Path) -> list[tuple[int, str, int]]:
    """(line, imported package folder or 'megafusion.*' for absolute ones, relative level) of every import."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0:
                if mod.split(".")[0] == "megafusion":
                    out.append((node.lineno, mod, 0))
            elif node.level == 1:
                out.append((node.lineno, path.parent.name, 1))
            else:
                out.append((node.lineno, mod.split(".")[0], node.level))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, 0) for a in node.names if a.name.split(".")[0] == "megafusion"]
    return out


def _package_files():
    for folder in LAYERS:
        yield from sorted((ROOT / folder).glob("*.py"))


def test_every_layer_folder_is_a_package():
    for folder in LAYERS:
        assert (ROOT / folder / "__init__.py").is_file(), folder


@pytest.mark.parametrize("path", list(_package_files()), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_imports_point_down_and_are_relative(path):
    here = LAYERS[path.parent.name]
    for line, target, level in _imports(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        assert level != 0, f"{where}: absolute import of {target}; use a relative import"
        assert level <= 2, f"{where}: relative import above the package"
        assert target in LAYERS, f"{where}: imports {target!r}, not a layer of the package"
        assert LAYERS[target] <= here, f"{where}: {path.parent.name} imports upward from {target}"


def test_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "core" / "x.py"
    bad.parent.mkdir()
    bad.write_text("from ..runtime.pipeline import MegaFusionPipeline\nfrom megafusion.core import plan\n")
    found = _imports(bad)
    assert (1, "runtime", 2) in found and (2, "megafusion.core", 0) in found


def test_the_lab_is_not_in_the_package():
    lab = ROOT / "benchmarks" / "lab"
    assert lab.is_dir() and not (lab / "__init__.py").exists()
    for path in _package_files():
        assert "lab" not in {t for _, t, _ in _imports(path)}, path


def test_run_path_never_loads_the_exporters():
    code = ("import sys; import megafusion.runtime.pipeline, megafusion.engine.load, megafusion.cli.generate; "
            "from megafusion.engine.backend import registry; registry(); "
            "print(' '.join(m for m in sys.modules if m.startswith('megafusion.export')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"the run-time path imported {out}"
