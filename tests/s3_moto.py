"""A real S3 API for tests: moto's server over HTTP on a free port, and a gate in front of
it that holds uploads (a store that is slow for as long as a test says)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

KEY, SECRET, REGION = "testing", "testing", "us-east-1"


class MotoS3:
    """moto's S3 on 127.0.0.1 (`endpoint`), with an admin client (`admin`, boto3)."""

    def __init__(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        _, port = self.server.get_host_and_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.admin: Any = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY,
                                       aws_secret_access_key=SECRET, region_name=REGION)

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The standard variables a process reaches this store with (or through `endpoint`)."""
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION}

    def bucket(self, name: str) -> str:
        """A new bucket whose objects any web page may read (CORS), as a page needs."""
        self.admin.create_bucket(Bucket=name)
        self.admin.put_bucket_cors(Bucket=name, CORSConfiguration={"CORSRules": [
            {"AllowedMethods": ["GET"], "AllowedOrigins": ["*"], "AllowedHeaders": ["*"]}]})
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        out = {}
        for o in self.admin.list_objects_v2(Bucket=bucket).get("Contents", []):
            out[o["Key"]] = self.admin.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        self.server.stop()


class Gate:
    """A TCP relay to `target` port that holds every upload (a request starting `PUT `)
    while closed: the store is slow until `open()`. `held` counts uploads that waited."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self._open = threading.Event()
        self.held = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def open(self) -> None:
        self._open.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(65536):
                if requests and data.startswith(b"PUT ") and not self._open.is_set():
                    self.held += 1
                    self._open.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._open.set()
        self._sock.close()


@contextmanager
def moto_s3() -> Iterator[MotoS3]:
    s3 = MotoS3()
    try:
        yield s3
    finally:
        s3.stop()
