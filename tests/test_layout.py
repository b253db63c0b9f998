"""Dependency rules of DESIGN.md §2, checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"app", "worker", "models", "training", "ddpm"}


def imported_packages(package: str) -> set[tuple[str, str]]:
    found = set()
    for file in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                found |= {(alias.name.split(".")[0], file.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add((node.module.split(".")[0], file.name))
    return found


def test_models_imports_nothing_of_the_project() -> None:
    bad = {(m, f) for m, f in imported_packages("models") if m in PROJECT}
    assert not bad, f"models/ must stay pure: {sorted(bad)}"


def test_app_never_imports_torch() -> None:
    bad = {(m, f) for m, f in imported_packages("app") if m in ("torch", "models")}
    assert not bad
    code = ("import sys, app.main; app.main.create_app().openapi(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_app_reaches_the_worker_only_through_its_contract_and_client() -> None:
    modules = set()
    for file in (ROOT / "app").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.startswith("worker"):
                modules.add(node.module)
    assert modules <= {"worker.contract", "worker.client"}, modules


def test_importing_models_does_not_pull_heavy_optional_packages() -> None:
    code = ("import sys, models; heavy = {'diffusers', 'PIL'} & set(sys.modules); "
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_the_job_contract_and_client_are_torch_free() -> None:
    """The API imports these two; its image has no torch."""
    code = ("import sys, worker.contract, worker.client; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
