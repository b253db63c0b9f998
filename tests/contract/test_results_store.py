"""contract/results_store.py against a real S3 API (moto's server over HTTP): URLs parsed,
objects named, uploaded, read back, presigned for a plain HTTP client; a store that refuses
writes gives up after the bounded retry time, saying so."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from contract.results_store import (
    PNG_SIGNATURE,
    ResultStore,
    ResultStoreError,
    ResultsUrl,
    image_object,
    input_object,
    is_pointer,
)
from tests.s3_moto import MotoS3, moto_s3

PNG = PNG_SIGNATURE + b"not really an image, but bytes all the same"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    with moto_s3() as s:
        for k, v in s.env().items():        # as a process's environment would say
            monkeypatch.setenv(k, v)
        yield s


def test_urls_parse_or_say_what_is_wrong() -> None:
    assert ResultsUrl.parse("s3://b/p/q/") == ResultsUrl("b", "p/q")
    assert str(ResultsUrl.parse("s3://b")) == "s3://b"
    for bad in ("http://b/p", "s3:///p", "b/p"):
        with pytest.raises(ValueError, match="DDPM_RESULTS_URL"):
            ResultsUrl.parse(bad)


def test_upload_read_and_presign(s3: MotoS3) -> None:
    s3.bucket("res")
    store = ResultStore("s3://res/a/b")
    name = image_object("job1", 2)
    store.put(name, PNG)
    assert s3.objects("res") == {"a/b/job1/images/2.png": PNG}
    assert store.get(name) == PNG
    assert asyncio.run(store.aget(name)) == PNG
    pointer = store.pointer(name)
    assert is_pointer(pointer) and not is_pointer(PNG)
    assert pointer == b"s3://res/a/b/job1/images/2.png"
    assert store.name_of(pointer) == name
    with pytest.raises(ValueError, match="not under"):
        store.name_of(b"s3://other/a/b/job1/images/2.png")
    url = store.presign(name, 60)
    assert url.startswith(f"{s3.endpoint}/res/a/b/job1/images/2.png?")
    got = httpx.get(url)                            # no credentials: the URL is signed
    assert got.status_code == 200 and got.content == PNG
    assert input_object("job1", "mask") == "job1/inputs/mask.png"
    # Signed for the address clients reach the store at, when it is another.
    public = ResultStore("s3://res/a/b", public_endpoint="http://files.example:9000")
    assert public.presign(name, 60).startswith("http://files.example:9000/res/a/b/job1/")
    assert public.origin() == "http://files.example:9000" and store.origin() == s3.endpoint


def test_a_refused_upload_gives_up_after_the_retry_time(s3: MotoS3) -> None:
    store = ResultStore("s3://never-created", retry_for=0.3)
    with pytest.raises(ResultStoreError, match=r"^result store unavailable: "):
        store.put("x.png", PNG)
    with pytest.raises(ResultStoreError, match=r"^result store unavailable: "):
        store.get("x.png")


def test_an_upload_is_retried_until_the_store_takes_it(s3: MotoS3) -> None:
    """The bucket appears while the upload is being retried: it lands, no error."""
    import threading

    store = ResultStore("s3://late", retry_for=30)
    created = threading.Timer(0.5, s3.bucket, args=("late",))
    created.start()
    store.put("x.png", PNG)
    created.join()
    assert s3.objects("late") == {"x.png": PNG}
