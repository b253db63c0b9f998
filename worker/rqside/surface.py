"""Every name of RQ and redis-py the RQ side (worker/rqside/, redis_batch.py) relies on, and
the one place in worker/ that imports rq: the other modules of this package take RQ's names
from here, so an RQ upgrade is read starting from one import block and one table.

tests/worker/test_surface.py checks each name of `SURFACE` against the installed, pinned RQ
(pyproject: `rq>=3.0,<3.1`): it exists, is of the kind stated, and takes the parameters named
where a call passes them by name; the hash and stream fields layout.py writes by hand are
checked there against what RQ's own methods write. Upgrading RQ: run that test first; every
name it reports is a place in worker/rqside/ to read again. Private (`_`) names carry why we
use them; the test also checks that no other worker module imports rq or uses them.
"""

from __future__ import annotations

from typing import NamedTuple

from rq import worker_registration
from rq.command import handle_command, parse_payload
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE, Execution, ExecutionRegistry
from rq.group import Group
from rq.job import Job, JobStatus, parse_job_id, validate_job_id
from rq.queue import Queue
from rq.registry import BaseRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.registry import clean_registries as rq_clean_registries
from rq.results import Result
from rq.serializers import resolve_serializer
from rq.utils import current_timestamp, now, utcformat
from rq.worker.base import BaseWorker, WorkerStatus

__all__ = [
    "PRIVATE",
    "SURFACE",
    "WORKER_EXECUTIONS_KEY_TEMPLATE",
    "BaseRegistry",
    "BaseWorker",
    "Execution",
    "ExecutionRegistry",
    "FinishedJobRegistry",
    "Group",
    "Job",
    "JobStatus",
    "Name",
    "Queue",
    "Result",
    "StartedJobRegistry",
    "WorkerStatus",
    "current_timestamp",
    "handle_command",
    "now",
    "parse_job_id",
    "parse_payload",
    "resolve_serializer",
    "rq_clean_registries",
    "utcformat",
    "validate_job_id",
    "worker_registration",
]


class Name(NamedTuple):
    """`module:qualname` of one name we use. kind: "callable" (with the parameter names
    our calls pass by keyword or position) or "attribute" (on the class or an instance)."""

    module: str
    qualname: str
    kind: str
    params: tuple[str, ...] = ()
    why: str = ""


C, A = "callable", "attribute"

