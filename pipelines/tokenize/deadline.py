"""A shard attempt's deadline (--shard-timeout): reading and decoding a shard that stalls (a
storage read that never returns, a FIFO nobody writes) fails the attempt, which the scheduler
retries, instead of hanging the job.

A decode process is waited on with the deadline (decode_pool.py) and killed past it; the inline
decoder checks it between samples (shard_decoder.py). What neither reaches (an inline read that never
returns, a hung write) is the scheduler's backstop: it stops a worker whose call has had no
result for a multiple of the deadline (scheduler.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Deadline:
    at: float            # time.monotonic() when the attempt must have ended
    seconds: float       # the timeout it came from, for messages

    @classmethod
    def after(cls, seconds: float | None) -> "Deadline | None":
        return None if seconds is None else cls(time.monotonic() + seconds, seconds)

    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def check(self, url: str) -> None:
        if self.passed():
            raise self.expired(url)

    def expired(self, url: str) -> TimeoutError:
        return TimeoutError(f"{url}: not read and decoded within --shard-timeout {self.seconds:g} s; "
                            "this attempt was stopped")
