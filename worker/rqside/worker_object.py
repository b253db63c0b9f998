"""RQ's worker object, kept for what RQ's tools see of a worker: registration, state,
heartbeat, maintenance and the `rq` command channel. It never runs a job.

`RqSide` (side.py) holds one. RQ's `BaseWorker.work()` is never called: the batching
loop (loop.py) owns the process, its signals and its pace, and talks to RQ only through
`RqSide`. What this subclass changes of RQ's worker, each for a reason stated where it is:
the execution TTL, the command listener's poll and stop, `stop-job` for any running job,
registry cleaning under a short lock, quiet group cleaning, canceled-job expiry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from redis import Redis

from . import registries
from .surface import BaseWorker, Job, handle_command, now, parse_payload

log = logging.getLogger("ddpm.worker")

# Seconds RQ's command listener waits at a time (RQ: 60): how long stopping it can take.
PUBSUB_POLL = 0.5
PUBSUB_JOIN = 5.0           # seconds shutdown waits for that listener at most


class RqWorker(BaseWorker):
    """RQ's view of a batching worker (see the module docstring)."""

    def __init__(self, queues: list[str], *, name: str | None, connection: Redis,
                 serializer: Any, job_class: type[Job], worker_ttl: int,
                 maintenance_interval: int, heartbeat_interval: float, result_ttl: int,
                 execution_ttl: int,
                 on_stop_job: Callable[[str], bool], on_stop_execution: Callable[[str], bool]
                 ) -> None:
        super().__init__(queues, name=name, connection=connection, serializer=serializer,
                         job_class=job_class, worker_ttl=worker_ttl,
                         maintenance_interval=maintenance_interval,
                         job_monitoring_interval=int(heartbeat_interval),
                         default_result_ttl=result_ttl)
        self.execution_ttl = execution_ttl
        self.result_ttl = result_ttl
        self.stop_job_hook = on_stop_job
        self.stop_execution_hook = on_stop_execution

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Executions expire `execution_ttl` after the last beat, whatever the job timeout:
        the side thread beats all of them, and a dead worker's jobs come back quickly."""
        return self.execution_ttl

    # -- the command channel -----------------------------------------------------------

    def subscribe(self) -> None:
        """RQ's listener for `rq` commands (stop-job...), waiting PUBSUB_POLL s at a time
        instead of RQ's 60 s, so that stopping it never waits long (see `unsubscribe`)."""
        self.log.info("Worker %s: subscribing to channel %s", self.name,
                      self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=PUBSUB_POLL, daemon=True,
            exception_handler=self._pubsub_exception_handler)

    def unsubscribe(self) -> None:
        """Stop the listener without waiting on its timeout. RQ's sends UNSUBSCRIBE, then
        stops the thread: when the thread reads that reply first, it has no subscription
        left, so its next `get_message` waits for one (`subscribed_event.wait(60)`), and
        `PubSubWorkerThread.stop()` joins it (redis-py 8: without a timeout), so a SIGTERMed
        worker took up to 60 s to exit (4 runs in 20). Here the thread is stopped while still
        subscribed and waits PUBSUB_POLL s at a time, so it leaves within that; closing its
        connection ends the subscription."""
        thread, pubsub = self.pubsub_thread, self.pubsub
        if thread is None or pubsub is None:
            return
        log.debug("unsubscribing from channel %s", self.pubsub_channel_name)
        self.pubsub_thread = None
        thread.stop()                   # clears its flag (redis-py 8 also joins it)
        thread.join(timeout=PUBSUB_JOIN)
        if thread.is_alive():           # a handler still running: the thread is a daemon
            log.warning("RQ's command listener did not stop within %.0fs", PUBSUB_JOIN)
        else:
            pubsub.close()              # done by the thread as it ends; harmless twice

    def handle_payload(self, message: dict[str, Any]) -> None:
        """`rq`'s commands (pubsub thread). RQ answers stop-job only for the worker's one
        "current job" (`get_current_job_id`: the first of its executions), so it ignored
        every other job this worker runs: here stop-job stops any job running here."""
        payload = parse_payload(message)
        if payload.get("command") == "stop-job":
            job_id = str(payload.get("job_id") or "")
            if self.stop_job_hook(job_id):
                log.info("stop-job: stopping job %s", job_id)
            else:
                log.warning("stop-job: job %s is not running on this worker; ignored", job_id)
        else:
            handle_command(self, payload)

    def request_stop_execution(self, execution_id: str) -> None:
        """`rq`'s stop-execution command (RQ's handle_command, pubsub thread)."""
        if not self.stop_execution_hook(execution_id):
            log.warning("stop-execution: %s is not running on this worker; ignored",
                        execution_id)

    def note_stop_requested(self) -> None:
        """The loop was asked to stop: RQ's own record of it (no I/O: a signal handler)."""
        self._stop_requested = True
        self._shutdown_requested_date = now()

    # -- maintenance -------------------------------------------------------------------

    def postpone_maintenance(self) -> None:
        """No maintenance for one interval from now (after Redis was unreachable or full:
        every worker renews its executions first, so none looks abandoned)."""
        self.last_cleaned_at = now()

    def clean_registries(self) -> None:
        """RQ's pass, with a short-lived lock (registries.clean_registries)."""
        registries.clean_registries(self.connection, self.queues, self._exc_handlers, self,
                                       max(10, self.maintenance_interval))
        self.last_cleaned_at = now()

    def clean_group_registries(self) -> None:
        """RQ's group pass, quietly (registries.clean_group_registries)."""
        registries.clean_group_registries(self.connection,
                                             max(self.maintenance_interval - 1, 1))

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()  # type: ignore[no-untyped-call]
        registries.clean_canceled(self.connection, self.queues, self.result_ttl)
