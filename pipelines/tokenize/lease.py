"""One tokenize job writes an OUTPUT at a time: OUTPUT/_lease.json names the job that holds it.

The driver takes the lease before it touches the output (its start-up cleanup deletes temporary
files, --overwrite deletes everything), rewrites its heartbeat every `heartbeat_s` from a daemon
thread, and removes it when the job ends (success, failure, Ctrl-C, and SIGTERM, which Ray's
driver turns into an exit). A second job on the same OUTPUT refuses to start while the holder's
heartbeat is fresh. A lease whose heartbeat is older than `stale_s` (its job was killed, or its
machine lost), or whose holder ran on this machine and is no longer running, is taken over with
a warning.

Object stores have no atomic create-if-absent, so a lease is acquired by write, pause, read back:
of two jobs that both found the output free, the later write wins, and the earlier writer sees
it when it reads back and refuses. That holds as long as the pause outlasts the gap between a
job's read and its write (two small requests). The holder re-reads the lease before each
heartbeat and workers re-read it before committing each shard, so a job whose lease was taken
over (it stalled for longer than `stale_s`) stops writing: its shards are not committed and the
job ends with an error.

The lease's own writes go through write_bytes_atomic with the temporary file next to it, not
under OUTPUT/_tmp: a job writes its lease before it holds the lease, while the holder may be
clearing OUTPUT/_tmp.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid

import fsspec

from tokenizer.storage import join_url, write_bytes_atomic

from ..errors import UserError
from .scheduler import StopJob

LEASE_NAME = "_lease.json"   # '_': dataset readers skip it
SETTLE_S = 1.0               # write -> read back: longer than a job's read -> write gap


class LeaseLost(StopJob):
    """Another job took this job's output lease over: nothing more may be written."""


def lease_url(output: str) -> str:
    return join_url(output.rstrip("/"), LEASE_NAME)


