"""rq-dashboard (0.9) for this project's Redis: `python -m ddpm.rqdashboard -u REDIS_URL
[-b 127.0.0.1 -p 9181 ...]` (every rq-dashboard option; `-j` is added).

Why not plain `rq-dashboard -j`: its `-j` reaches queues and jobs, but the workers page and
`/<n>/data/workers.json` build `Worker.all(connection)` without it. RQ 3 then reads a busy
worker's current job (the first of the executions it lists under
`rq:worker:{name}:executions`) with the pickle serializer, and `get_call_string()` fails on
our JSON payloads (`DeserializationError`): a 500 while any worker is busy. Nothing a worker
stores can avoid that short of hiding its executions from RQ (which `rq info`, the
stop commands and the maintenance pass rely on), so this runs rq-dashboard with its
workers read through the JSON serializer too. Needs `pip install rq-dashboard` (the
`dashboard` extra)."""

from __future__ import annotations

import sys
from typing import Any

from rq import Worker

from contract.keys import SERIALIZER


class JsonWorker(Worker):
    """RQ's Worker, hydrated with the jobs' serializer unless told otherwise."""

    @classmethod
    def all(cls, *args: Any, **kwargs: Any) -> list[Any]:  # type: ignore[override]
        if kwargs.get("serializer") is None:
            kwargs["serializer"] = SERIALIZER
        return super().all(*args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    try:
        from rq_dashboard import cli, web
    except ImportError:
        sys.exit("rq-dashboard is not installed: pip install 'rq-dashboard>=0.9,<0.10'")
    web.Worker = JsonWorker            # the workers page and workers.json
    args = list(sys.argv[1:] if argv is None else argv)
    if "-j" not in args and "--json" not in args:
        args.append("--json")
    cli.run(args=args, prog_name="python -m ddpm.rqdashboard",
            auto_envvar_prefix="RQ_DASHBOARD")


if __name__ == "__main__":
    main()
