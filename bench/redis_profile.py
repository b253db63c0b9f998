"""Where Redis's time goes in a run: every command timed by Redis itself (SLOWLOG at 0 µs),
the project's Lua scripts named by their SHA-1 (matched against the scripts in the code).

`INFO commandstats` counts an EVALSHA's time with the commands it runs inside, so it cannot
say which script costs what; SLOWLOG records each top-level command with its duration and
first arguments (an EVALSHA's first is the script's SHA-1). SLOWLOG's own bookkeeping adds
a little to each command: read the shares here, and take Redis's CPU per image from a run
without it. `python -m bench.service ... --redis-profile` prints the table per stack run.
"""

from __future__ import annotations

import hashlib
import importlib
from collections import defaultdict
from typing import Any

import redis

INSIDE = " (in a script)"

# The modules whose module-level strings hold Lua scripts the project sends.
SCRIPT_MODULES = ("app.admission", "contract.queueing", "worker.redis_batch", "worker.frames",
                  "worker.rqside.layout")


def script_names() -> dict[str, str]:
    """SHA-1 (hex) → `module.NAME` of every Lua script in SCRIPT_MODULES."""
    names = {}
    for module in SCRIPT_MODULES:
        for name, value in vars(importlib.import_module(module)).items():
            if isinstance(value, str) and "redis.call" in value:
                names.setdefault(hashlib.sha1(value.encode()).hexdigest(), f"{module}.{name}")
    return names


class RedisProfile:
    """SLOWLOG at 0 µs between `start` and `stop` (its settings put back after); up to
    `max_len` commands are kept (a few hundred bytes each), `truncated` says if more ran."""

    def __init__(self, r: redis.Redis, max_len: int = 1_000_000) -> None:
        self.r, self.max_len = r, max_len
        self.saved: dict[str, Any] = {}
        self.truncated = False

    def start(self) -> None:
        self.saved = self.r.config_get("slowlog-*")  # type: ignore[assignment]
        self.r.config_set("slowlog-max-len", self.max_len)
        self.r.slowlog_reset()
        self.r.config_set("slowlog-log-slower-than", 0)

    def stop(self) -> dict[str, tuple[int, int]]:
        """command (or script name) → (calls, µs)."""
        self.r.config_set("slowlog-log-slower-than", self.saved["slowlog-log-slower-than"])
        entries = self.r.execute_command("SLOWLOG", "GET", "-1")
        self.r.config_set("slowlog-max-len", self.saved["slowlog-max-len"])
        self.r.slowlog_reset()
        self.truncated = len(entries) >= self.max_len
        names = script_names()
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for entry in entries:
            args = [a.decode(errors="replace") if isinstance(a, bytes) else str(a)
                    for a in entry[3][:2]]
            command = args[0].lower()
            if command.startswith("evalsha") and len(args) > 1:
                command = names.get(args[1].lower(), f"{command} {args[1][:12]}")
            if command in ("slowlog", "config"):
                continue
            if entry[4] == b"?:0":           # run by a script (its time is the script's too)
                command += INSIDE
            out[command][0] += 1
            out[command][1] += int(entry[2])
        return {k: (c, us) for k, (c, us) in out.items()}


def table(found: dict[str, tuple[int, int]], images: int, truncated: bool = False,
          top: int = 12) -> str:
    """The commands and scripts clients sent, by their share of Redis's time, per image;
    then the commands scripts ran (their time is inside the scripts')."""
    sent = {k: v for k, v in found.items() if not k.endswith(INSIDE)}
    inside = {k: v for k, v in found.items() if k.endswith(INSIDE)}
    total = sum(us for _, us in sent.values()) or 1
    lines = [f"  {'command or script':40} {'calls/im':>8} {'µs/im':>8} {'µs/call':>8} {'share':>6}"]
    for group in (sent, inside):
        for name, (calls, us) in sorted(group.items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append(f"  {name:40} {calls / images:8.2f} {us / images:8.1f} "
                         f"{us / max(calls, 1):8.1f} {us / total:6.1%}")
        if group is sent:
            lines.append(f"  {'all sent':40} {sum(c for c, _ in sent.values()) / images:8.2f} "
                         f"{total / images:8.1f}" + ("   (SLOWLOG full: the oldest are missing)"
                                                     if truncated else ""))
    return "\n".join(lines)
