"""The run's last words name every skipped test and its reason (tests/skip_report.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

@pytest.fixture
def browser():
    pytest.skip("needs chromium")

def test_page(browser):
    pass

def test_other_page(browser):
    pass

@pytest.mark.skipif(True, reason="needs CUDA")
def test_gpu():
    pass

def test_runs():
    pass

@pytest.mark.xfail(reason="known", run=False)
def test_expected_failure():
    pass
'''


def test_skips_are_listed_last_with_their_reasons(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "skip_report", "-p",
                        "no:cacheprovider", "-ra", "--color=no", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(HERE), "PATH": "/usr/bin:/bin"})
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    start = next(i for i, line in enumerate(lines) if "3 TESTS SKIPPED" in line)
    assert start > next(i for i, line in enumerate(lines) if "short test summary" in line)
    section = lines[start + 1:-1]
    assert section == [
        "2 skipped: needs chromium",
        "    test_sample.py::test_page",
        "    test_sample.py::test_other_page",
        "1 skipped: needs CUDA",
        "    test_sample.py::test_gpu",
    ], r.stdout
    assert "1 passed, 3 skipped, 1 xfailed" in lines[-1]


def test_the_suite_installs_the_report(pytestconfig: pytest.Config) -> None:
    """tests/conftest.py carries the hook, so `make test` and `.ci/run` end with it."""
    import skip_report

    hook = pytestconfig.pluginmanager.hook.pytest_terminal_summary
    assert skip_report.pytest_terminal_summary in [i.function for i in hook.get_hookimpls()]
