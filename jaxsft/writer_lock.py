"""One writer per run directory: `train.output_dir/writer.lock`, local or gs://.

A relaunched job whose previous incarnation still runs, or two people pointing at one bucket
path, would otherwise both write checkpoints and metrics there. Process 0 of a run creates the
lock file only if there is none (local: `O_EXCL`; GCS: a write conditional on generation 0) and
rewrites it every `HEARTBEAT_S` seconds; the run removes it when it ends, however it ends. A
second run finds it and is refused (exit status 2) with the holder's host, pid and start time. A
lock whose heartbeat is older than `STALE_S`, or whose holder's pid is gone from this host, is a
dead run's: it is taken over with a warning. Taking over and every heartbeat are conditional
writes on what was read (GCS generation preconditions; locally a rename checked against the
content read), so of two runs taking over one lock only one wins.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxsft import rundir

log = logging.getLogger("jaxsft.train")

HEARTBEAT_S = 15.0
STALE_S = 90.0
NAME = "writer.lock"


class RunDirInUse(Exception):
    """Another live run holds the run directory's lock."""


class _LocalFile:
    """The lock as a local file; its 'generation' is its content."""

    def __init__(self, path: str):
        self.path = path

    def create(self, data: str) -> str | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            f.write(data)
        return data

    def read(self) -> tuple[str, str] | None:
        try:
            with open(self.path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, data: str, generation: str) -> str | None:
        # Move the file aside (atomic: of two movers one gets it), keep it only if it is the
        # content we judged; otherwise put it back.
        aside = f"{self.path}.{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        with open(aside) as f:
            moved = f.read()
        if moved != generation:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.remove(aside)
            return None
        os.remove(aside)
        return self.create(data)

    def update(self, data: str, generation: str) -> str | None:
        """The holder's own rewrite: no moment without the file, when a new run could create it."""
        current = self.read()
        if current is None or current[1] != generation:
            return None
        with open(self.path + ".tmp", "w") as f:
            f.write(data)
        os.replace(self.path + ".tmp", self.path)
        return data

    def delete(self, generation: str) -> None:
        current = self.read()
        if current is not None and current[1] == generation:
            os.remove(self.path)


class _GcsObject:
    """The lock as a GCS object, written with generation preconditions."""

    def __init__(self, path: str):
        from google.cloud import storage

        bucket, _, name = path.removeprefix("gs://").partition("/")
        self.blob = storage.Client().bucket(bucket).blob(name)

    def _write(self, data: str, generation: int) -> int | None:
        from google.api_core.exceptions import PreconditionFailed

        try:
            self.blob.upload_from_string(data, content_type="application/json", if_generation_match=generation)
        except PreconditionFailed:
            return None
        return self.blob.generation

    def create(self, data: str) -> int | None:
        return self._write(data, 0)

    def read(self) -> tuple[str, int] | None:
        from google.api_core.exceptions import NotFound

        try:
            data = self.blob.download_as_text()
        except NotFound:
            return None
        return data, self.blob.generation

    def replace(self, data: str, generation: int) -> int | None:
        return self._write(data, generation)

    update = replace

    def delete(self, generation: int) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        with contextlib.suppress(NotFound, PreconditionFailed):
            self.blob.delete(if_generation_match=generation)


class WriterLock:
    """Holds `output_dir`'s lock from `acquire` to `release`, with a heartbeat thread."""

    def __init__(self, output_dir: str):
        self.path = rundir.join(output_dir, NAME)
        self.file = _GcsObject(self.path) if rundir.is_gcs(self.path) else _LocalFile(os.path.abspath(self.path))
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "token": uuid.uuid4().hex}
        self.generation = None
        self.stop = threading.Event()
        self.thread = None

    def _content(self) -> str:
        return json.dumps({**self.me, "heartbeat": time.time()})

    def acquire(self) -> None:
        """Takes the lock, or raises RunDirInUse naming the live holder."""
        for _ in range(3):  # a holder may release or be taken over while we look
            self.generation = self.file.create(self._content())
            if self.generation is not None:
                break
            found = self.file.read()
            if found is None:
                continue
            data, generation = found
            holder = _parse(data)
            dead = _dead_reason(holder)
            if dead is None:
                raise RunDirInUse(
                    f"{self.path}: another run writes to this directory (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, started {holder.get('started')}, last heartbeat "
                    f"{time.time() - holder.get('heartbeat', 0):.0f} s ago). Stop it or use another "
                    f"train.output_dir; the lock of a run that died is taken over {STALE_S:.0f} s after its "
                    "last heartbeat.")
            log.warning("taking over %s from a run that is gone (%s): host %s, pid %s, started %s",
                        self.path, dead, holder.get("host"), holder.get("pid"), holder.get("started"))
            self.generation = self.file.replace(self._content(), generation)
            if self.generation is not None:
                break
        else:
            raise RunDirInUse(f"{self.path}: another run took this directory's lock at the same moment")
        self.thread = threading.Thread(target=self._beat, name="jaxsft-writer-lock", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            generation = self.file.update(self._content(), self.generation)
            if generation is None:
                log.error("%s was taken over by another run (this one missed heartbeats for %.0f s); "
                          "two runs now write to this directory", self.path, STALE_S)
                return
            self.generation = generation

    def release(self) -> None:
        if self.thread is None:
            return
        self.stop.set()
        self.thread.join()
        self.thread = None
        self.file.delete(self.generation)


@contextlib.contextmanager
def holding(output_dir: str):
    """Holds `output_dir`'s lock in process 0 while the block runs; every process raises
    RunDirInUse when process 0 could not take it."""
    lock = WriterLock(output_dir) if jax.process_index() == 0 else None
    refusal = ""
    if lock is not None:
        try:
            lock.acquire()
        except RunDirInUse as e:
            refusal = str(e)
    if jax.process_count() > 1:
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(bool(refusal))))
        refusal = refusal or ("process 0 found train.output_dir in use by another run (see its log)" if refused else "")
    if refusal:
        raise RunDirInUse(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _parse(data: str) -> dict:
    try:
        holder = json.loads(data)
    except ValueError:
        return {}  # a lock cut short while written: its holder died
    return holder if isinstance(holder, dict) else {}


def _dead_reason(holder: dict) -> str | None:
    """Why the lock's holder is gone, or None while it may be alive."""
    age = time.time() - holder.get("heartbeat", 0)
    if age > STALE_S:
        return f"no heartbeat for {age:.0f} s"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return f"pid {holder['pid']} is not running on this host"
        except PermissionError:
            pass
    return None
