"""Which S3 client should the worker upload results with, and the API presign with?

Each candidate (boto3, minio, obstore) uploads the same images to a moto S3 server run as
its own process (`moto_server`: its CPU is not ours) over HTTP on this machine, one PUT
at a time, and presigns GET URLs; measured in the same run:

  - `mnist`:  a 28x28 grey PNG of noisy content (~1-2 KB, an MNIST model's final image);
  - `256`:    a 256x256 RGB PNG of a smooth image plus noise (~150 KB, a 256² model's).

Per image: the median and p90 wall time of one upload, and this process's CPU per upload
(user + system, over all uploads: the client's own cost; the server's is apart); per
presigned URL: the CPU of one `presign` (no network for any of them: minio is given its
region so it does not ask the server). Then each library's installed weight: its
distribution and every distribution it requires (recursively), files and bytes, as
installed in this environment.

    python -m bench.results_store                     # ~30 s on 2 cores
    python -m bench.results_store --uploads 50        # quicker

Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from importlib import metadata

import numpy as np
from PIL import Image

BUCKET = "bench"
KEY, SECRET, REGION = "testing", "testing", "us-east-1"


def images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    digit = np.clip(rng.normal(0, 60, (28, 28)) + 128, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(digit, "L").save(buf, format="PNG")
    out["mnist"] = buf.getvalue()
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    smooth = np.stack([np.sin(6 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1)
    pixels = np.clip((smooth * 0.5 + 0.5) * 255 + rng.normal(0, 10, (256, 256, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buf, format="PNG")
    out["256"] = buf.getvalue()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Candidate:
    name = ""
    dist = ""

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def presign(self, key: str) -> str:
        raise NotImplementedError


class Boto3(Candidate):
    name = dist = "boto3"

    def __init__(self, endpoint: str) -> None:
        import boto3

        self.c = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY,
                              aws_secret_access_key=SECRET, region_name=REGION)
        self.c.create_bucket(Bucket=BUCKET)

    def put(self, key: str, data: bytes) -> None:
        self.c.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType="image/png")

    def presign(self, key: str) -> str:
        return str(self.c.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=3600))


class MinIO(Candidate):
    name = dist = "minio"

    def __init__(self, endpoint: str) -> None:
        from minio import Minio

        self.c = Minio(endpoint.removeprefix("http://"), access_key=KEY, secret_key=SECRET,
                       secure=False, region=REGION)
        if not self.c.bucket_exists(BUCKET):
            self.c.make_bucket(BUCKET)

    def put(self, key: str, data: bytes) -> None:
        self.c.put_object(BUCKET, key, io.BytesIO(data), len(data), content_type="image/png")

    def presign(self, key: str) -> str:
        return str(self.c.presigned_get_object(BUCKET, key, expires=timedelta(hours=1)))


class Obstore(Candidate):
    name = dist = "obstore"

    def __init__(self, endpoint: str) -> None:
        import obstore
        from obstore.store import S3Store

        self.obstore = obstore
        self.s = S3Store(BUCKET, endpoint=endpoint, access_key_id=KEY,
                         secret_access_key=SECRET, region=REGION,
                         client_options={"allow_http": True})

    def put(self, key: str, data: bytes) -> None:
        self.obstore.put(self.s, key, data)

    def presign(self, key: str) -> str:
        return str(self.obstore.sign(self.s, "GET", key, timedelta(hours=1)))


CANDIDATES: dict[str, Callable[[str], Candidate]] = {
    "boto3": Boto3, "minio": MinIO, "obstore": Obstore}


def weight(dist: str) -> tuple[int, int, int]:
    """(distributions, files, bytes) of `dist` and everything it requires, installed."""
    seen: set[str] = set()
    todo = [dist]
    files = size = 0
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            d = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for f in d.files or []:
            p = f.locate()
            if os.path.isfile(p):
                files += 1
                size += os.path.getsize(p)
        todo += [r for r in d.requires or [] if "extra ==" not in r]
    return len(seen), files, size


def measure(c: Candidate, data: bytes, n: int) -> tuple[float, float, float]:
    """(median ms, p90 ms, CPU ms) per upload of `data`."""
    for i in range(5):                              # warm: connections, signing keys
        c.put(f"warm/{i}", data)
    walls = []
    cpu0 = time.process_time()
    for i in range(n):
        t = time.perf_counter()
        c.put(f"job{i}/0.png", data)
        walls.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu0) / n
    walls.sort()
    return statistics.median(walls) * 1e3, walls[int(0.9 * n)] * 1e3, cpu * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uploads", type=int, default=200)
    ap.add_argument("--presigns", type=int, default=2000)
    ap.add_argument("--libs", default=",".join(CANDIDATES))
    args = ap.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        imgs = images()
        print("images: " + ", ".join(f"{k} {len(v)} B" for k, v in imgs.items()))
        print(f"{'library':10} {'image':6} {'p50 ms':>7} {'p90 ms':>7} {'CPU ms':>7}")
        presign = {}
        for lib in args.libs.split(","):
            c = CANDIDATES[lib](endpoint)
            for name, data in imgs.items():
                p50, p90, cpu = measure(c, data, args.uploads)
                print(f"{lib:10} {name:6} {p50:7.2f} {p90:7.2f} {cpu:7.2f}")
            cpu0 = time.process_time()
            for i in range(args.presigns):
                c.presign(f"job{i}/0.png")
            presign[lib] = (time.process_time() - cpu0) / args.presigns * 1e6
        print(f"\n{'library':10} {'presign µs':>10} {'dists':>6} {'files':>6} {'MB':>7}")
        for lib, us in presign.items():
            dists, files, size = weight(CANDIDATES[lib].dist)
            print(f"{lib:10} {us:10.1f} {dists:6d} {files:6d} {size / 2**20:7.1f}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
