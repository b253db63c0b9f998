"""The one reader of multipart/form-data bodies, for the native POST (`app/uploads.py`)
and OpenAI's edits and variations (`app/openai/forms.py`).

Starlette parses the form with the bounds each caller gives (parts, fields, the size of a
text part); a form that cannot be read is a 422 (OpenAI's routes answer it as their 400),
a body past its limit stays the 413 it is. A file part is read up to the image limit, and
one over it is refused in bytes of the image (`image_too_large`), wherever it came from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from contract.inputs import MAX_INPUT_BYTES

from .errors import ApiError

Part = tuple[str, "str | UploadFile"]


def image_too_large(field: str, size: int, limit: int = MAX_INPUT_BYTES) -> ApiError:
    """The one refusal of an input image over MAX_INPUT_BYTES, in bytes of the image, the
    same whether it came as base64 in JSON or as a file part, natively or on the OpenAI
    routes (where the 422 is OpenAI's 400)."""
    return ApiError(422, "invalid_request", f"{field}: the image is {size} bytes; at most "
                    f"{limit} bytes", field=field)


def is_multipart(request: Request) -> bool:
    ctype = request.headers.get("content-type", "")
    return ctype.split(";")[0].strip().lower() == "multipart/form-data"


@asynccontextmanager
async def form_parts(request: Request, *, max_files: int, max_fields: int,
                     max_part_size: int) -> AsyncIterator[list[Part]]:
    """The form's parts in order, (name, text or file), for the block; the files are
    closed after it."""
    try:
        form = await request.form(max_files=max_files, max_fields=max_fields,
                                  max_part_size=max_part_size)
    except HTTPException as e:      # malformed, too many parts, a part too large
        if e.status_code == 413:    # the body past its limit (app/body_limit.py)
            raise
        raise ApiError(422, "invalid_request", "the multipart form cannot be read: "
                       f"{e.detail}") from None
    try:
        yield list(form.multi_items())
    finally:
        await form.close()


async def file_bytes(name: str, part: UploadFile, limit: int = MAX_INPUT_BYTES) -> bytes:
    """A file part's bytes, at most `limit` of them (`image_too_large` past it)."""
    if part.size is not None and part.size > limit:      # spooled: its size known
        raise image_too_large(name, part.size, limit)
    data = await part.read(limit + 1)
    if len(data) > limit:
        raise image_too_large(name, len(data) + len(await part.read()), limit)
    return data
