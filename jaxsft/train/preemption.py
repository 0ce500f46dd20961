"""Preemption: a SIGTERM (spot GPU, preemptible TPU, Slurm `--signal` or preemption) or jax's
own preemption notice stops the run after a step that every process agrees on; that step is
saved like any checkpoint (offload snapshot and data position included) and the run exits with
`jaxsft.cli.PREEMPTED` (75). The same command resumes it; `launch/` relaunches on that status.

One process: a SIGTERM handler sets a flag that the loop reads after each step. Several
processes: jax's coordination service catches SIGTERM (and the TPU maintenance notice) in any
process and `multihost_utils.reached_preemption_sync_point` returns True in every process at the
same step (the largest step any of them had reached, plus one).

The time from the signal to the exit is the rest of the current step, one more step in a job of
several processes, and one checkpoint save: it must fit the scheduler's grace period (30 s on
GCE and TPU spot VMs, Slurm's `GraceTime` or `--signal` lead time).
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger("jaxsft.train")


class Preempted(Exception):
    """The run stopped on a preemption notice after saving its step; run it again to resume."""


class PreemptionNotice:
    """`reached(step)`, called once per step in every process: whether to save and stop now."""

    def __init__(self):
        self.several_processes = jax.process_count() > 1
        self.signalled = False
        self.previous = None
        if not self.several_processes and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.signalled = True
        log.warning("SIGTERM: saving after the current step, then exiting")

    def reached(self, step: int) -> bool:
        if self.several_processes:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None
