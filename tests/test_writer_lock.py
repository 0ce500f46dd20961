"""One writer per run directory (`jaxsft.writer_lock`): a second run is refused naming the live
holder, a dead holder's lock is taken over, and of two runs taking over one lock only one wins;
on the local disk and against the fake GCS server (tests/gcs_server.py)."""

import json
import logging
import os
import re
import socket
import subprocess
import time

import pytest

from gcs_server import gcs_bucket  # noqa: F401  (the session fixture)
from jaxsft import writer_lock
from jaxsft.writer_lock import RunDirInUse, WriterLock
from test_checkpoint import ENV, REPO, cli


def test_the_cli_refuses_a_second_writer(tmp_path):
    out = tmp_path / "run"
    holder = WriterLock(str(out))
    holder.acquire()
    try:
        r = subprocess.run(cli(tmp_path, out), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        holder.release()
    assert r.returncode == 2, r.stderr[-3000:]
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert f"(host {socket.gethostname()}, pid {os.getpid()}, started {holder.me['started']}, " in line
    assert not (out / "checkpoints").exists() and not (out / writer_lock.NAME).exists()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_live_holder_refused_dead_one_taken_over(tmp_path, where, request, monkeypatch, caplog):
    root = str(tmp_path) if where == "local" else f"gs://{request.getfixturevalue('gcs_bucket')}/{tmp_path.name}"
    monkeypatch.setattr(writer_lock, "HEARTBEAT_S", 0.2)
    first = WriterLock(root)
    first.acquire()
    beat = json.loads(first.file.read()[0])["heartbeat"]
    with pytest.raises(RunDirInUse, match=re.escape(f"pid {os.getpid()}, started {first.me['started']}")):
        WriterLock(root).acquire()
    time.sleep(1.5)
    assert json.loads(first.file.read()[0])["heartbeat"] > beat  # the heartbeat rewrites it

    # The holder dies (its heartbeat stops) on another host, its last heartbeat a while ago.
    first.stop.set()
    first.thread.join()
    dead = json.dumps({"host": "elsewhere", "pid": 1, "started": "earlier", "heartbeat": time.time() - 100})
    assert first.file.update(dead, first.generation) is not None
    _, generation = first.file.read()
    # Two runs taking over the same dead lock: one conditional write wins.
    assert sum(WriterLock(root).file.replace("{}", generation) is not None for _ in range(2)) == 1
    _, generation = first.file.read()
    assert first.file.update(dead.replace("earlier", "later"), generation) is not None
    second = WriterLock(root)
    with caplog.at_level(logging.WARNING, "jaxsft.train"):
        second.acquire()
    assert "taking over" in caplog.text and "no heartbeat for 10" in caplog.text and "host elsewhere" in caplog.text
    with pytest.raises(RunDirInUse, match=re.escape(f"pid {os.getpid()}, started {second.me['started']}")):
        WriterLock(root).acquire()
    second.release()
    assert first.file.read() is None  # released: the next run starts without a warning
