"""The layout ARCHITECTURE.md and the README describe, checked on the source: the packages'
one-way dependencies (every import of every module, read from its syntax tree), who may
import RQ, no import cycle inside a package, modules of a readable length, and a README
layout table that lists every module."""

from __future__ import annotations

import ast
import graphlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"app", "contract", "worker", "models", "training", "ddpm", "bench"}


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


# -- package rules ---------------------------------------------------------------------

# Each package's source root (the client is its own distribution) and the project packages
# it may import; None: any. The client imports no server package
# (test_the_client_needs_neither_torch_nor_the_server).
SOURCES = {"app": ROOT, "contract": ROOT, "worker": ROOT, "models": ROOT, "training": ROOT,
           "ddpm": ROOT, "bench": ROOT, "ddpm_client": ROOT / "client"}
MAY_IMPORT: dict[str, set[str] | None] = {
    "contract": set(),                   # the torch-free base everyone shares
    "models": set(),                     # pure torch math
    "app": {"contract"},                 # the API: no torch, no worker, no models
    "worker": {"contract", "models"},
    "training": {"models", "contract"},
    "ddpm": None,                        # the CLI puts everything together
    "bench": None,                       # benchmarks measure everything
    "ddpm_client": set(),
}


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to an absolute dotted name."""

    module: str        # the importing module, e.g. "worker.loop"
    target: str        # e.g. "rq.job", "worker.live", "contract.keys"
    names: tuple[str, ...]   # `from target import names` (empty for `import target`)
    line: int

    def where(self) -> str:
        return f"{self.module}:{self.line}"


def modules(package: str) -> dict[str, Path]:
    """Every module of `package`: dotted name → file (a package's own is its __init__)."""
    root = SOURCES[package]
    found = {}
    for file in sorted((root / package).rglob("*.py")):
        parts = file.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = file
    return found


def imports(package: str) -> list[Import]:
    """Every import in `package`, at module level, in functions and under TYPE_CHECKING
    alike (a type-only import is still a dependency), relative ones made absolute."""
    out = []
    for name, file in modules(package).items():
        is_package = file.name == "__init__.py"
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                out += [Import(name, a.name, (), node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    if not is_package:
                        base = base[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                out.append(Import(name, target, tuple(a.name for a in node.names),
                                  node.lineno))
    return out


def test_packages_import_only_what_their_rules_allow() -> None:
    """contract and models import nothing of the project; app only contract; worker
    contract and models; training models and contract; the client nothing of the server."""
    bad = []
    for package, allowed in MAY_IMPORT.items():
        if allowed is None:
            continue
        for i in imports(package):
            top = i.target.split(".")[0]
            if top in PROJECT - {package} and top not in allowed:
                bad.append(f"{i.where()} imports {i.target}")
    assert not bad, "imports across the package rules:\n" + "\n".join(bad)


def test_app_imports_neither_torch_nor_the_gpu_side() -> None:
    bad = [f"{i.where()} imports {i.target}" for i in imports("app")
           if i.target.split(".")[0] in {"torch", "worker", "models", "training"}]
    assert not bad, bad


def rq_importers(package: str) -> set[str]:
    return {i.module for i in imports(package) if i.target.split(".")[0] == "rq"}


def test_only_the_rq_modules_import_rq() -> None:
    """RQ has one owner per side: in worker/ one module imports it (worker/rqside/surface.py,
    the rest of worker/rqside/ takes RQ's names from there); the API never does (it reaches
    RQ's layout through contract.queueing); in contract/ only queueing."""
    worker = rq_importers("worker") - {"worker.rqside.surface"}
    assert not worker, f"worker modules importing rq besides rqside.surface: {sorted(worker)}"
    assert not rq_importers("app"), f"app imports rq: {sorted(rq_importers('app'))}"
    contract = rq_importers("contract") - {"contract.queueing"}
    assert not contract, f"contract modules importing rq besides queueing: {sorted(contract)}"


def intra_package_graph(package: str) -> dict[str, set[str]]:
    """module → the modules of the same package it imports (`from . import x` and
    `from pkg import x` with x a module count as importing x)."""
    own = modules(package)
    graph: dict[str, set[str]] = {m: set() for m in own}
    for i in imports(package):
        targets = [f"{i.target}.{n}" for n in i.names if f"{i.target}.{n}" in own]
        if not targets and i.target in own:
            targets = [i.target]
        graph[i.module] |= {t for t in targets if t != i.module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles of `graph`: each found, then broken at its last edge, until none."""
    graph = {m: set(ts) for m, ts in graph.items()}
    found = []
    while True:
        try:
            graphlib.TopologicalSorter(graph).prepare()
            return found
        except graphlib.CycleError as e:
            cycle = list(e.args[1])      # [a, ..., a]: each imported by the next
            found.append(cycle)
            assert cycle[-2] in graph[cycle[-1]], cycle
            graph[cycle[-1]].discard(cycle[-2])


def test_cycles_are_found() -> None:
    """The cycle finder itself, on a made-up graph with two cycles."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d2"}, "d2": {"d"}, "e": set()}
    found = cycles(graph)
    assert sorted(sorted(set(c)) for c in found) == [["a", "b", "c"], ["d", "d2"]]
    assert not cycles({"a": {"b"}, "b": set()})


def test_no_import_cycle_inside_a_package() -> None:
    """Each package's modules import each other one way (type-only imports included: the
    issue's loop → live → rq_jobs → loop cycle went through one)."""
    found = [f"{package}: {' → '.join(reversed(c))}" for package in SOURCES
             for c in cycles(intra_package_graph(package))]
    assert not found, "import cycles:\n" + "\n".join(found)


# -- module length ---------------------------------------------------------------------

MAX_LINES = 400
# Modules allowed past MAX_LINES, each with why it reads better whole. Everything else
# over it is split. (Not here on purpose: app/jobs.py, app/openai_compat.py, worker/loop.py:
# grab-bags being split by issue 25.)
LONG_MODULES = {
    "bench/service.py": "one benchmark command: its load client, the measured service "
                        "processes and the report it writes, read together with BENCHMARKS.md",
    "bench/api_overhead.py": "one benchmark command (the API's own cost per request), "
                             "self-contained like every bench/ script",
    "bench/latency.py": "one benchmark command (open-loop latency of the admission "
                        "policies), self-contained like every bench/ script",
    "bench/gpu_check.py": "`make gpu-check`: every GPU check and benchmark row into one "
                          "JSON, run by hand on a GPU machine",
    "bench/stream_memory.py": "one benchmark command (the stream's memory bounds), "
                              "self-contained like every bench/ script",
    "training/trainer.py": "one training run: options, data order, the loop, checkpoints "
                           "and its log share the run's state (Run)",
    "ddpm/cli.py": "the one `ddpm` command: every subcommand's flags in one parser, and a "
                   "few lines each that import and call its package",
}


def test_no_module_is_over_400_lines_without_a_reason() -> None:
    """The project's modules (tests aside: a test module holds one behaviour's cases) stay
    within MAX_LINES, or say in LONG_MODULES why not."""
    long = {}
    for package in SOURCES:
        for file in modules(package).values():
            n = len(file.read_text().splitlines())
            rel = file.relative_to(ROOT).as_posix()
            if n > MAX_LINES and rel not in LONG_MODULES:
                long[rel] = n
    assert not long, f"over {MAX_LINES} lines with no reason in LONG_MODULES: {long}"
    for rel, reason in LONG_MODULES.items():
        assert (ROOT / rel).is_file(), f"LONG_MODULES names {rel}, which is gone"
        assert len(reason) > 20, f"{rel}: say why"
