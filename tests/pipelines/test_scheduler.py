"""ShardScheduler on a simulated Ray cluster (fake time, no Ray): breadth-first placement, slots,
lost and joining nodes, the placement timeout; and pool sizing from fake node lists."""
from __future__ import annotations

import math

import pytest

from pipelines.errors import UserError
from pipelines.tokenize.config import TokenizeConfig
from pipelines.tokenize.driver import actor_options, default_cpus, fitting_workers, pool_size
from pipelines.tokenize.scheduler import ShardScheduler, StopJob
from tokenizer.config import ConfigError


class _ActorError(RuntimeError):
    def __init__(self, msg, init_failed=False):
        super().__init__(msg)
        self.actor_init_failed = init_failed


class _Ref:
    def __init__(self, actor, shard=None):
        self.actor, self.shard = actor, shard
        self.done_at = math.inf
        self.error = None


class _Actor:
    def __init__(self, sim, name, slots, shard_s, init_error):
        self.sim, self.name, self.slots, self.shard_s, self.init_error = sim, name, slots, shard_s, init_error
        self.placed = self.dead = False
        self.ready_at = math.inf
        self.free_at: list[float] = []      # per slot: when it is free again
        self.refs: list[_Ref] = []
        self.max_load = 0
        sim_actor = self

        class Ready:
            @staticmethod
            def remote():
                ref = _Ref(sim_actor)
                ref.done_at = sim_actor.ready_at
                if sim_actor.init_error:
                    ref.error = _ActorError("ValueError: bad tokenizer", init_failed=True)
                sim_actor.refs.append(ref)
                return ref

        class Process:
            @staticmethod
            def remote(url, shard, attempt):
                return sim_actor.submit(shard)

        self.ready, self.process = Ready, Process

    def submit(self, shard):
        sim = self.sim
        sim.log.append((self.name, shard))
        ref = _Ref(self, shard)
        self.refs.append(ref)
        if self.dead:
            ref.done_at, ref.error = sim.now, _ActorError("dead")
            return ref
        start = max(sim.now, self.ready_at, min(self.free_at))
        slot = self.free_at.index(min(self.free_at))
        self.free_at[slot] = ref.done_at = start + self.shard_s
        ref.error = sim.errors.get(shard)
        self.max_load = max(self.max_load, sum(1 for r in self.refs if r.shard and r.done_at > sim.now))
        return ref

    def place(self):
        self.placed, self.ready_at = True, self.sim.now + self.sim.start_s
        self.free_at = [self.ready_at] * (self.slots or 1)
        for ref in self.refs:
            ref.done_at = self.ready_at

    def die(self):
        self.dead = True
        for ref in self.refs:
            if ref.done_at > self.sim.now:
                ref.done_at, ref.error = self.sim.now, _ActorError("The actor died: node lost")


class Sim:
    """Ray's surface for ShardScheduler on a cluster with room for `room` actors: actors are
    placed in creation order while there is room, ready `start_s` after placement, and run
    `slots` shards at once (`shard_s` each, per actor name); `at(t, fn)` changes the cluster."""

    class exceptions:
        RayError = RuntimeError
        RayActorError = _ActorError

    def __init__(self, room, slots=None, shard_s=None, start_s=0.5, init_error=False):
        self.room, self.slots, self.shard_s, self.start_s = room, slots, shard_s or {}, start_s
        self.init_error = init_error
        self.now = 0.0
        self.actors: list[_Actor] = []
        self.events: list = []
        self.log: list = []
        self.errors: dict = {}     # shard -> the error its calls fail with

    # the cluster
    def make_actor(self):
        name = "abcdefghij"[len(self.actors)]
        actor = _Actor(self, name, self.slots, self.shard_s.get(name, 1.0), self.init_error)
        self.actors.append(actor)
        self.place()
        return actor

    def place(self):
        for actor in self.actors:
            if not actor.placed and not actor.dead and self.live() < self.room:
                actor.place()

    def live(self):
        return sum(1 for a in self.actors if a.placed and not a.dead)

    def at(self, t, fn):
        self.events.append((t, fn))

    def lose(self, name, room_after):
        """A node with actor `name` dies: its calls fail now, the room shrinks."""
        def event():
            self.actor(name).die()
            self.room = room_after
        return event

    def grow(self, room):
        def event():
            self.room = room
            self.place()
        return event

    def actor(self, name):
        return next(a for a in self.actors if a.name == name)

    # Ray's API
    def wait(self, refs, num_returns, timeout):
        deadline = self.now + timeout
        while True:
            first = min(refs, key=lambda r: r.done_at)
            nxt = min(self.events, key=lambda e: e[0], default=(math.inf, None))
            if nxt[0] <= min(first.done_at, deadline):
                self.events.remove(nxt)
                self.now = max(self.now, nxt[0])
                nxt[1]()
                continue
            if first.done_at <= deadline:
                self.now = max(self.now, first.done_at)
                done = [r for r in refs if r.done_at <= self.now][:num_returns]
                return done, [r for r in refs if r not in done]
            self.now = deadline
            return [], refs

    def get(self, ref):
        if ref.error:
            raise ref.error
        if ref.shard is None:
            info = {"pid": ref.actor.name}
            if self.slots:
                info["slots"] = self.slots
            return info
        self.log.append(("done", ref.shard))
        return {"counts": {"ok": 1, "failed": 0, "shard_errors": 0}, "worker": ref.actor.name}

    def kill(self, actor, no_restart=True):
        actor.die()
        self.place()

    def clock(self):
        return self.now

    def sleep(self, s):
        self.wait([_Ref(None)], 1, s)


