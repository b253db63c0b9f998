"""`ddpm-client generate` where only the client is installed: a fresh venv holding the
ddpm-client wheel (built and installed by pip from client/pyproject.toml, console script
included) and httpx with its dependencies, nothing else — no torch, no server package —
run against the live stack (conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import ddpm_client as dc
import pytest
from packaging.requirements import Requirement
from PIL import Image

from tests.client.conftest import Stack

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16                    # the `tiny` models: 16×16
# Importable in this test's venv, and none of it may be in the client's.
HEAVY = ("torch", "numpy", "PIL", "tqdm", "pydantic", "redis", "rq", "fastapi",
         "app", "worker", "models", "training", "ddpm")
T = 120


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=T, **kw)  # type: ignore[call-overload]


def _link_requirements(requires: list[str], site: Path) -> None:
    """Link into `site` the installed distributions `requires` names, with their own
    dependencies (extras and markers as pip would judge them): httpx as this venv has it,
    with no download."""
    todo = [Requirement(r) for r in requires]
    seen: set[str] = set()
    here = Path(sysconfig.get_paths()["purelib"])
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        dist = metadata.distribution(req.name)
        name = dist.metadata["Name"].lower()
        if name in seen:
            continue
        seen.add(name)
        todo += [Requirement(r) for r in dist.requires or []]
        tops = {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}
        for top in tops:
            source = Path(dist.locate_file(top))
            if not (site / top).exists() and source.exists() and source.parent == here:
                (site / top).symlink_to(source)


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The venv's root. pip builds the wheel from a copy of client/ (the tree stays clean)
    and installs it as any user's `pip install ./client` would, console script included."""
    tmp = tmp_path_factory.mktemp("bare")
    src, venv, wheels = tmp / "client", tmp / "venv", tmp / "wheels"
    shutil.copytree(ROOT / "client", src,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    built = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", str(wheels), str(src)])
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("ddpm_client-*.whl")
    python = venv / "bin" / "python"
    put = _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])
    assert put.returncode == 0, put.stderr
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                      "['purelib'])"], check=True).stdout.strip())
    (client,) = metadata.distributions(name="ddpm-client", path=[str(site)])
    _link_requirements(client.requires or [], site)
    # The venv is what it claims: httpx is there, nothing heavy is.
    probe = _run([str(python), "-c", "import importlib.util as u, httpx; "
                  f"print([m for m in {HEAVY!r} if u.find_spec(m)])"],
                 cwd=tmp, env=_bare_env())
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    return venv


def _bare_env() -> dict[str, str]:
    """This environment less whatever could reach the test venv's packages."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DDPM_API_KEY")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONNOUSERSITE": "1"}


def test_ddpm_client_generate_without_torch(bare: Path, stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = _run([str(bare / "bin" / "ddpm-client"), "generate", "--server", stack.url,
                "--model", "tinycond", "--class-label", "2", "--num-images", "2",
                "--steps", "4", "--seed", "5", "--out", str(out), "--stream",
                "--snapshot-every", "2"], cwd=tmp_path, env=_bare_env())
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png"]
    assert sorted(p.name for p in (out / "frames").iterdir()) == [
        "0000-0002.png", "0001-0002.png"]
    doc = json.loads((out / "generation.json").read_text())
    assert doc["status"] == "succeeded" and doc["request"]["seed"] == 5
    assert f"wrote 2 images to {out}" in run.stdout and "8/8" in run.stderr
    with dc.Client(stack.url) as c:
        for i in range(2):
            assert (out / f"{i:04d}.png").read_bytes() == c.image(doc["id"], i)
    assert Image.open(out / "0000.png").size == (SIZE, SIZE)

    bad = _run([str(bare / "bin" / "ddpm-client"), "generate", "--server", stack.url,
                "--model", "tiny", "--steps", "5000", "--out", str(tmp_path / "bad")],
               cwd=tmp_path, env=_bare_env())
    assert bad.returncode == 2, bad.stderr
    line, = bad.stderr.strip().splitlines()              # one line, no traceback
    assert line.startswith("ddpm-client generate: ") and "422" in line and "steps" in line
    assert not (tmp_path / "bad").exists()


def test_the_command_loads_nothing_heavy_where_it_could(stack: Stack, tmp_path: Path) -> None:
    """In this venv torch and the server are importable: a whole run still loads none of
    them (the fresh venv above would only show an import that cannot be done)."""
    argv = ["generate", "--server", stack.url, "--model", "tiny", "--steps", "2",
            "--out", str(tmp_path / "out")]
    code = ("import sys; from ddpm_client.cli import main; rc = main(sys.argv[1:]); "
            f"loaded = [m for m in {HEAVY!r} if m in sys.modules]; "
            "assert not loaded, loaded; sys.exit(rc)")
    r = _run([sys.executable, "-I", "-c", code, *argv], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "0000.png").exists()
