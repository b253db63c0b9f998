"""Credentials stay out of the logs: at DEBUG the websockets library that serves `/ws`
under uvicorn logs every handshake header, `Authorization: Bearer <key>` included."""

from __future__ import annotations

import logging

SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
# Where handshake headers are logged: uvicorn hands its websockets protocols this logger;
# websockets' own is the fallback.
LOGGERS = ("uvicorn.error", "websockets.server", "websockets.client")


class RedactHeaders(logging.Filter):
    """Replaces the value of a sensitive header in a `"< %s: %s"`-style record."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (isinstance(args, tuple) and len(args) == 2 and "%s: %s" in str(record.msg)
                and str(args[0]).lower() in SENSITIVE_HEADERS):
            record.args = (args[0], "[redacted]")
        return True


def install() -> None:
    """Add the filter to the loggers that see handshakes (once; logging config keeps it)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactHeaders) for f in logger.filters):
            logger.addFilter(RedactHeaders())