def run(sim, shards, desired=None, timeout=30.0, max_attempts=3):
    todo = [(f"u{i}", f"s{i}") for i in range(shards)]
    done = []
    scheduler = ShardScheduler(sim, sim.make_actor, desired or (lambda: sim.room), max_attempts,
                               on_done=lambda s, m: done.append(s), placement_timeout=timeout,
                               poll_s=2.0, clock=sim.clock, sleep=sim.sleep)
    out = scheduler.run(todo)
    assert sorted(out.manifests) == sorted(s for _, s in todo) == sorted(done)
    return out


def submissions(sim):
    return [entry for entry in sim.log if entry[0] != "done"]


def test_every_worker_gets_a_shard_before_any_a_second():
    sim = Sim(room=2, shard_s={"b": 1.5})
    run(sim, 2)
    assert sim.log == [("a", "s0"), ("b", "s1"), ("done", "s0"), ("done", "s1")]
    sim = Sim(room=2, shard_s={"b": 1.5})
    run(sim, 6)
    assert sim.log[:4] == [("a", "s0"), ("b", "s1"), ("a", "s2"), ("b", "s3")]


def test_the_last_shards_go_to_whichever_worker_frees_up():
    # 3 shards, 2 workers: s2 is not queued behind a running shard; it goes to the first free actor
    sim = Sim(room=2, shard_s={"b": 1.5})
    run(sim, 3)
    assert sim.log == [("a", "s0"), ("b", "s1"), ("done", "s0"), ("a", "s2"), ("done", "s1"), ("done", "s2")]
    sim = Sim(room=2, shard_s={"b": 1.5})
    run(sim, 5)    # a: s0 s2, b: s1 s3 queued; s4 waits for an actor with nothing queued
    assert sim.log.index(("a", "s4")) > sim.log.index(("done", "s2"))


def test_an_actor_keeps_slots_plus_one_shards_and_fills_breadth_first_by_slot():
    sim = Sim(room=2, slots=3)
    run(sim, 20)
    # breadth first per slot: a b a b a b before anything is queued behind a running shard
    assert [who for who, _ in submissions(sim)[:6]] == ["a", "b"] * 3
    assert sim.actor("a").max_load == sim.actor("b").max_load == 4


def test_a_lost_node_hands_its_shards_to_the_survivor_and_nothing_waits_on_a_replacement():
    sim = Sim(room=2)
    sim.at(1.7, sim.lose("b", room_after=1))       # b holds s1 (running) and s3 (queued)
    out = run(sim, 8)
    assert out.workers_lost == 1 and out.retries == 2 and out.replaced_workers == 0
    assert out.workers_started == 2                # no room: no replacement was asked for
    assert {m["worker"] for m in out.manifests.values()} <= {"a", "b"}
    assert out.manifests["s3"]["worker"] == "a"


def test_a_replacement_asked_for_before_the_node_is_known_dead_holds_no_shards():
    sim = Sim(room=2)
    room = {"seen": 2}                 # what the cluster reports: the node's death shows 3 s late
    sim.at(1.7, sim.lose("b", room_after=1))
    sim.at(4.7, lambda: room.update(seen=1))
    out = run(sim, 10, desired=lambda: room["seen"])
    assert out.workers_started == 3 and out.replaced_workers == 1
    c = sim.actor("c")                 # asked for at once, never placed (no room), cancelled
    assert not c.placed and c.dead
    assert all(who != "c" for who, _ in submissions(sim))


def test_a_node_that_joins_mid_job_gets_a_worker():
    sim = Sim(room=1)
    sim.at(2.5, sim.grow(2))
    out = run(sim, 10)
    assert out.workers_started == 2 and out.workers_lost == 0
    assert sum(m["worker"] == "b" for m in out.manifests.values()) >= 3


