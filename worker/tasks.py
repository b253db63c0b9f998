"""The function RQ records for generation jobs (`contract.JOB_FUNC`).

`ddpm worker` never calls it: it reads the spec from the job and batches it with others.
A plain `rq worker` that picks such a job up fails it with this explanation instead of
running one image batch at a time behind the real workers' backs.
"""

from __future__ import annotations

from typing import Any, NoReturn


def generate(**spec: Any) -> NoReturn:
    raise RuntimeError("generation jobs run on `ddpm worker` (continuous batching), "
                       "not on a plain RQ worker")
