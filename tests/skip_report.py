"""The end of every test run says, loudly, which tests did not run and why.

A skip is a test that proved nothing: the page and docs tests without chromium, the
`cuda` tests without a GPU. pytest's `-ra` lists them among everything else in its short
summary; this section comes after it, as the last thing before the final count, grouped
by reason. tests/conftest.py installs the hook; `pytest -p skip_report` (with tests/ on
the path) installs it anywhere.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator
from typing import Any

import pytest


def skip_reasons(reports: list[Any]) -> dict[str, list[str]]:
    """Reason → the skipped tests' ids (a skip raised in a fixture or a collector too)."""
    out: dict[str, list[str]] = defaultdict(list)
    for rep in reports:
        longrepr = getattr(rep, "longrepr", None)
        reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 \
            else str(longrepr)
        out[reason.removeprefix("Skipped: ")].append(rep.nodeid)
    return dict(out)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: Any) -> Generator[None, None, None]:
    yield                     # pytest's own summaries first, -ra's short summary included
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if not hasattr(r, "wasxfail")]
    if not skipped:
        return
    tr = terminalreporter
    tr.section(f"{len(skipped)} TESTS SKIPPED: they did not run here", sep="!",
               yellow=True, bold=True)
    for reason, ids in sorted(skip_reasons(skipped).items(), key=lambda kv: -len(kv[1])):
        tr.write_line(f"{len(ids)} skipped: {reason}", yellow=True, bold=True)
        for nodeid in ids:
            tr.write_line(f"    {nodeid}")
