"""Metrics: FLOP accounting for MFU, per-step metric functions, and sinks (metrics.jsonl,
TensorBoard, console).

The train loop only calls `step_metrics(StepInfo)` and `MetricsLogger.log`. Extending either
touches nothing else:
- a new metric is a function `StepInfo -> dict` decorated with `@register_metric`;
- a new sink is a class with `write(step, metrics)` and `close()`, made per run by a factory
  `(output_dir, total_steps, progress) -> sink` decorated with `@register_sink`.
A config file is Python run before training, so it may register both (tests/test_metrics.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip, matched against `device.device_kind` (first match wins).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6", 918e12),
)


def peak_flops_per_device(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    return next((flops for name, flops in PEAK_FLOPS if name.lower() in kind.lower()), None)


def matmul_params(c) -> int:
    """Parameters that take part in a matmul per token (all but the embedding lookup)."""
    e, f, n, k, h = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    per_layer = e * (n + 2 * k) * h + n * h * e + 3 * e * f
    return c.num_layers * per_layer + e * c.vocab_size


def step_flops(c, segment_lengths: np.ndarray) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one step, given every packed sample's
    length: 6 per matmul parameter per token, plus causal attention within each sample."""
    n = segment_lengths.astype(np.float64)
    tokens = n.sum()
    causal_pairs = (n * (n + 1) / 2).sum()
    attention = 3 * c.num_layers * 4 * c.num_heads * c.head_dim * causal_pairs
    return 6 * matmul_params(c) * tokens + attention


def segment_lengths(segment_ids: np.ndarray) -> np.ndarray:
    """Lengths of all packed samples in a (rows, seq) array of 1-based segment ids (0 = padding)."""
    rows = np.repeat(np.arange(segment_ids.shape[0]), segment_ids.shape[1])
    keys = rows * (segment_ids.max() + 1) + segment_ids.reshape(-1)
    counts = np.bincount(keys[segment_ids.reshape(-1) > 0])
    return counts[counts > 0]


@dataclasses.dataclass
class StepInfo:
    """What one finished step offers to metric functions."""
    step: int
    batch: Any  # jaxsft.data Batch: num_samples, num_tokens, num_loss_tokens, microbatches, epoch
    values: dict  # the update's device metrics, fetched: loss, grad_norm, update_norm, ...
    flops: float
    step_time_s: float
    peak_flops: float | None  # per device; None where unknown (CPU)


METRIC_FNS: list[Callable[[StepInfo], dict]] = []
SINK_FACTORIES: list[Callable] = []


def register_metric(fn):
    METRIC_FNS.append(fn)
    return fn


def register_sink(factory):
    SINK_FACTORIES.append(factory)
    return factory


def step_metrics(info: StepInfo) -> dict:
    line = {}
    for fn in METRIC_FNS:
        line.update(fn(info))
    return line


@register_metric
def optimizer_metrics(info):
    return {k: float(v) for k, v in info.values.items()}


@register_metric
def throughput_metrics(info):
    b = info.batch
    line = {"samples": b.num_samples, "tokens": b.num_tokens, "loss_tokens": b.num_loss_tokens,
            "microbatches": len(b.microbatches), "epoch": b.epoch, "step_time_s": info.step_time_s,
            "tokens_per_s": b.num_tokens / info.step_time_s}
    if info.peak_flops:
        line["mfu"] = info.flops / info.step_time_s / (info.peak_flops * jax.device_count())
    return line


@register_metric
def memory_metrics(info):
    memory = device_memory_gib()
    return {} if memory is None else {"device_memory_gib": memory}


class JsonlSink:
    def __init__(self, path):
        self.file = open(path, "a")

    def write(self, step, metrics):
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class TensorBoardSink:
    def __init__(self, logdir, purge_step=None):
        from tensorboardX import SummaryWriter
        # TensorBoard hides the earlier files' events at steps >= purge_step: a resumed run's
        # steps replace those a killed run logged after its checkpoint.
        # The file name has whole seconds; the suffix keeps a run resumed within the same second
        # from overwriting the earlier file, and sorts after it as TensorBoard reads them.
        self.writer = SummaryWriter(logdir, purge_step=purge_step, filename_suffix=f".{time.time_ns()}")

    def write(self, step, metrics):
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class ConsoleSink:
    """One line that rewrites itself: progress, ETA and the latest figures."""

    SHOWN = ("loss", "eval_loss", "grad_norm", "learning_rate", "tokens_per_s", "mfu", "alerts")

    def __init__(self, total_steps, stream=sys.stderr):
        self.total = total_steps
        self.stream = stream
        self.start = time.time()
        self.first_step = None
        self.interactive = stream.isatty()

    def write(self, step, metrics):
        if self.first_step is None:
            self.first_step, self.start = step, time.time()
        done = step - self.first_step
        rate = done / max(time.time() - self.start, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else math.nan
        width = 24
        filled = int(width * step / max(self.total, 1))
        figures = " ".join(f"{k}={_fmt(metrics[k])}" for k in self.SHOWN if k in metrics)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} eta {_duration(eta)} {figures}"
        end = "\r" if self.interactive and step < self.total else "\n"
        self.stream.write(line + end)
        self.stream.flush()

    def close(self):
        pass


def _fmt(v):
    if isinstance(v, list):
        return ",".join(v).upper()
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    """Train metrics go to `sinks`; evaluation results to `eval_sinks` (a sink may be in both)."""

    def __init__(self, sinks, eval_sinks=()):
        self.sinks = list(sinks)
        self.eval_sinks = list(eval_sinks)

    def log(self, step, metrics):
        for sink in self.sinks:
            sink.write(step, metrics)

    def log_eval(self, step, metrics):
        for sink in self.eval_sinks:
            sink.write(step, metrics)

    def close(self):
        for sink in {id(s): s for s in self.sinks + self.eval_sinks}.values():
            sink.close()


def device_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**30


def standard_logger(output_dir, total_steps, progress=True, resumed_from=0) -> MetricsLogger:
    """metrics.jsonl and eval.jsonl in the run directory, TensorBoard events, the console, and
    every registered sink (which gets both train and eval metrics).

    `resumed_from`: the step the run continues from; TensorBoard then drops what an earlier run
    logged after it, as the jsonl files are truncated (see `train.loop`)."""
    tensorboard = TensorBoardSink(os.path.join(output_dir, "tensorboard"), purge_step=resumed_from + 1 if resumed_from else 0)
    console = [ConsoleSink(total_steps)] if progress else []
    extra = [s for s in (f(output_dir, total_steps, progress) for f in SINK_FACTORIES) if s is not None]
    return MetricsLogger(
        [JsonlSink(os.path.join(output_dir, "metrics.jsonl")), tensorboard, *console, *extra],
        [JsonlSink(os.path.join(output_dir, "eval.jsonl")), tensorboard, *console, *extra])


from jaxsft.metrics.health import HealthMonitor, TrainingDiverged, spikes  # noqa: E402,F401
