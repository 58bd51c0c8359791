"""The package's layers: the operator imports without the stages' heavy libraries, and the bottom
module of the stages (`idpo_jobs.config`, shared with the operator) imports nothing of the package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

# Imports every idpo_operator module with torch and numpy unimportable, as in the operator image.
WITHOUT_HEAVY_LIBRARIES = """
import importlib, pkgutil, sys

class Unimportable:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "numpy"):
            raise ImportError(f"{name} is not installed in the operator image")

sys.meta_path.insert(0, Unimportable())
import idpo_operator
names = [m.name for m in pkgutil.iter_modules(idpo_operator.__path__) if not m.name.startswith("_")]
for name in names:
    importlib.import_module(f"idpo_operator.{name}")
print(len(names))
"""


def test_every_operator_module_imports_without_torch_or_numpy() -> None:
    done = subprocess.run([sys.executable, "-c", WITHOUT_HEAVY_LIBRARIES], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(list((ROOT / "operator" / "idpo_operator").glob("[!_]*.py")))


def test_the_shared_config_module_imports_nothing_of_the_package() -> None:
    tree = ast.parse((ROOT / "jobs" / "idpo_jobs" / "config.py").read_text())
    imported = [
        node.module or "." if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [None])  # type: ignore[list-item]
    ]
    ours = [m for m in imported if m.startswith(("idpo_jobs", "idpo_operator", "."))]
    assert imported and ours == []
