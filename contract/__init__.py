"""What the API, the worker, training and the CLI share, free of torch and NumPy at import.

- `limits`: every bound of a request and the names of its choices
- `preview`: how snapshot frames are made and what they cost
- `spec`: the request spec (`GenerationSpec`), `ModelInfo`
- `rules`: the rules between a request's fields, declared once (validators, OpenAPI, CLI)
- `frame_plan`: which steps make snapshot frames (one rule); a job's `FramePlan`
- `keys`: every `ddpm:*` Redis key name, and the RQ queue and function names
- `events`: the event kinds and the one stream-entry codec
- `inputs`: input images decoded safely and fitted to a model (also training's fitting)
- `queueing`: enqueueing and reading jobs as RQ jobs (the API's one door to RQ)
- `workers`: the workers' advertisements
- `resume`: a running job's resume state as bytes (layout, checks, size bound)
- `redis_errors`: telling a full Redis from a lost one

Packages depend on it, never the other way: it imports nothing of the project
(tests/test_layout.py).
"""
