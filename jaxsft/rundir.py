"""The files of a run directory, on the local disk or in a gs:// bucket.

A run writes config.json, data_summary.json, metrics.jsonl, eval.jsonl, eval/*.json, TensorBoard
events, checkpoints and the `hf/` export under `train.output_dir`. With a gs:// output_dir every
one of them goes to the bucket (nothing to the local disk); files that are one per run are written
by process 0 only.

GCS objects cannot be appended to, so a JSONL file there is held in memory and the object is
rewritten on `flush()`: at most every `flush_seconds`, before every checkpoint, and at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from etils import epath


def is_gcs(path) -> bool:
    return str(path).startswith("gs://")


def join(base, *parts) -> str:
    base = str(base)
    return "/".join([base.rstrip("/"), *parts]) if is_gcs(base) else os.path.join(base, *parts)


def absolute(path) -> str:
    """A local path made absolute (Orbax wants that); a gs:// path as it is."""
    return str(path) if is_gcs(path) else os.path.abspath(path)


def run_name(output_dir) -> str:
    """A run's name: its directory's (what exports and model cards are named after)."""
    return str(output_dir).rstrip("/").rsplit("/", 1)[-1]


def tokenizer_dir(output_dir) -> str:
    """Where a run keeps its tokenizer's files (checkpoint records point there). Not inside the
    checkpoint directory: on GCS, Orbax takes unknown folders there for unfinished steps."""
    return absolute(join(output_dir, "tokenizer"))


def write_text(path, text: str) -> None:
    """Writes the file whole: a GCS object appears complete; a local file is replaced by rename."""
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_gcs(path):
        p.write_text(text)
        return
    tmp = p.parent / f".{p.name}.tmp{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, p)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2))


def _steps_through(lines: list[str], last_step: int) -> list[str]:
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            pass
    return kept


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop the lines of a local per-step JSONL file logged after `last_step`, so that a resumed
    run continues it without duplicating the steps it repeats (never a half-written file)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = _steps_through(lines, last_step)
    if kept != lines:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


class JsonlFile:
    """Appends one JSON object per line, after dropping the lines an earlier run logged after
    `last_step` (a resumed run's checkpoint; -1 keeps none). Local files are flushed per line;
    gs:// objects are rewritten by `flush` (every `flush_seconds` at most, or when forced)."""

    def __init__(self, path, last_step: int, flush_seconds: float = 30.0):
        self.path = str(path)
        self.flush_seconds = flush_seconds
        if is_gcs(self.path):
            p = epath.Path(self.path)
            earlier = p.read_text().splitlines(keepends=True) if p.exists() else []
            self.lines = _steps_through(earlier, last_step)
            self.dirty, self.flushed_at = self.lines != earlier, time.monotonic()
            self.file = None
            self.flush()
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            truncate_jsonl(self.path, last_step)
            self.file = open(self.path, "a")

    def write(self, obj: dict) -> None:
        line = json.dumps(obj) + "\n"
        if self.file is not None:
            self.file.write(line)
            self.file.flush()
            return
        self.lines.append(line)
        self.dirty = True
        if time.monotonic() - self.flushed_at >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.file is None and self.dirty:
            epath.Path(self.path).write_text("".join(self.lines))
            self.dirty, self.flushed_at = False, time.monotonic()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        else:
            self.flush()


def copy_folder(local: str, dst) -> None:
    """Copy the files of a local folder to `dst` (local or gs://)."""
    target = epath.Path(dst)
    target.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as r, (target / name).open("wb") as w:
            shutil.copyfileobj(r, w, length=64 << 20)
