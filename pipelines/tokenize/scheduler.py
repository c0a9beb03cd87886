"""Shards onto a pool of Ray actors: up to two calls queued per actor (no idle gap between shards),
a dead actor replaced and its shards retried, each shard attempted at most `max_attempts` times.

Exactly once: a shard counts as done only when its call returned, which happens after its
manifest (the commit marker) was written; a retry rewrites the same files under the same names.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError

PER_ACTOR = 2


@dataclass
class Outcome:
    manifests: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)         # shard -> last error
    retries: int = 0
    replaced_workers: int = 0


class ShardScheduler:
    def __init__(self, ray, make_actor: Callable, workers: int, max_attempts: int,
                 on_done: Callable[[str, dict], None] = lambda s, m: None):
        self.ray = ray
        self.make_actor = make_actor
        self.workers = workers
        self.max_attempts = max_attempts
        self.on_done = on_done

    def start(self) -> list:
        """Create the pool and wait until every actor loaded the tokenizer."""
        actors = [self.make_actor() for _ in range(self.workers)]
        try:
            self.ray.get([a.ready.remote() for a in actors])
        except Exception as e:
            raise UserError(f"tokenize workers could not start: {_cause(e)}") from None
        return actors

    def run(self, actors: list, todo: list[tuple[str, str]]) -> Outcome:
        ray = self.ray
        out = Outcome()
        queue = collections.deque(todo)                # (url, shard)
        attempts: collections.Counter = collections.Counter()
        inflight: dict = {}                           # ref -> (slot, actor, url, shard)
        load = collections.Counter()

        def fill():
            # breadth first: every actor gets its first shard before any gets a second, so that
            # a job of as many shards as workers runs them all at once. A second shard is queued
            # behind a running one only while there is work for every actor; the last few go to
            # whichever actor frees up first (a shard queued early could wait behind a slower
            # one while another actor idles)
            while queue:
                slot = min(range(len(actors)), key=lambda i: (load[i], i))
                if load[slot] >= PER_ACTOR or (load[slot] > 0 and len(queue) < len(actors)):
                    return
                url, shard = queue.popleft()
                attempts[shard] += 1
                ref = actors[slot].process.remote(url, shard, attempts[shard])
                inflight[ref] = (slot, actors[slot], url, shard)
                load[slot] += 1

        fill()
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            slot, actor, url, shard = inflight.pop(ref)
            load[slot] -= 1
            try:
                manifest = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if actors[slot] is actor:              # first failure seen from this actor
                    actors[slot] = self.make_actor()
                    out.replaced_workers += 1
                self._retry(queue, attempts, out, url, shard, f"worker died: {_cause(e)}")
            except ray.exceptions.RayError as e:
                self._retry(queue, attempts, out, url, shard, _cause(e))
            else:
                out.manifests[shard] = manifest
                self.on_done(shard, manifest)
            fill()
        return out

    def _retry(self, queue, attempts, out: Outcome, url: str, shard: str, why: str) -> None:
        if attempts[shard] < self.max_attempts:
            out.retries += 1
            queue.appendleft((url, shard))
        else:
            out.failed[shard] = f"gave up after {attempts[shard]} attempts: {why}"


def _cause(e: BaseException) -> str:
    """The innermost readable line of a Ray error."""
    cause = getattr(e, "cause", None) or getattr(e, "__cause__", None)
    if isinstance(cause, BaseException) and cause is not e:
        text = str(cause).strip().splitlines()
        if text:
            return f"{type(cause).__name__}: {text[-1]}"
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
