"""The worker's one owner of RQ: taking, starting, succeeding, failing, stopping, re-queueing,
heartbeats, registry cleaning. The loop speaks to `RqSide` in plain values; nothing else in
worker/ imports rq, and in here only surface.py does (with the table of every RQ name used).
"""

from .side import RqSide, Unstartable

__all__ = ["RqSide", "Unstartable"]
