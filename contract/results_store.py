"""Final images and the inputs the model saw, in S3-compatible object storage.

Off by default (results stay in Redis). With `DDPM_RESULTS_URL=s3://bucket/prefix` the
worker uploads each job's final PNGs and its input images under the prefix, and Redis
keeps, under the same keys (`image_key`, `input_key`), the object's URL instead of its
bytes (a *pointer*: `s3://bucket/prefix/{job}/images/{i}.png`): every reader that asked
"is the image there" (EXISTS) still can, and a value tells which it holds by the PNG
signature. Snapshot frames stay in the job's stream (live previews, expiring).

The store is reached with obstore (Rust's `object_store` behind a small Python API; the
fewest dependencies and the least CPU per upload of the clients measured: BENCHMARKS.md,
`bench/results_store.py`), configured the standard way: `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION` are read by the library
from the environment, never by our settings. An upload is retried with backoff for
`retry_for` seconds, then raises `ResultStoreError` ("result store unavailable: …").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCHEME = "s3://"
BACKOFF = (0.1, 2.0)         # seconds between upload attempts: first, most
CONNECT_TIMEOUT = "5s"       # one attempt's connect; ...
REQUEST_TIMEOUT = "60s"      # ... and whole request (a slow store is waited for, bounded)


class ResultStoreError(Exception):
    """The store refused or did not answer for the whole retry time."""


def is_pointer(value: bytes) -> bool:
    """Whether a stored image value is an object's URL (else it is the PNG itself)."""
    return value.startswith(SCHEME.encode())


def image_object(job_id: str, index: int) -> str:
    """A final image's object name, under the store's prefix."""
    return f"{job_id}/images/{index}.png"


def input_object(job_id: str, field: str) -> str:
    """An input image's object name (the PNG the API stored, as the model saw it)."""
    return f"{job_id}/inputs/{field}.png"


@dataclass(frozen=True)
class ResultsUrl:
    """`s3://bucket/prefix`, parsed (the prefix may be empty)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> ResultsUrl:
        if not url.startswith(SCHEME):
            raise ValueError(f"DDPM_RESULTS_URL must look like s3://bucket/prefix, not {url!r}")
        bucket, _, prefix = url[len(SCHEME):].partition("/")
        if not bucket:
            raise ValueError(f"DDPM_RESULTS_URL names no bucket: {url!r}")
        return cls(bucket, prefix.strip("/"))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


class ResultStore:
    """One bucket and prefix: upload (retried), read, presign; object names relative to
    the prefix (`image_object`, `input_object`). `public_endpoint`: the store's address
    as clients reach it, which presigned URLs name (a signature covers the host), when it
    is not the one this process reaches it at (AWS_ENDPOINT_URL)."""

    def __init__(self, url: str, *, retry_for: float = 30.0,
                 public_endpoint: str | None = None) -> None:
        from obstore.store import S3Store

        self.url = ResultsUrl.parse(url)
        self.retry_for = retry_for
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self._store = S3Store(
            self.url.bucket, prefix=self.url.prefix or None,
            client_options={"allow_http": bool(endpoint and endpoint.startswith("http://")),
                            "connect_timeout": CONNECT_TIMEOUT, "timeout": REQUEST_TIMEOUT},
            retry_config={"max_retries": 0})      # ours: bounded by retry_for, logged
        self._signer = self._store if not public_endpoint else S3Store(
            self.url.bucket, prefix=self.url.prefix or None, endpoint=public_endpoint,
            client_options={"allow_http": public_endpoint.startswith("http://")})

    def pointer(self, name: str) -> bytes:
        """What Redis keeps for the object `name`: its URL."""
        return f"{self.url}/{name}".encode()

    def name_of(self, pointer: bytes) -> str:
        """The object name a pointer of this store's names; ValueError for another's."""
        text = pointer.decode("utf-8", "replace")
        base = f"{self.url}/"
        if not text.startswith(base):
            raise ValueError(f"{text!r} is not under this service's DDPM_RESULTS_URL {self.url}")
        return text[len(base):]

    def put(self, name: str, data: bytes) -> None:
        """Upload `data` (a PNG) as `name`, retried with backoff for `retry_for` seconds;
        then ResultStoreError."""
        import obstore

        deadline = time.monotonic() + self.retry_for
        delay = BACKOFF[0]
        while True:
            try:
                obstore.put(self._store, name, data, attributes={"Content-Type": "image/png"})
                return
            except Exception as e:     # refused, unreachable, timed out: all retried
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResultStoreError(f"result store unavailable: {_short(e)}") from e
                time.sleep(min(delay, left))
                delay = min(BACKOFF[1], delay * 2)

    def get(self, name: str) -> bytes:
        """The object's bytes; ResultStoreError if it cannot be read."""
        import obstore

        try:
            return bytes(obstore.get(self._store, name).bytes())
        except Exception as e:
            raise ResultStoreError(f"result store unavailable: {_short(e)}") from e

    async def aget(self, name: str) -> bytes:
        """`get` on the event loop (obstore's own async client)."""
        import obstore

        try:
            result = await obstore.get_async(self._store, name)
            return bytes(await result.bytes_async())
        except Exception as e:
            raise ResultStoreError(f"result store unavailable: {_short(e)}") from e

    def origin(self) -> str:
        """`scheme://host[:port]` of the presigned URLs (what a page's CSP must allow)."""
        url = self.presign("x", 1)
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}"

    def presign(self, name: str, ttl: int) -> str:
        """A GET URL of the object valid `ttl` seconds (signed here: no request made)."""
        import obstore

        return str(obstore.sign(self._signer, "GET", name, timedelta(seconds=ttl)))


def _short(e: BaseException) -> str:
    """An error's first line (obstore's messages carry the whole request chain)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
