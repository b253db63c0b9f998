"""Optional API keys: `Authorization: Bearer <key>`.

Only SHA-256 digests of keys are configured (and so stored); a presented key is hashed and
compared with every digest in constant time. A key's owner id (a prefix of its digest) is
recorded on each job it creates; a job is visible only to its owner.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from starlette.requests import HTTPConnection

from .errors import ApiError

OPEN = "-"    # owner of jobs created while no keys are configured


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and the digest to configure for it."""
    key = "ddpm_" + secrets.token_urlsafe(32)
    return key, hash_key(key)


@dataclass(frozen=True)
class Principal:
    """Who is calling: `owner` is stored on jobs; `client` keys rate limits."""

    owner: str
    client: str

    def owns(self, owner: str | None) -> bool:
        return self.owner == OPEN or hmac.compare_digest(self.owner, owner or "")


class KeyAuth:
    def __init__(self, digests: list[str]) -> None:
        self.digests = [bytes.fromhex(d) for d in digests]

    @property
    def open(self) -> bool:
        return not self.digests

    def caller(self, conn: HTTPConnection) -> Principal:
        """The caller of an HTTP request or a WebSocket (both are HTTPConnections)."""
        addr = conn.client.host if conn.client else "unknown"
        return self.identify(conn.headers.get("authorization"), addr)

    def identify(self, authorization: str | None, client_addr: str) -> Principal:
        if self.open:
            return Principal(owner=OPEN, client=f"ip:{client_addr}")
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 512:
            raise ApiError(401, "unauthorized", "an API key is required: "
                           "`Authorization: Bearer <key>`",
                           headers={"WWW-Authenticate": "Bearer"})
        digest = hashlib.sha256(token.encode()).digest()
        matched = False
        for d in self.digests:                     # no early exit: timing says nothing
            matched |= hmac.compare_digest(digest, d)
        if not matched:
            raise ApiError(401, "unauthorized", "unknown API key",
                           headers={"WWW-Authenticate": "Bearer"})
        owner = digest.hex()[:16]
        return Principal(owner=owner, client=f"key:{owner}")
