"""The OpenAPI document as a valid OpenAPI 3.1 document.

FastAPI describes a Server-Sent Events response with `itemSchema`, a keyword of OpenAPI
3.2, inside a document that declares 3.1.0: `openapi-spec-validator` refuses it, and so do
client generators that validate first. Here each such media type keeps the item schema as
an extension (`x-itemSchema`) for tools that want the shape of one event, and a
description; it gets no `schema`: 3.1 can only call the whole stream a string, which
schemathesis then holds every event's data to (and the data is a JSON object).

Every file part of a multipart body (an input image) is stated as never empty
(`minLength: 1`), as the API holds it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

STREAM_DESCRIPTION = ("text/event-stream: events of `event:`, `id:` and one JSON `data:` "
                      "line each, as listed in the operation's description (shape of one "
                      "event: `x-itemSchema`)")


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (and so `/openapi.json`) return the valid document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = build()               # FastAPI caches it on the app: fixed once
            for media in _media_types(doc):
                if "itemSchema" in media:
                    media["x-itemSchema"] = media.pop("itemSchema")
                    media.pop("schema", None)     # a response class's default: a string
                    media.setdefault("x-description", STREAM_DESCRIPTION)
            for part in _file_parts(doc):
                part.setdefault("minLength", 1)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _file_parts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file part of every multipart request body: an image, so never empty (the API
    refuses an empty one; the document says so, where it states every other rule)."""
    found = []
    for item in doc.get("paths", {}).values():
        for op in item.values():
            if not isinstance(op, dict):
                continue
            content = op.get("requestBody", {}).get("content", {})
            schema = content.get("multipart/form-data", {}).get("schema", {})
            found += [p for p in schema.get("properties", {}).values()
                      if isinstance(p, dict)
                      and p.get("contentMediaType") == "application/octet-stream"]
    return found


def _media_types(doc: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for item in doc.get("paths", {}).values():
        for op in item.values():
            if not isinstance(op, dict):
                continue
            for response in op.get("responses", {}).values():
                found += [m for m in response.get("content", {}).values()
                          if isinstance(m, dict)]
    return found