def test_no_worker_left_stops_after_the_placement_timeout_naming_the_shards():
    sim = Sim(room=1)
    sim.at(2.2, sim.lose("a", room_after=0))
    with pytest.raises(UserError) as e:
        run(sim, 8, timeout=10.0)
    assert 12.0 <= sim.now <= 12.2 + 2.0       # lost at 2.2, stopped within a poll of 10 s later
    msg = str(e.value)
    assert "--placement-timeout" in msg and "rerun the same command" in msg
    assert "7 shard(s) not done: s1, s2, s3, s4, s5 and 2 more" in msg   # s0 was done
    assert all(a.dead for a in sim.actors)     # the pending one asked for is cancelled


def test_a_job_waits_for_room_up_to_the_timeout_then_runs():
    sim = Sim(room=0)
    sim.at(7.0, sim.grow(1))
    out = run(sim, 3, timeout=10.0)
    assert out.workers_started == 1 and sim.actor("a").ready_at == 7.5


def test_a_constructor_error_stops_the_job_with_its_cause():
    sim = Sim(room=2, init_error=True)
    with pytest.raises(UserError, match="tokenize workers could not start: .*bad tokenizer"):
        run(sim, 4)


def test_attempts_are_bounded_when_nodes_keep_dying():
    sim = Sim(room=1, shard_s={"a": 10.0, "b": 10.0})
    sim.at(2.0, sim.lose("a", room_after=1))      # attempt 1 on a, attempt 2 on its replacement b
    sim.at(5.0, sim.lose("b", room_after=1))
    out = ShardScheduler(sim, sim.make_actor, lambda: sim.room, 2, poll_s=2.0, clock=sim.clock,
                         sleep=sim.sleep).run([("u0", "s0")])
    assert out.manifests == {} and out.workers_lost == 2 and out.replaced_workers == 1
    assert out.failed["s0"].startswith("gave up after 2 attempts: worker died")


class _TaskError(RuntimeError):
    """Like Ray's error for a call that raised: the worker's exception is its `cause`."""

    def __init__(self, cause):
        super().__init__(f"task failed: {cause}")
        self.cause = cause


def test_a_stop_job_error_from_a_worker_stops_the_job_without_retrying():
    sim = Sim(room=2)
    sim.errors["s3"] = _TaskError(StopJob("--output o: this job lost the output's lease"))
    scheduler = ShardScheduler(sim, sim.make_actor, lambda: sim.room, 3, poll_s=2.0, clock=sim.clock,
                               sleep=sim.sleep)
    with pytest.raises(StopJob, match="lost the output's lease"):
        scheduler.run([(f"u{i}", f"s{i}") for i in range(8)])
    assert submissions(sim).count(("b", "s3")) + submissions(sim).count(("a", "s3")) == 1   # never retried
    # any other error of a call is retried
    sim = Sim(room=1)
    sim.errors["s0"] = _TaskError(OSError("storage hiccup"))
    out = ShardScheduler(sim, sim.make_actor, lambda: sim.room, 2, poll_s=2.0, clock=sim.clock,
                         sleep=sim.sleep).run([("u0", "s0")])
    assert out.failed["s0"] == "gave up after 2 attempts: OSError: storage hiccup"


def test_check_stops_the_job_within_a_poll():
    sim = Sim(room=1, shard_s={"a": 100.0})

    def check():
        if sim.now >= 5.0:
            raise StopJob("lease lost")

    with pytest.raises(StopJob, match="lease lost"):
        ShardScheduler(sim, sim.make_actor, lambda: sim.room, 3, poll_s=2.0, clock=sim.clock,
                       sleep=sim.sleep, check=check).run([("u0", "s0")])
    assert 5.0 <= sim.now <= 7.0


def test_a_call_in_flight_past_the_call_timeout_stops_its_worker_and_the_shard_is_retried():
    sim = Sim(room=1, shard_s={"a": 1e6})            # a's shard is stuck (e.g. an inline read hung)
    out = ShardScheduler(sim, sim.make_actor, lambda: sim.room, 3, poll_s=2.0, clock=sim.clock,
                         sleep=sim.sleep, call_timeout=30.0).run([("u0", "s0"), ("u1", "s1")])
    assert sorted(out.manifests) == ["s0", "s1"] and not out.failed
    assert sim.actor("a").dead and out.workers_lost == 1 and out.replaced_workers == 1
    assert out.retries == 2                          # s0 and the s1 queued behind it, both on b
    assert {m["worker"] for m in out.manifests.values()} == {"b"}
    assert 30.0 < sim.now < 30.0 + 2.0 + 0.5 + 2 * 1.0 + 0.1   # stopped within a poll, b's start, 2 shards


