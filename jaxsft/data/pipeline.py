"""The training iterator: mixture epochs, exact-size steps of packed micro-batches, resumable state.

The samples of all epochs form one stream (epoch e's order is a seeded shuffle of the mixture);
step s takes stream samples [s * global_batch_size, (s + 1) * global_batch_size), packs them
into rows (first-fit decreasing) and groups the rows into fixed-shape micro-batches. The plan
depends only on the config, the seed and the sample lengths, so every process computes the same
plan; resuming needs only the step index.

Several processes: process p reads, tokenizes and holds only the records numbered p mod the
process count, and the processes exchange their samples' lengths, so sample ids and the epoch
orders are those of a single process. Each process packs the step's samples it holds into its own
rows; a step has as many micro-batches as the process with the most rows needs (the others add
empty ones), so the step's samples, tokens and exact loss are those of one process.

`steps_per_epoch` is ceil(samples per epoch / global_batch_size): the last step of an epoch is
completed with the first samples of the next epoch's order, so no sample is dropped.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import pickle
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxsft.data.chat import set_chat_template
from jaxsft.data.config import as_dict, normalize_phases, normalize_sources, validate_data_config
from jaxsft.data.packing import empty_batch, fill_row, first_fit_decreasing
from jaxsft.data.tokenize import TokenizedSource, default_cache_dir, load_or_tokenize

log = logging.getLogger("jaxsft.data")
SUMMARY_PACKING_STEPS = 64


@dataclass
class Step:
    microbatches: list[dict[str, np.ndarray]]  # this process's rows
    num_samples: int
    num_tokens: int
    num_loss_tokens: int
    epoch: float
    sample_lengths: np.ndarray  # the packed length of every sample of the step, on all processes


@dataclass
class SourceUse:
    pool: np.ndarray  # global sample ids this use draws from
    weight: float | None
    epochs: float | None


@dataclass
class Phase:
    uses: list[SourceUse]
    epochs: float
    replay_fraction: float


def _seed_of(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _draw(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` ids from `pool`: whole shuffled passes, then part of one more."""
    if count == 0:
        return np.zeros(0, np.int64)
    passes = -(-count // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(passes)])[:count]


def jax_allgather(obj) -> list:
    """`obj` of every process, in process order, through jax's multi-process collectives."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(every[p, : sizes[p]].tobytes()) for p in range(len(sizes))]


class DataPipeline:
    """Yields `Step`s forever; see the module docstring and `jaxsft.data.config` for the settings.

    `allgather(obj) -> [obj of process 0, 1, ...]` exchanges the sample lengths between processes;
    by default jax's collectives (all processes construct their pipelines together).
    `data.chat_template`, when set, is installed on `tokenizer` (so generation and export use it too).
    """

    def __init__(self, cfg, tokenizer, *, num_batch_devices: int = 1, process_index: int = 0, process_count: int = 1,
                 allgather=None):
        validate_data_config(cfg)
        global_rows = cfg.micro_batch_rows * num_batch_devices
        if global_rows % process_count:
            raise ValueError(
                f"data.micro_batch_rows ({cfg.micro_batch_rows}) x batch devices ({num_batch_devices}) = "
                f"{global_rows} rows per micro-batch, not divisible by process_count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
        if cfg.render == "chat_template":
            set_chat_template(tokenizer, cfg.chat_template)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.global_rows = global_rows
        self.local_rows = global_rows // process_count
        self.process_index, self.process_count = process_index, process_count
        self._allgather = allgather or (jax_allgather if process_count > 1 else lambda obj: [obj])
        self._settings = dict(
            render=cfg.render, loss_on=cfg.loss_on, system_prompt=cfg.system_prompt,
            on_bad_record=cfg.on_bad_record, template_kwargs=as_dict(cfg.chat_template_kwargs),
        )
        self._cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        self._tables: list[TokenizedSource] = []
        self._table_of_key: dict[str, int] = {}

        phases_cfg = (
            [dict(sources=normalize_sources(cfg.sources, "sources"), epochs=1.0, replay_fraction=0.0)]
            if cfg.mode == "stacked" else normalize_phases(cfg.phases)
        )
        train_tables = [[self._load(s) for s in p["sources"]] for p in phases_cfg]
        eval_tables = [self._load(s) for s in normalize_sources(cfg.eval_sources, "eval_sources")]
        self._index_samples()

        holdout = self._holdout(sorted({t for ts in train_tables for t in ts}))
        self._phases = [
            Phase(
                uses=[SourceUse(self._pool(t, holdout), s["weight"], s["epochs"]) for t, s in zip(ts, p["sources"])],
                epochs=float(p["epochs"]),
                replay_fraction=float(p["replay_fraction"]),
            )
            for ts, p in zip(train_tables, phases_cfg)
        ]
        for i, phase in enumerate(self._phases):
            for use, source in zip(phase.uses, phases_cfg[i]["sources"]):
                if not len(use.pool):
                    raise ValueError(f"data source {source['path']} has no usable sample left")
        if eval_tables:
            self._eval_ids = np.concatenate([self._pool(t, {}) for t in eval_tables])
        else:
            self._eval_ids = np.sort(np.concatenate([np.zeros(0, np.int64), *holdout.values()]))

        self._epoch_orders: dict[int, np.ndarray] = {}
        self.samples_per_epoch = len(self._epoch_order(0))
        self.steps_per_epoch = max(1, math.ceil(self.samples_per_epoch / cfg.global_batch_size))
        self._next_step = 0
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.summary = self._summarize()
        log.info("data summary: %s", json.dumps(self.summary))

    # --- loading and per-sample bookkeeping ---

    def _load(self, source: dict) -> int:
        table = load_or_tokenize(source, self.tokenizer, self._settings, self._cache_dir,
                                 shard=(self.process_index, self.process_count))
        key = table.info["cache_key"]
        if key not in self._table_of_key:
            self._table_of_key[key] = len(self._tables)
            self._tables.append(table)
        return self._table_of_key[key]

    def _index_samples(self) -> None:
        """Per global sample id: packed length and loss tokens after truncation, whether it is
        used, and which process holds it at which index of its table."""
        cap = self.cfg.max_seq_len
        local = []
        for table in self._tables:
            starts = table.offsets[:-1]
            length = np.minimum(np.diff(table.offsets), cap + 1) - 1
            over = np.diff(table.offsets) - 1 > cap
            # Labels are mask[1:length + 1]: the first token is never a target.
            loss = np.add.reduceat(table.loss_mask, starts, dtype=np.int64) - table.loss_mask[starts] if len(starts) else starts
            for i in np.flatnonzero(over):
                loss[i] = int(table.loss_mask[starts[i] + 1 : starts[i] + length[i] + 1].sum())
            local.append(dict(records=table.records, length=length, loss=loss, over=over, info=table.info))
        everyone = self._allgather(local)
        if len(everyone) != self.process_count:
            raise ValueError(
                f"the data pipeline of process {self.process_index} of {self.process_count} exchanged sample "
                f"lengths with {len(everyone)} process(es): start jax.distributed in every process first "
                "(jaxsft.train.distributed) or pass allgather=")

        packed, losses, overs, records, owners, local_indices, bases = [], [], [], [], [], [], [0]
        for t, table in enumerate(self._tables):
            shards = [every[t] for every in everyone]
            # Sample ids in record order, as one process would number them.
            order = np.argsort(np.concatenate([s["records"] for s in shards]), kind="stable")
            for out, key in ((packed, "length"), (losses, "loss"), (overs, "over")):
                out.append(np.concatenate([s[key] for s in shards]).astype(np.int64)[order])
            records.append(np.concatenate([s["records"] for s in shards])[order])
            owners.append(np.concatenate([np.full(len(s["records"]), p) for p, s in enumerate(shards)])[order])
            local_indices.append(np.concatenate([np.arange(len(s["records"])) for s in shards])[order])
            bases.append(bases[-1] + len(order))
            table.info = _merge_infos([s["info"] for s in shards])
        self._bases = np.array(bases)
        self._packed_len = np.concatenate(packed)
        self._record = np.concatenate(records).astype(np.int64)
        self._loss_count = np.concatenate(losses)
        self._owner = np.concatenate(owners).astype(np.int64)
        self._local_index = np.concatenate(local_indices).astype(np.int64)
        over = np.concatenate(overs).astype(bool)
        has_loss = self._loss_count > 0
        self._dropped_no_loss = int((~has_loss & ~over).sum())
        self._dropped_over_length = self._truncated = self._dropped_no_loss_after_truncation = 0
        if self.cfg.on_overlength == "drop":
            self._dropped_over_length = int(over.sum())
            self._keep = has_loss & ~over
        else:
            self._truncated = int((over & has_loss).sum())
            self._dropped_no_loss_after_truncation = int((over & ~has_loss).sum())
            self._keep = has_loss

    def _pool(self, table: int, holdout: dict[int, np.ndarray]) -> np.ndarray:
        ids = np.arange(self._bases[table], self._bases[table + 1])
        ids = ids[self._keep[ids]]
        return np.setdiff1d(ids, holdout[table]) if table in holdout else ids

    def _holdout(self, tables: list[int]) -> dict[int, np.ndarray]:
        """Per table, the held-out sample ids: all samples of a share of the source's records,
        drawn from the seed, the path and the record count (not from what tokenization kept)."""
        if not self.cfg.eval_fraction:
            return {}
        out = {}
        for t in tables:
            count = self._tables[t].info["records"]
            rng = np.random.default_rng([self.cfg.seed, _seed_of(self._tables[t].info["path"])])
            held = rng.permutation(count)[: round(self.cfg.eval_fraction * count)]
            ids = self._pool(t, {})
            out[t] = ids[np.isin(self._record[ids], held)]
        return out

    # --- the plan ---

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_orders:
            rng = np.random.default_rng([self.cfg.seed, epoch])
            blocks, earlier = [], []
            for phase in self._phases:
                weights = [u.weight for u in phase.uses]
                total = sum(len(u.pool) for u in phase.uses)
                if weights[0] is not None:
                    counts = [w / sum(weights) * total for w in weights]
                else:
                    counts = [(u.epochs or 1.0) * len(u.pool) for u in phase.uses]
                own = [_draw(u.pool, round(phase.epochs * c), rng) for u, c in zip(phase.uses, counts)]
                own_count = sum(len(o) for o in own)
                r = phase.replay_fraction
                replay = _draw(np.unique(np.concatenate(earlier)), round(own_count * r / (1 - r)), rng) if r else []
                blocks.append(rng.permutation(np.concatenate([*own, replay]).astype(np.int64)))
                earlier.extend(u.pool for u in phase.uses)
            self._epoch_orders = {e: o for e, o in self._epoch_orders.items() if e >= epoch - 1}
            self._epoch_orders[epoch] = np.concatenate(blocks)
            if not len(self._epoch_orders[epoch]):
                raise ValueError("the data mixture is empty")
        return self._epoch_orders[epoch]

    def _step_sample_ids(self, step: int) -> np.ndarray:
        size, n = self.cfg.global_batch_size, self.samples_per_epoch
        start, parts = step * size, []
        while size:
            epoch, offset = divmod(start, n)
            part = self._epoch_order(epoch)[offset : offset + size]
            parts.append(part)
            start += len(part)
            size -= len(part)
        return np.concatenate(parts)

    def _microbatch_rows(self, ids: np.ndarray) -> list[list[list[list[int]]]]:
        """Micro-batches of packed rows of global sample ids: microbatches[m][p] is process p's
        rows (at most `local_rows`) of micro-batch m; each process packs the samples it holds."""
        per_process = []
        for p in range(self.process_count):
            own = ids[self._owner[ids] == p]
            rows = first_fit_decreasing(self._packed_len[own], self.cfg.max_seq_len)
            per_process.append([[int(own[i]) for i in row] for row in rows])
        n = self.local_rows
        count = max(-(-len(rows) // n) for rows in per_process)
        return [[rows[m * n : (m + 1) * n] for rows in per_process] for m in range(count)]

    def _materialize(self, microbatch: list[list[list[int]]]) -> dict[str, np.ndarray]:
        batch = empty_batch(self.local_rows, self.cfg.max_seq_len)
        for r, row in enumerate(microbatch[self.process_index]):
            fill_row(batch, r, [self._sample(g) for g in row])
        return batch

    def _sample(self, gid: int) -> tuple[np.ndarray, np.ndarray]:
        assert self._owner[gid] == self.process_index, "a process materialises only the samples it read"
        table = int(np.searchsorted(self._bases, gid, side="right")) - 1
        tokens, mask = self._tables[table].sample(int(self._local_index[gid]))
        n = self._packed_len[gid] + 1
        return tokens[:n], mask[:n]

    def _make_step(self, step: int) -> Step:
        ids = self._step_sample_ids(step)
        return Step(
            microbatches=[self._materialize(rows) for rows in self._microbatch_rows(ids)],
            num_samples=len(ids),
            num_tokens=int(self._packed_len[ids].sum()),
            num_loss_tokens=int(self._loss_count[ids].sum()),
            epoch=(step + 1) * self.cfg.global_batch_size / self.samples_per_epoch,
            sample_lengths=self._packed_len[ids],
        )

    # --- iteration, prefetch and state ---

    def __iter__(self):
        return self

    def __next__(self) -> Step:
        if self.cfg.prefetch == 0:
            step = self._make_step(self._next_step)
        else:
            if self._thread is None:
                self._start_prefetch()
            step = self._queue.get()
            if isinstance(step, BaseException):
                self.close()
                raise step
        self._next_step += 1
        return step

    def _start_prefetch(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.cfg.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._next_step,), daemon=True, name="jaxsft-data")
        self._thread.start()

    def _produce(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item = self._make_step(step)
            except BaseException as e:  # handed to the consumer, which re-raises it
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if isinstance(item, BaseException):
                return
            step += 1

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def get_state(self) -> dict:
        return {
            "step": self._next_step,
            "seed": self.cfg.seed,
            "global_batch_size": self.cfg.global_batch_size,
            "samples_per_epoch": self.samples_per_epoch,
        }

    def set_state(self, state: dict) -> None:
        for key in ("seed", "global_batch_size", "samples_per_epoch"):
            if state[key] != self.get_state()[key]:
                raise ValueError(
                    f"cannot resume the data iterator: {key} was {state[key]} when saved and is "
                    f"{self.get_state()[key]} now, so step {state['step']} would not be the next batch"
                )
        self.close()
        self._next_step = int(state["step"])

    def eval_microbatches(self) -> list[dict[str, np.ndarray]]:
        """Every held-out sample exactly once, in fixed-shape micro-batches, in a fixed order."""
        size = self.cfg.global_batch_size
        return [
            self._materialize(rows)
            for i in range(0, len(self._eval_ids), size)
            for rows in self._microbatch_rows(self._eval_ids[i : i + size])
        ]

    # --- summary ---

    def _summarize(self) -> dict:
        skipped = collections.Counter()
        for table in self._tables:
            skipped.update(table.info["skipped"])
        order = self._epoch_order(0)
        rows = padded_rows = tokens = 0
        steps = min(self.steps_per_epoch, SUMMARY_PACKING_STEPS)
        per_step = []
        for s in range(steps):
            ids = self._step_sample_ids(s)
            groups = self._microbatch_rows(ids)
            rows += sum(len(rows_of_process) for g in groups for rows_of_process in g)
            padded_rows += len(groups) * self.global_rows
            tokens += int(self._packed_len[ids].sum())
            per_step.append(len(groups))
        capacity = self.cfg.max_seq_len
        return {
            "sources": [
                {k: t.info[k] for k in ("path", "format", "records", "samples", "skipped", "tokens", "loss_tokens")}
                for t in self._tables
            ],
            "records_read": sum(t.info["records"] for t in self._tables),
            "samples_read": sum(t.info["samples"] for t in self._tables),
            "skipped": dict(skipped),
            "truncated": self._truncated,
            "dropped": {
                "over_length": self._dropped_over_length,
                "no_loss_after_truncation": self._dropped_no_loss_after_truncation,
                "no_loss_tokens": self._dropped_no_loss,
            },
            "train_samples_per_epoch": self.samples_per_epoch,
            "eval_samples": len(self._eval_ids),
            "tokens_per_epoch": int(self._packed_len[order].sum()),
            "loss_tokens_per_epoch": int(self._loss_count[order].sum()),
            "steps_per_epoch": self.steps_per_epoch,
            "global_batch_size": self.cfg.global_batch_size,
            "max_seq_len": capacity,
            "rows_per_microbatch": self.global_rows,
            "packing_efficiency": round(tokens / (rows * capacity), 4),
            "batch_efficiency": round(tokens / (padded_rows * capacity), 4),
            "microbatches_per_step": {"min": min(per_step), "max": max(per_step), "mean": round(float(np.mean(per_step)), 2)},
            "packing_measured_steps": steps,
        }


def _merge_infos(infos: list[dict]) -> dict:
    """One source's summary from its shards' summaries."""
    skipped = collections.Counter()
    for info in infos:
        skipped.update(info["skipped"])
    merged = {**infos[0], "skipped": dict(skipped)}
    for key in ("records", "samples", "tokens", "loss_tokens"):
        merged[key] = sum(info[key] for info in infos)
    return merged
