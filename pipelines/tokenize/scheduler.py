"""Shards onto an elastic pool of Ray actors.

- Only ready actors hold shards: an actor is created, its `ready()` call answers (with the number
  of shards it processes at once, "slots"; 1 when absent), and only then does it get work, up to
  `slots + 1` shards (one queued behind its running ones, so it never idles between shards).
- The pool follows the live cluster: every `poll_s` while waiting on results, `desired()` (the
  workers the cluster has room for now) is compared with ready + pending actors; more are started
  while shards are queued, and pending ones beyond it are cancelled. A lost actor (its process or
  node died) hands its shards back to the queue; a replacement is asked for only through that
  comparison, so never for a node that is gone.
- Never waits forever: when no actor is ready for `placement_timeout` seconds the job stops with
  a UserError naming the shards left; the same command resumes (finished shards are skipped).
- A backstop for shards stuck where the workers' own --shard-timeout cannot reach (an inline read
  that never returns, a hung write): an actor with a call in flight for longer than
  `call_timeout` is killed; its shards are retried like those of any lost worker.
- Stops at once, without retrying, when a call fails with a StopJob (e.g. the job lost its output
  lease) or when `check()` (called at least every `poll_s`) raises.

Exactly once: a shard counts as done only when its call returned, which happens after its
manifest (the commit marker) was written; a retry rewrites the same files under the same names.
Each shard is attempted at most `max_attempts` times, counting worker deaths and storage errors.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError

POLL_S = 2.0          # how often the pool is compared with the live cluster while waiting
SHOW_SHARDS = 5       # shards named in the placement-timeout error


class StopJob(UserError):
    """Raised by a worker's call when no retry can succeed and the whole job must stop (e.g. it
    lost its output lease): the scheduler raises it instead of retrying the shard."""


@dataclass
class Outcome:
    manifests: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)         # shard -> last error
    retries: int = 0
    replaced_workers: int = 0      # workers started to make up for lost ones
    workers_started: int = 0
    workers_lost: int = 0          # ready or pending actors that died (process or node lost)
    startup_s: float = 0.0         # run() start -> the first actors all ready (or lost)


@dataclass(eq=False)
class _Worker:
    actor: object
    order: int                     # creation order: breadth-first ties go to the oldest
    slots: int = 1                 # shards it processes at once (from ready())
    load: int = 0                  # shards submitted and not yet returned
    stopped: str | None = None     # why the scheduler killed it (a call in flight too long)


class ShardScheduler:
    def __init__(self, ray, make_actor: Callable[[], object], desired: Callable[[], int],
                 max_attempts: int, on_done: Callable[[str, dict], None] = lambda s, m: None,
                 placement_timeout: float = 300.0, poll_s: float = POLL_S,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 check: Callable[[], None] = lambda: None, call_timeout: float | None = None):
        self.ray = ray
        self.make_actor = make_actor
        self.desired = desired
        self.max_attempts = max_attempts
        self.on_done = on_done
        self.placement_timeout = placement_timeout
        self.poll_s = poll_s
        self.clock = clock
        self.sleep = sleep
        self.check = check
        self.call_timeout = call_timeout

    def run(self, todo: list[tuple[str, str]]) -> Outcome:
        return _Job(self, todo).run()


class _Job:
    """One run's state: queue (url, shard), pending actors (ready ref -> worker), ready workers,
    in-flight calls (ref -> (worker, url, shard, when submitted))."""

    def __init__(self, s: ShardScheduler, todo: list[tuple[str, str]]):
        self.s = s
        self.ray = s.ray
        self.out = Outcome()
        self.queue = collections.deque(todo)
        self.attempts: collections.Counter = collections.Counter()
        self.pending: dict = {}
        self.ready: list[_Worker] = []
        self.inflight: dict = {}
        self.created = 0
        self.t0 = 0.0
        self.first_ready: float | None = None

    def run(self) -> Outcome:
        clock = self.s.clock
        self.t0 = starved_since = clock()       # no ready actor since
        self.resize()
        next_check = self.t0 + self.s.poll_s
        while self.queue or self.inflight:
            self.fill()
            self.wait_one(max(0.0, next_check - clock()))
            self.s.check()
            now = clock()
            self.stop_overdue(now)
            if now >= next_check:
                self.resize()
                next_check = now + self.s.poll_s
            if self.ready:
                starved_since = None
            elif starved_since is None:
                starved_since = now
            elif now - starved_since > self.s.placement_timeout:
                self.stop_pending()
                raise UserError(self.timeout_message())
        self.stop_pending()
        if not self.out.startup_s:     # some of the first wave never came up
            self.out.startup_s = self.first_ready or 0.0
        return self.out

    # -- pool size --------------------------------------------------------------------------
    def resize(self) -> None:
        """Match ready + pending actors to what the live cluster has room for. At least one
        stays requested while work remains (the one the placement timeout waits on; an
        autoscaler sees its demand)."""
        left = len(self.queue) + len(self.inflight)
        want = min(max(1, self.s.desired()), left)
        have = len(self.ready) + len(self.pending)
        for ref in list(self.pending)[::-1]:    # cancel the newest pending ones first
            if have <= want:
                break
            self.kill(self.pending.pop(ref).actor)
            have -= 1
        while have < want and self.queue and len(self.pending) < len(self.queue):
            self.start_actor()
            have += 1

    def start_actor(self) -> None:
        actor = self.s.make_actor()
        self.pending[actor.ready.remote()] = _Worker(actor, self.created)
        self.created += 1
        self.out.workers_started += 1
        if self.out.workers_lost > self.out.replaced_workers:
            self.out.replaced_workers += 1

    def stop_pending(self) -> None:
        for worker in self.pending.values():
            self.kill(worker.actor)
        self.pending.clear()

    def kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:   # already dead or never placed: nothing left to stop
            pass

    # -- work -------------------------------------------------------------------------------
    def fill(self) -> None:
        # breadth first: the least loaded actor (in shards per slot) gets the next shard, so a
        # job of as many shards as slots runs them all at once. A shard is queued behind running
        # ones (one per actor) only while there is a shard for every slot, pending actors' too;
        # the last few go to whichever actor frees a slot first (a shard queued early could wait
        # behind a slower one while another actor idles)
        while self.queue and self.ready:
            w = min(self.ready, key=lambda w: (w.load / w.slots, w.order))
            if w.load >= w.slots and (w.load > w.slots or len(self.queue) < self.slots_soon()):
                return
            url, shard = self.queue.popleft()
            self.attempts[shard] += 1
            ref = w.actor.process.remote(url, shard, self.attempts[shard])
            self.inflight[ref] = (w, url, shard, self.s.clock())
            w.load += 1

    def slots_soon(self) -> int:
        """Slots of the ready actors, plus the pending ones' (guessed like the ready ones')."""
        slots = [w.slots for w in self.ready]
        return sum(slots) + len(self.pending) * max(slots, default=1)

    def wait_one(self, timeout: float) -> None:
        """Handle the next finished ready()/process() calls, or return after `timeout` s."""
        refs = list(self.pending) + list(self.inflight)
        if not refs:        # nothing to wait on: wait for the next look at the cluster
            self.s.sleep(timeout)
            return
        done, rest = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if done and rest:   # everything else already finished too: seen together, shared fairly
            done += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for ref in done:     # (a pending actor may have been cancelled by a resize meanwhile)
            if ref in self.pending:
                self.on_ready(ref, self.pending.pop(ref))
            elif ref in self.inflight:
                self.on_result(ref, *self.inflight.pop(ref))

    def on_ready(self, ref, w: _Worker) -> None:
        ray = self.ray
        try:
            info = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            # its constructor raised (a bad tokenizer, a broken environment): with no worker
            # up, every other would too; else only that node is at fault, the job goes on
            if getattr(e, "actor_init_failed", False) and not self.ready:
                raise UserError(f"tokenize workers could not start: {_cause(e)}") from None
            self.out.workers_lost += 1                  # e.g. its node died before it was ready
            return
        except ray.exceptions.RayError as e:
            raise UserError(f"tokenize workers could not start: {_cause(e)}") from None
        w.slots = max(1, int(info.get("slots", 1))) if isinstance(info, dict) else 1
        self.ready.append(w)
        if self.first_ready is None:
            self.first_ready = self.s.clock() - self.t0
        if not self.pending and not self.out.startup_s:     # the first wave is up
            self.out.startup_s = self.s.clock() - self.t0

    def stop_overdue(self, now: float) -> None:
        """Kill each ready actor with a call in flight for longer than call_timeout; its calls
        then fail (RayActorError) and on_result retries their shards."""
        limit = self.s.call_timeout
        if limit is None:
            return
        for w, _, shard, since in list(self.inflight.values()):
            if now - since > limit and w in self.ready:
                self.ready.remove(w)
                self.kill(w.actor)
                self.out.workers_lost += 1
                w.stopped = f"worker stopped: shard {shard} had no result after {limit:g} s"

    def on_result(self, ref, w: _Worker, url: str, shard: str, since: float) -> None:
        ray = self.ray
        w.load -= 1
        try:
            manifest = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            if w in self.ready:                  # first failure seen from this actor
                self.ready.remove(w)
                self.kill(w.actor)
                self.out.workers_lost += 1
            self.retry(url, shard, w.stopped or f"worker died: {_cause(e)}")
            self.resize()                        # replace it now if the cluster has room
        except ray.exceptions.RayError as e:
            stop = _stop_job(e)
            if stop is not None:
                raise stop from None
            self.retry(url, shard, _cause(e))
        else:
            self.out.manifests[shard] = manifest
            self.s.on_done(shard, manifest)

    def retry(self, url: str, shard: str, why: str) -> None:
        if self.attempts[shard] < self.s.max_attempts:
            self.out.retries += 1
            self.queue.appendleft((url, shard))
        else:
            self.out.failed[shard] = f"gave up after {self.attempts[shard]} attempts: {why}"

    def timeout_message(self) -> str:
        left = sorted([shard for _, shard in self.queue] + list(self.out.failed))
        named = ", ".join(left[:SHOW_SHARDS])
        if len(left) > SHOW_SHARDS:
            named += f" and {len(left) - SHOW_SHARDS} more"
        return (f"no tokenize worker could be placed on the Ray cluster for {self.s.placement_timeout:g} s "
                f"(--placement-timeout); {len(left)} shard(s) not done: {named}. Add capacity (or lower "
                "--cpus-per-worker/--gpus-per-worker) and rerun the same command: finished shards are skipped")


def _stop_job(e: BaseException) -> StopJob | None:
    """The StopJob a worker raised, if `e` (Ray's error for the call) is one. Ray's error for a
    task's exception is both the cause's class and RayTaskError, with the exception as `cause`."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, StopJob):
        return cause
    return StopJob(_cause(e)) if isinstance(e, StopJob) else None


def _cause(e: BaseException) -> str:
    """The innermost readable line of a Ray error."""
    cause = getattr(e, "cause", None) or getattr(e, "__cause__", None)
    if isinstance(cause, BaseException) and cause is not e:
        text = str(cause).strip().splitlines()
        if text:
            return f"{type(cause).__name__}: {text[-1]}"
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
