"""Rate limits count per caller: each API key, and when the API is open each client
address, has a window of its own. One counter shared by every caller would pass a test
with one client; here a caller at its limit must leave the others untouched.

No worker: an advertisement makes the API accept the model; the jobs stay queued.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis

from contract.workers import advertise_worker

BODY = {"model": "tiny", "steps": 2}
LIMIT = 2


def advertise(r: redis.Redis) -> None:
    doc = {"name": "paused", "draining": False,
           "models": [{"name": "tiny", "image_size": 16, "in_channels": 3,
                       "num_timesteps": 1000}]}
    advertise_worker(r, "paused", json.dumps(doc), 600, time.time())


def codes(c: httpx.Client, n: int, headers: dict[str, str]) -> list[int]:
    return [c.post("/v1/generations", json=BODY, headers=headers).status_code
            for _ in range(n)]


def test_each_api_key_has_its_own_window(start_api: Callable[..., Any],
                                          r: redis.Redis) -> None:
    keys = ("alice-rate-key", "bob-rate-key")
    digests = ",".join(hashlib.sha256(k.encode()).hexdigest() for k in keys)
    api = start_api({"DDPM_API_KEYS": digests, "DDPM_RATE_LIMIT": str(LIMIT),
                     "DDPM_RATE_WINDOW": "86400"})
    advertise(r)
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in keys)
    with httpx.Client(base_url=api.url, timeout=30) as c:
        assert codes(c, LIMIT + 1, alice) == [202] * LIMIT + [429]
        assert codes(c, LIMIT + 1, bob) == [202] * LIMIT + [429], \
            "another key's submissions spent this key's window"
        assert codes(c, 1, alice) == [429]


def test_each_client_address_has_its_own_window_when_open(start_api: Callable[..., Any],
                                                          r: redis.Redis) -> None:
    """Open API behind a trusted proxy: the client is X-Forwarded-For's address."""
    api = start_api({"DDPM_RATE_LIMIT": str(LIMIT), "DDPM_RATE_WINDOW": "86400",
                     "DDPM_TRUSTED_PROXIES": "127.0.0.1"})
    advertise(r)
    one, two = ({"X-Forwarded-For": a} for a in ("203.0.113.1", "203.0.113.2"))
    with httpx.Client(base_url=api.url, timeout=30) as c:
        assert codes(c, LIMIT + 1, one) == [202] * LIMIT + [429]
        assert codes(c, LIMIT + 1, two) == [202] * LIMIT + [429], \
            "another address's submissions spent this address's window"