def test_a_shard_that_stalls_on_every_worker_fails_after_max_attempts_naming_the_timeout():
    sim = Sim(room=1, shard_s={name: 1e6 for name in "abc"})
    out = ShardScheduler(sim, sim.make_actor, lambda: sim.room, 2, poll_s=2.0, clock=sim.clock,
                         sleep=sim.sleep, call_timeout=30.0).run([("u0", "s0")])
    assert out.manifests == {}
    assert out.failed["s0"] == "gave up after 2 attempts: worker stopped: shard s0 had no result after 30 s"
    assert sim.now < 2 * (30.0 + 2.0 + 0.5) + 0.1


# -- pool sizing --------------------------------------------------------------------------------

def cfg(**kw):
    return TokenizeConfig(tokenizer="t", inputs=["x.tar"], output="o", **kw)


def test_cpu_clusters_get_one_worker_per_cpu_across_nodes():
    assert pool_size([{"CPU": 2.0}], cfg(), shards=10) == (2, 1.0, 0.0)
    assert pool_size([{"CPU": 2.0}], cfg(), shards=1) == (1, 1.0, 0.0)
    assert pool_size([{"CPU": 0.0}, {"CPU": 3.0}, {"CPU": 2.0}], cfg(), shards=10) == (5, 1.0, 0.0)
    assert pool_size([{"CPU": 8.0}], cfg(workers=3), shards=10) == (3, 1.0, 0.0)
    # --workers is an upper bound: no actor is asked for that the cluster has no room for
    assert pool_size([{"CPU": 2.0}], cfg(workers=8), shards=10) == (2, 1.0, 0.0)


def test_accelerator_workers_take_their_nodes_cpu_share_less_one_for_ray():
    assert pool_size([{"CPU": 96.0, "GPU": 8.0}], cfg(), shards=100) == (8, 11.0, 1.0)
    assert pool_size([{"CPU": 16.0, "GPU": 4.0}], cfg(), shards=10) == (4, 3.0, 1.0)
    # a CPU-only head with GPU nodes: the head adds no GPU worker and does not lower the share
    assert pool_size([{"CPU": 4.0}, {"CPU": 32.0, "GPU": 2.0}], cfg(), shards=10) == (2, 15.0, 1.0)
    # mixed nodes: the smallest share, so that every GPU gets a worker
    nodes = [{"CPU": 96.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}]
    assert pool_size(nodes, cfg(), shards=100) == (12, 3.0, 1.0)
    # two workers per GPU share the node's CPUs too; a tiny node still gets 1 CPU each
    assert default_cpus([{"CPU": 33.0, "GPU": 4.0}], 0.5) == 4.0
    assert default_cpus([{"CPU": 1.0, "GPU": 1.0}], 1.0) == 1.0


def test_cpus_per_worker_overrides_and_an_impossible_worker_is_a_clear_error():
    assert pool_size([{"CPU": 96.0, "GPU": 8.0}], cfg(cpus_per_worker=4), shards=100) == (8, 4.0, 1.0)
    assert pool_size([{"CPU": 16.0, "GPU": 4.0}], cfg(cpus_per_worker=8), shards=10) == (2, 8.0, 1.0)
    with pytest.raises(UserError, match="no node of the Ray cluster has that.*--cpus-per-worker"):
        pool_size([{"CPU": 2.0}, {"CPU": 2.0}], cfg(cpus_per_worker=3), shards=10)   # 4 CPUs, no node of 3
    with pytest.raises(UserError, match="needs 1 CPU and 1 GPU"):
        pool_size([{"CPU": 8.0}], cfg(gpus_per_worker=1), shards=10)


def test_fitting_workers_counts_node_by_node():
    assert fitting_workers([{"CPU": 3.0}, {"CPU": 3.0}], 2.0, 0.0) == 2     # not 6 // 2 = 3
    assert fitting_workers([{"CPU": 12.0, "GPU": 2.0}, {"CPU": 4.0}], 3.0, 1.0) == 2
    assert fitting_workers([], 1.0, 0.0) == 0


def test_actor_options_allow_slots_plus_one_calls_and_ready():
    opts = actor_options(11.0, 1.0)
    assert opts == {"num_cpus": 11.0, "num_gpus": 1.0, "max_restarts": 0, "max_task_retries": 0,
                    "max_concurrency": 13}
    assert actor_options(0.5, 0.0)["max_concurrency"] == 3


def test_placement_timeout_is_validated():
    with pytest.raises(ConfigError, match="tokenize.placement_timeout = 0 must be > 0"):
        cfg(placement_timeout=0)


def test_the_cli_passes_placement_timeout_to_the_config():
    from click.testing import CliRunner

    from pipelines.cli.tokenize import command

    result = CliRunner().invoke(command, ["--tokenizer", "t", "--input", "x.tar", "--output", "o",
                                          "--placement-timeout", "-1"])
    assert isinstance(result.exception, ConfigError)
    assert "tokenize.placement_timeout = -1.0 must be > 0" in str(result.exception)
