"""Snapshot frames in Redis: how they are encoded, and how a job's stream is held to a byte
budget and emptied of frames soon after the job ends.

Frames are previews: at 256² a raw frame is 196 KB and a job may make thousands, so they
are encoded as its `Preview` says (downscaled lossy for large images; contract.py), and
every job's stream keeps at most `stream_max_bytes` of them. The budget is kept in Redis,
inside the writer's one script (redis_batch.py), by a ledger per job, `frames_key(job)`:
a list of "<entry id> <bytes>" oldest first plus a counter of their bytes. Each frame is
appended and the oldest frames deleted (XDEL) until the total fits, atomically, whichever
worker writes the job (a re-queued job's new worker continues the same ledger). A frame
counts its encoded image, as the API's admission estimates frames
(`GenerationSpec.check_stream_budget`), and a total exactly at the budget fits on both
sides: a request admitted at the boundary keeps all its frames. Ended jobs
are scored in `FRAMES_EXPIRING`; a worker's maintenance pass deletes their frames
`snapshot_ttl` later (`expire_frames`), long before the results' TTL.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
from PIL import Image
from redis import Redis

from contract.keys import FRAMES_EXPIRING, events_key, frames_key
from contract.preview import Preview
from models import png_bytes

FRAME_COMMAND = "ddpm.frame"     # a pseudo-command the writer's script runs as FRAME_LUA

# ddpm.frame stream ledger budget bytes maxlen ttl field value [field value ...]
# (`i`: the index in ARGV of its first argument, the stream; `last`: of its last; `ttl` 0:
# the ledger's TTL is left as it is, set by an earlier frame of the job: writes.KeyTtls).
FRAME_LUA = """
local function ddpm_frame(i, last)
  local stream, ledger = ARGV[i], ARGV[i + 1]
  local budget, bytes, ttl = tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 5]
  local counter = ledger .. ':bytes'
  local id = redis.call('XADD', stream, 'MAXLEN', '~', ARGV[i + 4], '*',
                        unpack(ARGV, i + 6, last))
  redis.call('RPUSH', ledger, id .. ' ' .. bytes)
  local total = redis.call('INCRBY', counter, bytes)
  while total > budget do                 -- exactly the budget fits (as the API admits)
    local oldest = redis.call('LPOP', ledger)
    if not oldest then break end
    local sp = string.find(oldest, ' ', 1, true)
    redis.call('XDEL', stream, string.sub(oldest, 1, sp - 1))
    total = redis.call('DECRBY', counter, tonumber(string.sub(oldest, sp + 1)))
  end
  if ttl ~= '0' then                      -- 0: the writer set their TTL recently
    redis.call('EXPIRE', ledger, ttl)
    redis.call('EXPIRE', counter, ttl)
  end
end
"""

# KEYS[1]: FRAMES_EXPIRING. ARGV: now, most jobs per call, events key prefix, ledger prefix.
_EXPIRE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0,
                       tonumber(ARGV[2]))
for _, job in ipairs(due) do
  local stream, ledger = ARGV[3] .. job, ARGV[4] .. job
  local ids = {}
  for _, entry in ipairs(redis.call('LRANGE', ledger, 0, -1)) do
    ids[#ids + 1] = string.sub(entry, 1, string.find(entry, ' ', 1, true) - 1)
    if #ids == 500 then
      redis.call('XDEL', stream, unpack(ids))
      ids = {}
    end
  end
  if #ids > 0 then redis.call('XDEL', stream, unpack(ids)) end
  redis.call('DEL', ledger, ledger .. ':bytes')
  redis.call('ZREM', KEYS[1], job)
end
return #due
"""

EXPIRE_BATCH = 100               # ended jobs cleared per maintenance call


def encode_frame(pixels: np.ndarray, preview: Preview) -> bytes:
    """`[H x W x C]` uint8 (C = 1 or 3, already at the preview's size) → the frame's bytes.
    PNG at zlib level 1 (frames are many); WebP at method 0 (its fastest)."""
    if preview.format == "png":
        return png_bytes(pixels, compress_level=1)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buf = io.BytesIO()
    if preview.format == "webp":
        image.save(buf, format="WEBP", quality=preview.quality, method=0)
    else:
        image.save(buf, format="JPEG", quality=preview.quality)
    return buf.getvalue()


def frame_command(pipe: Any, job_id: str, fields: dict[str, str | bytes], *, budget: int,
                  maxlen: int, ttl: int) -> None:
    """Queue on `pipe` (a WriteBatch group) the budgeted append of one snapshot entry, which
    counts the bytes of its encoded frame (`fields["image"]`) against `budget`; `ttl`: of
    the job's ledger, set now (0: left as it is)."""
    size = len(fields["image"])
    args: list[Any] = [FRAME_COMMAND, events_key(job_id), frames_key(job_id), budget, size,
                       maxlen, ttl]
    for k, v in fields.items():
        args += [k, v]
    pipe.execute_command(*args)


EXPIRING_SLACK = 600            # FRAMES_EXPIRING outlives its newest entry by this (s)


def schedule_expiry(pipe: Any, job_ids: list[str], delay: int) -> None:
    """Queue the writes that have these jobs' frames deleted `delay` seconds from now (one
    ZADD and one EXPIRE for all). The index itself expires soon after its newest entry is
    due (every entry has the same delay), so an idle service keeps no key without a TTL."""
    due = time.time() + delay
    pipe.zadd(FRAMES_EXPIRING, dict.fromkeys(job_ids, due))
    pipe.expire(FRAMES_EXPIRING, delay + EXPIRING_SLACK)


class FrameExpiry:
    """Deletes the frames of jobs whose time has come (maintenance)."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(_EXPIRE)

    def __call__(self, now: float) -> int:
        """Clear every due job (EXPIRE_BATCH per call); how many were cleared."""
        total = 0
        while True:
            n = int(self._script(keys=[FRAMES_EXPIRING], args=[
                now, EXPIRE_BATCH, events_key(""), frames_key("")]))
            total += n
            if n < EXPIRE_BATCH:
                return total
