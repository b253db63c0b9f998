"""Reliability fixtures: `record(**figures)` keeps what a fault or load test measured.

The figures (jobs submitted / succeeded / lost, errors seen, memory, key counts) are what
RELIABILITY.md reports. With `DDPM_RELIABILITY_LOG=path` set they are appended to that
file as JSON lines, one per test; they are always printed (`pytest -s` shows them).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Iterator[Callable[..., None]]:
    """`record(**figures)`: may be called several times; the figures are merged."""
    figures: dict[str, Any] = {}

    def add(**values: Any) -> None:
        figures.update(values)

    t0 = time.monotonic()
    yield add
    if not figures:
        return
    line = {"test": request.node.nodeid, "seconds": round(time.monotonic() - t0, 1),
            **figures}
    print(f"\nRELIABILITY {json.dumps(line)}")
    path = os.environ.get("DDPM_RELIABILITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
