"""Padding-free packing: samples into fixed-length rows with segment ids and per-sample positions."""

from __future__ import annotations

import numpy as np

FIELDS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Groups item indices into rows whose lengths sum to at most `capacity` (every length <= capacity)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    free = np.full(len(order) + 1, capacity, np.int64)
    rows: list[list[int]] = []
    for i in order:
        # free[len(rows)] is an unopened row, so argmax always finds a fit.
        r = int(np.argmax(free[: len(rows) + 1] >= lengths[i]))
        if r == len(rows):
            rows.append([])
        rows[r].append(int(i))
        free[r] -= lengths[i]
    return rows


def empty_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    batch = {name: np.zeros((rows, seq_len), np.int32) for name in FIELDS}
    batch["loss_mask"] = np.zeros((rows, seq_len), np.float32)
    return batch


def fill_row(batch: dict[str, np.ndarray], row: int, samples) -> None:
    """Writes shifted samples back to back into `row`; each sample is (tokens, mask) of length L + 1."""
    start = 0
    for segment, (tokens, mask) in enumerate(samples, 1):
        n = len(tokens) - 1
        end = start + n
        batch["input_ids"][row, start:end] = tokens[:-1]
        batch["targets"][row, start:end] = tokens[1:]
        batch["loss_mask"][row, start:end] = mask[1:]
        batch["segment_ids"][row, start:end] = segment
        batch["positions"][row, start:end] = np.arange(n, dtype=np.int32)
        start = end
