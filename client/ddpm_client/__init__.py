"""A Python client for ddpm-serve's native HTTP API (`/v1/generations`, `/v1/models`).

Needs only httpx (Pillow, through the `images` extra, for PIL images): no torch, none of
the server's packages.

    from ddpm_client import Client

    with Client("http://127.0.0.1:8000") as c:
        result = c.generate(model="mnist", class_label=7, num_images=4, seed=42)
        result.save("out")
"""

from .aio import AsyncClient
from .errors import (
    ApiError,
    AuthenticationError,
    ClientError,
    ConflictError,
    GenerationError,
    InvalidRequestError,
    NetworkError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    StreamError,
    UnavailableError,
    WaitTimeout,
)
from .sync import Client
from .types import Event, EventType, Frame, Generation, Model, Progress, Result

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ClientError",
    "ConflictError",
    "Event",
    "EventType",
    "Frame",
    "Generation",
    "GenerationError",
    "InvalidRequestError",
    "Model",
    "NetworkError",
    "NotFoundError",
    "PayloadTooLargeError",
    "Progress",
    "RateLimitError",
    "Result",
    "StreamError",
    "UnavailableError",
    "WaitTimeout",
]
