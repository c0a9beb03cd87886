"""Decode processes of a tokenize worker: the CPU side scales with the worker's CPUs.

Pillow's per-image Python work holds the interpreter lock, so decode threads in one process do
not scale (more threads were slower). Each decode process here reads and decodes whole shards on
its own and writes each batch of images straight into one of its shared-memory buffers; the
worker process only receives a small message per batch (keys, kept fields, errors) and hands the
buffer to the encoder, then gives it back. No image is pickled or copied between processes.

A child is started with `python -m pipelines.tokenize.decode_pool` (it imports neither torch nor
ray), gets its buffers as memfd file descriptors and talks over a socketpair. It dies with its
worker (PR_SET_PDEATHSIG on Linux, and end-of-file on the socket everywhere). The worker waits on
it with the attempt's deadline (--shard-timeout): past it, the process is killed (the pool starts
a new one) and the attempt fails with TimeoutError, to be retried.

Protocol (parent -> child): ("shard", url), ("free", slot), ("stop",).
          (child -> parent): ("batch", slot, DecodedBatch), ("end", ShardEnd).
"""
from __future__ import annotations

import collections
import contextlib
import mmap
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection

import numpy as np

from .deadline import Deadline
from .shard_decoder import Batches, DecodeSpec, SampleDecoder, decode_shard

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_BUFFER_BYTES = 1 << 30    # all of one process's batch buffers together


def buffers_per_process(spec: DecodeSpec) -> int:
    """Batches a process may decode ahead of the encoder: 3 (one being encoded, one ready, one
    being filled), 2 when batches are large."""
    return 3 if 3 * spec.batch_bytes <= MAX_BUFFER_BYTES else 2


class DecodeProcessDied(RuntimeError):
    pass


class DecodeProcess:
    """The worker's handle on one decode process and its shared batch buffers."""

    def __init__(self, spec: DecodeSpec):
        self.spec = spec
        count = buffers_per_process(spec)
        self.fds, self.maps, self.arrays = [], [], []
        for _ in range(count):
            fd = _shared_fd(spec.batch_bytes)
            mm = mmap.mmap(fd, spec.batch_bytes)
            self.fds.append(fd)
            self.maps.append(mm)
            self.arrays.append(np.frombuffer(mm, dtype=np.uint8).reshape(spec.batch_size, *spec.image_shape))
        ours, theirs = socket.socketpair()
        # the folder holding this package first (a Ray runtime env's py_modules/working_dir too),
        # then the worker's own PYTHONPATH; the interpreter is the worker's
        paths = [PACKAGE_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.tokenize.decode_pool", str(theirs.fileno()),
             ",".join(map(str, self.fds))],
            pass_fds=[theirs.fileno(), *self.fds], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock = ours
        self.conn = Connection(os.dup(ours.fileno()))
        self.conn.send(("spec", spec))
        self.mid_shard = False          # True from ("shard", url) until its ("end", ...) arrived

    def alive(self) -> bool:
        return self.proc.poll() is None

    def batches(self, url: str, deadline: Deadline | None = None) -> Batches:
        """Yield (slot, images (n, C, R, R) uint8 in shared memory, batch); the buffer goes back
        to the child when the consumer asks for the next batch. Returns the ShardEnd. Past
        `deadline` the process is killed and TimeoutError raised."""
        self._send(("shard", url))
        self.mid_shard = True
        while True:
            if deadline is not None:
                self._wait(url, deadline)
            msg = self._recv()
            if msg[0] == "end":
                self.mid_shard = False
                return msg[1]
            _, slot, batch = msg
            try:
                yield slot, self.arrays[slot][:batch.count], batch
            finally:
                if self.alive():
                    self._send(("free", slot))

    def _send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except OSError:
            raise self._died() from None

    def _wait(self, url: str, deadline: Deadline) -> None:
        """Until the next message is there; past the deadline, kill the process and raise."""
        try:
            ready = not deadline.passed() and self.conn.poll(deadline.left())
        except (EOFError, OSError):
            raise self._died() from None
        if not ready:
            self.proc.kill()          # mid_shard stays True: the pool replaces this process
            self.proc.wait()
            raise deadline.expired(url)

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise self._died() from None

    def _died(self) -> DecodeProcessDied:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = "killed: stopped answering"
        return DecodeProcessDied(f"a decode process ended unexpectedly (exit status {code})")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop",))
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()
        self.sock.close()
        self.arrays.clear()
        for mm in self.maps:
            with contextlib.suppress(BufferError):
                mm.close()
        for fd in self.fds:
            os.close(fd)


class DecodePool:
    """`processes` decode processes; `acquire()` lends one for one shard. A process that died is
    replaced on the next acquire, so one crash costs one shard attempt, not the worker."""

    def __init__(self, spec: DecodeSpec, processes: int):
        self.spec = spec
        self.idle: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.all: list[DecodeProcess] = []
        for _ in range(processes):
            self.idle.put(self._start())
        self.size = processes

    def _start(self) -> DecodeProcess:
        proc = DecodeProcess(self.spec)
        with self.lock:
            self.all.append(proc)
        return proc

    @contextlib.contextmanager
    def acquire(self):
        proc = self.idle.get()
        if not proc.alive():
            self._drop(proc)
            proc = self._start()
        try:
            yield proc
        finally:
            if proc.mid_shard or not proc.alive():
                # died, or the caller gave up mid-shard: its next messages belong to that shard
                self._drop(proc)
                proc = self._start()
            self.idle.put(proc)

    def _drop(self, proc: DecodeProcess) -> None:
        with self.lock:
            if proc in self.all:
                self.all.remove(proc)
        with contextlib.suppress(Exception):
            proc.close()

    def close(self) -> None:
        with self.lock:
            procs, self.all = self.all, []
        for proc in procs:
            proc.close()


def _shared_fd(size: int) -> int:
    """A file descriptor of `size` bytes of shared memory (memfd on Linux, else an unlinked file)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("vqtok-decode", 0)     # not close-on-exec: passed to the child
    else:
        f = tempfile.TemporaryFile()
        fd = os.dup(f.fileno())
        f.close()
    os.ftruncate(fd, size)
    return fd


# ---- the child ------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def child_main(sock_fd: int, buffer_fds: list[int]) -> None:
    _die_with_parent()
    conn = Connection(sock_fd)
    kind, spec = conn.recv()
    assert kind == "spec"
    maps = [mmap.mmap(fd, spec.batch_bytes) for fd in buffer_fds]
    arrays = [np.frombuffer(mm, dtype=np.uint8).reshape(spec.batch_size, *spec.image_shape) for mm in maps]
    free = collections.deque(range(len(arrays)))
    decoder = SampleDecoder(spec)

    def handle(msg) -> bool:
        """Book-keeping messages; False on stop."""
        if msg[0] == "free":
            free.append(msg[1])
            return True
        if msg[0] == "stop":
            return False
        raise RuntimeError(f"decode process: unexpected message {msg[0]!r}")

    def next_buffer():
        while not free:
            if not handle(conn.recv()):
                raise SystemExit(0)
        slot = free.popleft()
        return slot, arrays[slot]

    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return                                     # the worker is gone
        if msg[0] == "shard":
            gen = decode_shard(msg[1], spec, decoder, next_buffer)
            while True:
                try:
                    slot, _, batch = next(gen)
                except StopIteration as stop:
                    conn.send(("end", stop.value))
                    break
                conn.send(("batch", slot, batch))
        elif not handle(msg):
            return


if __name__ == "__main__":
    try:
        child_main(int(sys.argv[1]), [int(x) for x in sys.argv[2].split(",") if x])
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        pass
