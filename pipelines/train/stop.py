"""Graceful stop on SIGTERM / SIGINT: every rank finishes its step, one checkpoint is saved, exit.

Schedulers (SLURM, Kubernetes, spot reclaim) send SIGTERM and wait a grace period before SIGKILL;
a week-long run should lose at most one step then, not everything since the last periodic
checkpoint. The handler only sets a flag. At each step boundary the ranks agree (a one-element
all-reduce) so that all of them stop after the same step, even when only one got the signal.
That all-reduce runs while the next step computes and is read at the next boundary, so no step
waits on it: the ranks stop one step after the signal, all after the same step.
"""
from __future__ import annotations

import os
import signal
import threading

import torch

from .. import distributed as D

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Installed for the duration of a run (main thread only); restores the old handlers."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}
        self._pending: tuple | None = None      # (work, flag) of the all-reduce in flight

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._pending is not None and exc[0] is None:
            self._pending[0].wait()       # every rank issued it: leave no collective in flight
        self._pending = None
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        # repeated signals (the launcher's and the scheduler's) change nothing
        if self.signum is None:
            self.signum = signum

    def agreed(self, device: torch.device) -> int | None:
        """The signal to stop on if any rank had one at the previous boundary, else None; a
        collective on every rank, called at every step boundary."""
        if not D.is_distributed():
            return self.signum           # alone: no tensor, no device sync
        agreed = None
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = int(flag.item()) or None
        flag = torch.tensor([float(self.signum or 0)], device=device)
        self._pending = (D.all_reduce_max_async(flag), flag)
        return agreed


def shield_data_worker(_worker_id: int = 0) -> None:
    """DataLoader worker init: the scheduler's or torchrun's SIGTERM/SIGINT reaches the whole
    process group, workers included, and a worker killed by it would crash its rank before the
    checkpoint. So a worker ignores SIGINT, and SIGTERM unless it comes from its own rank, which
    is how DataLoader and multiprocessing stop workers at exit (ignoring that one would hang the
    rank's exit). The sender is known only to sigwaitinfo: SIGTERM is blocked in every thread
    and one thread waits for it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()

    def wait_for_sigterm() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=wait_for_sigterm, name="sigterm-from-rank", daemon=True).start()