SURFACE: tuple[Name, ...] = (
    # -- the worker object (worker_object.py): registration, state, commands, maintenance ----
    Name("rq.worker.base", "BaseWorker.__init__", C,
         ("queues", "name", "connection", "serializer", "job_class", "worker_ttl",
          "maintenance_interval", "job_monitoring_interval", "default_result_ttl")),
    Name("rq.worker.base", "BaseWorker.bootstrap", C, ("logging_level",)),
    Name("rq.worker.base", "BaseWorker.teardown", C),
    Name("rq.worker.base", "BaseWorker.heartbeat", C, ("timeout", "pipeline")),
    Name("rq.worker.base", "BaseWorker.set_state", C, ("state", "pipeline")),
    Name("rq.worker.base", "BaseWorker.serialize", C),
    Name("rq.worker.base", "BaseWorker.key", A),
    Name("rq.worker.base", "BaseWorker.name", A),
    Name("rq.worker.base", "BaseWorker.queues", A),
    Name("rq.worker.base", "BaseWorker.executions", A),
    Name("rq.worker.base", "BaseWorker.job_monitoring_interval", A),
    Name("rq.worker.base", "BaseWorker.default_result_ttl", A),
    Name("rq.worker.base", "BaseWorker.last_cleaned_at", A),
    Name("rq.worker.base", "BaseWorker.should_run_maintenance_tasks", A),
    Name("rq.worker.base", "BaseWorker.run_maintenance_tasks", C),
    Name("rq.worker.base", "BaseWorker.clean_registries", C),
    Name("rq.worker.base", "BaseWorker.clean_group_registries", C),
    Name("rq.worker.base", "BaseWorker.get_heartbeat_ttl", C, ("job", "working_time")),
    Name("rq.worker.base", "BaseWorker.subscribe", C),
    Name("rq.worker.base", "BaseWorker.unsubscribe", C),
    Name("rq.worker.base", "BaseWorker.handle_payload", C, ("message",)),
    Name("rq.worker.base", "BaseWorker.request_stop_execution", C, ("execution_id",)),
    Name("rq.worker.base", "BaseWorker.pubsub", A),
    Name("rq.worker.base", "BaseWorker.pubsub_thread", A),
    Name("rq.worker.base", "BaseWorker.pubsub_channel_name", A),
    Name("rq.worker.base", "BaseWorker.cleanup_execution", C, ("job", "pipeline", "execution")),
    Name("rq.worker.base", "BaseWorker.handle_job_failure", C,
         ("job", "queue", "exc_string", "execution")),
    Name("rq.worker.base", "BaseWorker._pubsub_exception_handler", C,
         ("exc", "pubsub", "pubsub_thread"),
         "RQ's reconnecting handler, reused by our shorter-polling listener (subscribe)"),
    Name("rq.worker.base", "BaseWorker._stopped_job_id", A,
         why="how handle_job_failure tells `stopped` from `failed` (RqSide.fail)"),
    Name("rq.worker.base", "BaseWorker._stop_requested", A,
         why="RQ's record of a warm shutdown request (RqWorker.note_stop_requested)"),
    Name("rq.worker.base", "BaseWorker._shutdown_requested_date", A,
         why="as _stop_requested; RQ reads it back for `shutdown_requested_date`"),
    Name("rq.worker.base", "BaseWorker._exc_handlers", A,
         why="RQ's exception handlers, passed to rq.registry.clean_registries as RQ does"),
    Name("rq.worker.base", "BaseWorker._finalize_success", C,
         ("job", "queue", "execution", "return_value"),
         "RQ's whole success path, for jobs with dependents, repeats or callbacks"),
    Name("rq.worker.base", "WorkerStatus.IDLE", A),
    Name("rq.worker.base", "WorkerStatus.BUSY", A),
    Name("rq.command", "handle_command", C, ("worker", "payload")),
    Name("rq.command", "parse_payload", C, ("payload",)),
    # -- jobs ---------------------------------------------------------------------------
    Name("rq.job", "Job.__init__", C, ("id", "connection", "serializer")),
    Name("rq.job", "Job.restore", C, ("raw_data",)),
    Name("rq.job", "Job.key_for", C, ("job_id",)),
    Name("rq.job", "Job.redis_job_namespace_prefix", A),
    Name("rq.job", "Job.key", A),
    Name("rq.job", "Job.dependents_key", A),
    Name("rq.job", "Job.origin", A),
    Name("rq.job", "Job.func_name", A),
    Name("rq.job", "Job.args", A),
    Name("rq.job", "Job.kwargs", A),
    Name("rq.job", "Job.meta", A),
    Name("rq.job", "Job.webhooks", A),
    Name("rq.job", "Job.enqueued_at", A),
    Name("rq.job", "Job.started_at", A),
    Name("rq.job", "Job.ended_at", A),
    Name("rq.job", "Job.retries_left", A),
    Name("rq.job", "Job.repeats_left", A),
    Name("rq.job", "Job.should_retry", A),
    Name("rq.job", "Job.started_job_registry", A),
    Name("rq.job", "Job.finished_job_registry", A),
    Name("rq.job", "Job.heartbeat", C, ("timestamp", "ttl", "pipeline", "xx")),
    Name("rq.job", "Job.get_result_ttl", C, ("default_ttl",)),
    Name("rq.job", "Job.send_webhooks", C, ("status", "exc_string"),
         "overridden (jobs.BatchJob): RQ's own calls go to our sender"),
    Name("rq.job", "Job._serialize_meta", C, (),
         "RQ's encoding of `meta`, written by our writer in order with the progress event"),
    Name("rq.job", "Job._result", A,
         why="the return value _finalize_success stores (RQ's own success path)"),
    Name("rq.job", "Job._status", A,
         why="RQ's cached status, set as prepare_for_execution and RQ's success path set "
         "it (layout.py writes theirs in Redis)"),
    Name("rq.job", "Job._success_callback_name", A,
         why="a job with a success callback takes RQ's own success path"),
    Name("rq.job", "JobStatus.CANCELED", A),
    Name("rq.job", "JobStatus.FINISHED", A),
    Name("rq.job", "JobStatus.FAILED", A),
    Name("rq.job", "parse_job_id", C),
    Name("rq.job", "validate_job_id", C),
    # -- executions, queues, registries -------------------------------------------------
    Name("rq.executions", "Execution.__init__", C, ("id", "job_id", "connection", "worker_name")),
    Name("rq.executions", "Execution.created_at", A),
    Name("rq.executions", "Execution.last_heartbeat", A),
    Name("rq.executions", "Execution.id", A),
    Name("rq.executions", "WORKER_EXECUTIONS_KEY_TEMPLATE", A),
    Name("rq.executions", "Execution.heartbeat", C, ("started_job_registry", "ttl", "pipeline")),
    Name("rq.executions", "Execution.key", A),
    Name("rq.executions", "ExecutionRegistry.key_template", A),
    Name("rq.queue", "Queue.key", A),
    Name("rq.queue", "Queue.intermediate_queue_key", A),
    Name("rq.queue", "Queue.intermediate_queue", A),
    Name("rq.queue", "Queue.registry_cleaning_key", A),
    Name("rq.queue", "Queue.release_maintenance_lock", C),
    Name("rq.queue", "Queue.canceled_job_registry", A),
    Name("rq.queue", "Queue.failed_job_registry", A),
    Name("rq.queue", "Queue.count", A),
    Name("rq.queue", "Queue.enqueue_job", C, ("job", "pipeline", "at_front")),
    Name("rq.intermediate_queue", "IntermediateQueue.cleanup", C, ("worker", "queue")),
    Name("rq.registry", "StartedJobRegistry", C),
    Name("rq.registry", "FinishedJobRegistry", C),
    Name("rq.registry", "clean_registries", C, ("queue", "exception_handlers")),
    Name("rq.worker_registration", "clean_worker_registry", C, ("queue",)),
    Name("rq.group", "Group.acquire_maintenance_lock", C, ("connection", "timeout")),
    Name("rq.group", "Group.clean_registries", C, ("connection",)),
    Name("rq.utils", "now", C),
    Name("rq.utils", "utcformat", C),
    Name("rq.utils", "current_timestamp", C),
    # -- RQ's layout written by layout.py's scripts (the key names come from these;
    # -- the field names are layout.py's *_FIELDS, each checked against what these write:
    # -- tests/worker/test_rq_surface.py::test_the_fields_rq_layout_writes_are_rqs) ------
    Name("rq.executions", "Execution.serialize", C,
         why="its keys: layout.EXECUTION_FIELDS (Execution.create saves them)"),
    Name("rq.executions", "Execution.composite_key", A),
    Name("rq.executions", "ExecutionRegistry.add", C, ("execution", "ttl", "pipeline")),
    Name("rq.registry", "StartedJobRegistry.add_execution", C,
         ("execution", "pipeline", "ttl", "xx")),
    Name("rq.job", "Job.prepare_for_execution", C, ("worker_name", "pipeline"),
         "its HSET: layout.JOB_START_FIELDS"),
    Name("rq.job", "Job.to_dict", C, ("include_meta", "include_result"),
         "what Job._handle_success saves: layout.JOB_SUCCESS_FIELDS change"),
    Name("rq.job", "Job.__init__", C, ("id", "connection", "serializer"),
         "jobs.BatchJob resolves the serializer once (test_batch_jobs_are_rqs_jobs)"),
    Name("rq.serializers", "resolve_serializer", C, ("serializer",)),
    Name("rq.job", "Job.dependencies_key", A),
    Name("rq.job", "Job.rate_limit_key", A),
    Name("rq.job", "Job.serializer", A),
    Name("rq.job", "JobStatus.STARTED", A),
    Name("rq.results", "Result.get_key", C, ("job_id",)),
    Name("rq.results", "Result.serialize", C, why="its keys: layout.RESULT_FIELDS"),
    Name("rq.results", "Result.Type.SUCCESSFUL", A),
    # -- redis-py: the recording pipeline (contract/recorder.py) ------------------------
    Name("redis.client", "Pipeline.__init__", C,
         ("connection_pool", "response_callbacks", "transaction", "shard_hint")),
    Name("redis.client", "Pipeline.pipeline_execute_command", C,
         why="the staging hook every pipeline command goes through"),
    Name("redis.client", "Redis.response_callbacks", A),
    Name("redis.client", "Redis.connection_pool", A),
    Name("redis.client", "Redis.register_script", C, ("script",)),
    # -- redis-py: a script's arguments packed by hiredis, sent on a pooled connection
    # -- (redis_batch.evalsha), as Redis._execute_command sends a command -----------------
    Name("redis.client", "Redis.connection", A, why="None unless single_connection_client"),
    Name("redis.client", "Redis.evalsha", C),
    Name("redis.client", "Redis.script_load", C, ("script",)),
    Name("redis.connection", "ConnectionPool.get_connection", C),
    Name("redis.connection", "ConnectionPool.release", C, ("connection",)),
    Name("redis.connection", "AbstractConnection.send_packed_command", C, ("command",)),
    Name("redis.connection", "AbstractConnection.read_response", C),
    Name("redis.connection", "AbstractConnection.disconnect", C),
    Name("redis.connection", "AbstractConnection.retry", A),
    Name("redis.retry", "Retry.call_with_retry", C, ("do", "fail")),
    Name("hiredis", "pack_command", C),
)

PRIVATE = tuple(sorted({n.qualname.rsplit(".", 1)[-1] for n in SURFACE
                        if n.qualname.rsplit(".", 1)[-1].startswith("_")
                        and not n.qualname.endswith("__init__")}))
"""The private names the RQ side uses; nowhere else in worker/ may use one."""
