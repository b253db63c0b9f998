"""Tests marked `cuda` skip, saying why, where torch sees no CUDA device, so the suite stays
green on CPU machines; `make gpu-check` runs them (`pytest -m cuda`) on a GPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

NO_CUDA = ("CUDA is not available here (torch.cuda.is_available() is False): the `cuda` "
           "tests need a GPU; `make gpu-check` runs them on one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """fp32 means fp32: TF32 tensor-core matmuls and convolutions off (cuDNN allows TF32 by
    default), so a reference run is not itself a reduced-precision one."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def gpu_memory() -> Iterator[None]:
    """Whatever a test caps or fills, the next one finds the whole GPU again."""
    torch.cuda.empty_cache()
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()
