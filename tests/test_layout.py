"""The layout ARCHITECTURE.md and the README describe, checked on the source: the packages'
one-way dependencies, and a README layout table that lists every module."""

from __future__ import annotations

import ast
import re
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


def test_app_reaches_the_worker_only_through_its_torch_free_modules() -> None:
    modules = set()
    for file in (ROOT / "app").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.startswith("worker"):
                modules.add(node.module)
    assert modules <= {"contract", "contract.queueing", "contract.inputs"}, modules


def test_importing_models_does_not_pull_heavy_optional_packages() -> None:
    code = ("import sys, models; heavy = {'diffusers', 'PIL'} & set(sys.modules); "
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_the_job_contract_client_and_inputs_are_torch_free() -> None:
    """The API imports these three; its image has no torch."""
    code = ("import sys, contract.spec, contract.keys, contract.events, contract.queueing, "
            "contract.inputs, contract.workers, contract.redis_errors; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_the_client_needs_neither_torch_nor_the_server() -> None:
    """client/ (the ddpm-client distribution) imports the standard library, httpx, Pillow
    (lazily: an optional extra) and itself; a fresh interpreter importing it and making
    both clients loads no torch, numpy, Pillow or server package."""
    allowed = set(sys.stdlib_module_names) | {"httpx", "PIL", "ddpm_client"}
    bad = {(m, f) for m, f in imported_packages("client") if m not in allowed}
    assert not bad, f"the client must stay light: {sorted(bad)}"
    heavy = sorted(PROJECT | {"torch", "numpy", "PIL", "pydantic", "fastapi", "redis", "rq"})
    code = ("import sys, ddpm_client as d; d.Client('http://x'); d.AsyncClient('http://x'); "
            f"heavy = {heavy!r}; "
            "loaded = [m for m in heavy if m in sys.modules]; assert not loaded, loaded")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       cwd=ROOT / "client")
    assert r.returncode == 0, r.stderr
    manifest = (ROOT / "client" / "pyproject.toml").read_text()
    assert re.search(r'^dependencies = \["httpx[^"]*"\]', manifest, re.M), "httpx only"


LISTED = ("app", "worker", "models", "training", "ddpm", "bench", "client")


def readme_layout() -> dict[str, str]:
    """The README's layout table: each package's section (its line and those under it)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    sections: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        head = line.split(" ", 1)[0]
        if head.endswith("/") and not line.startswith(" "):
            current = head.rstrip("/")
            sections[current] = ""
        if current is not None:
            sections[current] += line + "\n"
    return sections


def test_the_readme_layout_lists_every_module() -> None:
    """Every module of the packages appears in its package's section of the README layout
    (a module in a sub-package with that sub-package's name); `__init__.py` is the
    package line itself."""
    sections = readme_layout()
    missing = []
    for package in LISTED:
        section = sections.get(package, "")
        for file in sorted((ROOT / package).rglob("*.py")):
            rel = file.relative_to(ROOT / package)
            if rel.name == "__init__.py":
                continue
            names = re.findall(r"[\w.]+\.py", section)
            if rel.name not in names or any(f"{d}/" not in section for d in rel.parts[:-1]):
                missing.append(f"{package}/{rel}")
    assert not missing, f"README.md's layout table lacks: {missing}"
