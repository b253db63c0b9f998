"""The HTTP API (FastAPI): validates requests against `contract`, enqueues them on
RQ, and reads jobs, event streams and images back from Redis. Never imports torch
(ARCHITECTURE.md): its container image has none."""