def read_lease(url: str) -> dict | None:
    """The lease at `url`; None when there is none, {} when it is unreadable (nobody's)."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        lease = json.loads(raw)
    except ValueError:
        return {}
    return lease if isinstance(lease, dict) else {}


def describe(lease: dict | None, now: float | None = None) -> str:
    """'job 1a2b.. on host h, pid 12, last heartbeat 4 s ago' (for messages)."""
    if lease is None:
        return "no job (the lease was removed)"
    if not lease:
        return "an unreadable lease file"
    age = (now if now is not None else time.time()) - float(lease.get("heartbeat") or 0)
    return (f"job {lease.get('job_id', '?')} on host {lease.get('host', '?')}, pid {lease.get('pid', '?')}, "
            f"started {lease.get('started_at', '?')}, last heartbeat {max(0.0, age):.0f} s ago")


def check_holder(output: str, job_id: str, shard: str) -> None:
    """A worker's check before it commits `shard`: raises LeaseLost unless the output's lease
    still names `job_id`."""
    lease = read_lease(lease_url(output))
    if not lease or lease.get("job_id") != job_id:
        raise LeaseLost(f"--output {output}: this job ({job_id}) no longer holds the output's lease (now "
                        f"{describe(lease)}); shard {shard} was not committed. {RERUN}")


RERUN = ("Let one job at a time write an output, then rerun the same command: finished shards are "
         "skipped")


def process_namespace() -> str | None:
    """What tells whether a PID seen in a lease can be looked up here: this machine's boot and
    PID namespace (Linux); None elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)          # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:      # another user's process
        pass
    return True


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class OutputLease:
    """This job's lease on `output`. `with OutputLease(...) as lease:` acquires it (UserError when
    another live job holds it), keeps its heartbeat going and releases it on exit."""

    def __init__(self, output: str, heartbeat_s: float = 10.0, stale_s: float = 60.0, about: dict | None = None,
                 settle_s: float | None = None, clock=time.time):
        self.output = output.rstrip("/")
        self.url = lease_url(self.output)
        self.job_id = uuid.uuid4().hex[:16]
        self.heartbeat_s, self.stale_s, self.clock = heartbeat_s, stale_s, clock
        self.settle_s = SETTLE_S if settle_s is None else settle_s
        self.record = {"job_id": self.job_id, "host": socket.gethostname(), "pid": os.getpid(),
                       "processes": process_namespace(),
                       "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "job": about or {}}
        self.held = False
        self.lost: LeaseLost | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "OutputLease":
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- acquire ------------------------------------------------------------------------------
    def acquire(self) -> None:
        current = self._read()
        if current is not None:
            why = self._takeover_reason(current)
            if why is None:
                raise UserError(self._busy(current))
            warn(f"--output {self.output}: taking over the lease of {describe(current, self.clock())}: {why}")
        try:
            self._write()
            time.sleep(self.settle_s)
            current = self._read()
        except BaseException:
            with contextlib.suppress(Exception):     # the first error is the one to report
                self._remove_if_ours()
            raise
        if not current or current.get("job_id") != self.job_id:
            raise UserError(self._busy(current) if current else
                            f"--output {self.output}: another tokenize job claimed it at the same time; "
                            "let one job at a time write an output")
        self.held = True

    def _takeover_reason(self, lease: dict) -> str | None:
        """Why `lease` may be taken over, or None while its holder is alive."""
        if not lease:
            return "the lease file is unreadable"
        age = self.clock() - float(lease.get("heartbeat") or 0)
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (stale after {self.stale_s:g} s)"
        pid = lease.get("pid")
        if (self.record["processes"] is not None and lease.get("processes") == self.record["processes"]
                and isinstance(pid, int) and pid > 0 and pid != os.getpid() and not process_alive(pid)):
            return f"its process {pid} on this machine is no longer running"
        return None

    def _busy(self, lease: dict) -> str:
        return (f"--output {self.output} is being written by another tokenize job ({describe(lease, self.clock())}); "
                f"wait for it to finish or stop it, or use another --output (a lease with no heartbeat for "
                f"{self.stale_s:g} s is taken over)")

    # -- heartbeat ----------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, daemon=True, name="vqtok-lease")
        self._thread.start()

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
                failing = False
            except LeaseLost as e:
                self.lost = e
                return
            except Exception as e:      # storage trouble: the next beat tries again
                if not failing:
                    warn(f"--output {self.output}: the lease heartbeat could not be written ({e}); retrying")
                failing = True

    def renew(self) -> None:
        """Re-read the lease (LeaseLost when another job took it over), then write a fresh heartbeat."""
        self.verify()
        self._write()

    def verify(self) -> None:
        """LeaseLost unless the lease on the output still names this job."""
        self.raise_if_lost()
        current = self._read()
        if not current or current.get("job_id") != self.job_id:
            self.lost = LeaseLost(f"--output {self.output}: this job ({self.job_id}) lost the output's lease "
                                  f"(now {describe(current, self.clock())}) and stopped writing. {RERUN}")
            raise self.lost

    def raise_if_lost(self) -> None:
        """The heartbeat's finding, without a read: for the scheduler's loop."""
        if self.lost is not None:
            raise self.lost

    # -- release ------------------------------------------------------------------------------
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held:
            self.held = False
            try:
                self._remove_if_ours()
            except Exception as e:      # never hides the job's own outcome
                warn(f"--output {self.output}: the lease could not be removed ({e}); the next job takes it "
                     f"over after {self.stale_s:g} s")

    def _remove_if_ours(self) -> None:
        current = self._read()
        if current and current.get("job_id") == self.job_id:
            fs, path = fsspec.core.url_to_fs(self.url)
            fs.rm(path)

    # -- storage ------------------------------------------------------------------------------
    def _read(self) -> dict | None:
        try:
            return read_lease(self.url)
        except OSError as e:
            raise UserError(f"--output {self.output}: cannot read ({e})") from None

    def _write(self) -> None:
        now = self.clock()
        record = {**self.record, "heartbeat": now,
                  "heartbeat_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}
        try:
            write_bytes_atomic(self.url, json.dumps(record, indent=1).encode())
        except OSError as e:
            raise UserError(f"--output {self.output}: cannot write ({e})") from None
