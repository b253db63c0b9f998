"""Every Redis key name of the project's own (`ddpm:*`), and the RQ names it gives jobs and
queues: API, worker and tools build keys only from here."""

from __future__ import annotations

from .limits import Priority

# RQ and Redis names.

JOB_FUNC = "worker.tasks.generate"   # what RQ records as the job's function
SERIALIZER = "json"                  # RQ serializer alias: payloads are data, never pickles
PREFIX = "ddpm"


def queue_name(model: str, priority: Priority = "normal") -> str:
    """One RQ queue per (model, priority): a job only reaches workers holding its model."""
    return f"{PREFIX}.{model}.{priority}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}:events:{job_id}"


def input_key(job_id: str, field: str) -> str:
    """A job's fitted input image (INPUT_FIELDS), written with the job, same TTL."""
    return f"{PREFIX}:input:{job_id}:{field}"


def image_key(job_id: str, index: int) -> str:
    return f"{PREFIX}:image:{job_id}:{index}"


def resume_key(job_id: str) -> str:
    """A running job's resume state (contract/resume.py): one value, written on drain or
    checkpoint, read by the worker that takes the job next."""
    return f"{PREFIX}:resume:{job_id}"


def worker_key(worker_name: str) -> str:
    return f"{PREFIX}:workers:{worker_name}"


# The work signal (contract/work.py): each queued job's cost in image-steps, one value per
# job written with it at enqueue (rewritten with what is left when a drain re-queues it),
# expiring with the job's results; and the last rate each model's workers measured.

def cost_key(job_id: str) -> str:
    """The job's image-steps still to run once a worker takes it (an integer)."""
    return f"{PREFIX}:cost:{job_id}"


THROUGHPUT = f"{PREFIX}:throughput"   # hash: model → JSON of its last measured rate
KNOWN_MODELS = f"{PREFIX}:models:known"   # hash: model → JSON of its ModelInfo, as last served


# Idle workers block on their models' wake lists (BLPOP) instead of polling the queues:
# every enqueue of ours pushes a token (`wake_commands`), bounded and expiring, so a token
# nobody waits for costs nothing. Jobs enqueued by other tools (plain RQ) push none: an idle
# worker still looks at the queues every WAKE_TIMEOUT seconds.
WAKE_MAXLEN = 64
WAKE_TTL = 60
WAKE_TIMEOUT = 0.25


def wake_key(model: str) -> str:
    return f"{PREFIX}:wake:{model}"


# Live workers by name, scored by when their advertisement expires: readers find the
# advertisements without SCANning the whole keyspace (a SCAN per POST grew with every job's
# keys: 47 ms per submission with 100k keys in Redis, bench/api_overhead.py --prefill-keys).
WORKERS_INDEX = f"{PREFIX}:workers"


# The event stream: one Redis Stream per job; each entry is {"type", "data" (JSON), "png"?}.

def frames_key(job_id: str) -> str:
    """The job's snapshot ledger: a list of "<stream id> <bytes>", oldest first, and a
    counter of their bytes (`frames_key(job) + ":bytes"`), so frames are trimmed by bytes."""
    return f"{PREFIX}:frames:{job_id}"


# Ended jobs whose snapshot frames are deleted at their score (epoch seconds): snapshot
# entries expire `snapshot_ttl` after the job ends, sooner than its results.
FRAMES_EXPIRING = f"{PREFIX}:frames:expiring"


# The API's admission records (app/admission.py): idempotency replays, the per-caller
# rate window, the caller's job listing.

def idempotency_key(owner: str, digest: str) -> str:
    """An Idempotency-Key's job (digest: sha256 of the caller's key)."""
    return f"{PREFIX}:idem:{owner}:{digest}"


def rate_key(client: str, window_index: int) -> str:
    """The caller's submissions in one fixed rate window."""
    return f"{PREFIX}:rate:{client}:{window_index}"


def jobs_index_key(owner: str) -> str:
    """The caller's jobs (a sorted set of job ids scored by creation time in µs)."""
    return f"{PREFIX}:jobs:{owner}"
