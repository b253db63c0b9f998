"""The worker's Prometheus metrics, on their own registry (served with the probes on the
metrics port: worker/probes.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LONG = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class WorkerMetrics:
    """One instance per worker process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.images = Counter("ddpm_worker_images", "Final images produced", ["model"],
                              registry=r)
        self.steps = Counter("ddpm_worker_slot_steps", "Denoising steps done, summed over slots",
                             ["model"], registry=r)
        self.jobs = Counter("ddpm_worker_jobs", "Jobs ended, by outcome", ["outcome"], registry=r)
        self.forward = Histogram("ddpm_worker_unet_forward_seconds",
                                 "Host time of one batched step (UNet forward + sampler update)",
                                 ["model"], buckets=_SECONDS, registry=r)
        self.occupancy = Histogram("ddpm_worker_batch_occupancy",
                                   "Active slots / max batch, sampled every step",
                                   buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.active = Gauge("ddpm_worker_active_slots", "Slots running now", registry=r)
        self.waiting = Gauge("ddpm_worker_waiting_images", "Admitted images not started yet",
                             registry=r)
        self.queue_wait = Histogram("ddpm_worker_queue_wait_seconds",
                                    "Enqueue to start of a job", buckets=_LONG, registry=r)
        self.duration = Histogram("ddpm_worker_job_duration_seconds",
                                  "Start to end of a job, by outcome", ["outcome"],
                                  buckets=_LONG, registry=r)
        self.model_load = Gauge("ddpm_worker_model_load_seconds", "Time to load each model",
                                ["model"], registry=r)
        self.oom = Counter("ddpm_worker_oom", "Out-of-memory errors absorbed by chunking",
                           ["model"], registry=r)
        self.webhook_deliveries = Counter(
            "ddpm_worker_webhook_deliveries", "Webhook deliveries ended, by outcome "
            "(delivered, rejected, gave_up, dropped)", ["outcome"], registry=r)
        self.webhook_attempts = Counter(
            "ddpm_worker_webhook_attempts", "Webhook HTTP attempts, by result "
            "(2xx, 3xx, 4xx, 5xx, timeout, error)", ["result"], registry=r)
        self.snapshots_dropped = Counter(
            "ddpm_worker_snapshots_dropped", "Snapshot frames dropped (a newer frame of the "
            "same image replaced them) because the event writer fell behind", registry=r)
        self.writer_pending = Gauge(
            "ddpm_worker_writer_pending_bytes", "Frames and events on their way to Redis",
            registry=r)
        self.writer_waits = Counter(
            "ddpm_worker_writer_waits", "Loop passes that waited for the writer instead of "
            "stepping (it was behind)", registry=r)
        self.redis_full = Counter(
            "ddpm_worker_redis_full", "Writes Redis refused for want of memory (maxmemory), "
            "held and retried", registry=r)
        self.resume_writes = Counter(
            "ddpm_worker_resume_states", "Resume states written, by when (drain, checkpoint)",
            ["when"], registry=r)
        self.resume_seconds = Histogram(
            "ddpm_worker_checkpoint_seconds", "Host time of one checkpoint: export and "
            "encode of every long job's state", buckets=_SECONDS, registry=r)
        self.resumed = Counter(
            "ddpm_worker_resumed_jobs", "Jobs taken with a resume state, by outcome (resumed, "
            "refused: it did not fit the job and was deleted)", ["outcome"], registry=r)
        self.gpu_memory = Gauge("ddpm_worker_gpu_memory_bytes", "CUDA memory, by kind",
                                ["kind"], registry=r)
