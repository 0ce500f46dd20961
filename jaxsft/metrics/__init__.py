"""Metrics: FLOP accounting for MFU, per-step metric functions, and sinks (metrics.jsonl,
TensorBoard, a tqdm progress bar, Weights & Biases).

The train loop only calls `step_metrics(StepInfo)` and `MetricsLogger.log`. Extending either
touches nothing else:
- a new metric is a function `StepInfo -> dict` decorated with `@register_metric`;
- a new sink is a class with `write(step, metrics)` and `close()`, made per run by a factory
  `(output_dir, total_steps, progress) -> sink` decorated with `@register_sink`.
A config file is Python run before training, so it may register both (tests/test_metrics.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from jaxsft import rundir

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
    """From the table above, or JAXSFT_PEAK_FLOPS_PER_DEVICE for a device it does not name."""
    if os.environ.get("JAXSFT_PEAK_FLOPS_PER_DEVICE"):
        return float(os.environ["JAXSFT_PEAK_FLOPS_PER_DEVICE"])
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
        # `flops` counts the whole step's samples (every process's), which all devices computed.
        line["mfu"] = info.flops / info.step_time_s / (info.peak_flops * jax.device_count())
    return line


@register_metric
def memory_metrics(info):
    memory = device_memory_gib()
    return {} if memory is None else {"device_memory_gib": memory}


class JsonlSink:
    """One line per step in a JSONL file (local or gs://). A resumed run drops the lines a killed
    run logged after `resumed_from` (its checkpoint), then appends."""

    def __init__(self, path, resumed_from=0):
        self.file = rundir.JsonlFile(path, resumed_from if resumed_from else -1)

    def write(self, step, metrics):
        self.file.write({"step": step, **metrics})

    def flush(self):
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
        # A gs:// events file is uploaded whole at every flush: at most every 30 s, and on `flush`.
        self.flush_seconds = 30.0 if rundir.is_gcs(logdir) else 0.0
        self.flushed_at = time.monotonic()

    def write(self, step, metrics):
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)
        if time.monotonic() - self.flushed_at >= self.flush_seconds:
            self.flush()

    def flush(self):
        self.writer.flush()
        self.flushed_at = time.monotonic()

    def close(self):
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (`metrics.wandb.*`). Lines are plotted against their `step` field,
    so a resumed run may log again the steps a killed run logged after its checkpoint. The run id
    is kept in `output_dir/wandb_run_id`: a resumed run continues the same W&B run (resume='allow'),
    a fresh start over the same directory begins a new one. WANDB_MODE, when set, overrides `mode`
    (as for any W&B program); 'offline' writes `output_dir/wandb/offline-run-*` for `wandb sync`."""

    def __init__(self, settings, output_dir, run_config=None, resumed=False):
        try:
            import wandb
        except ImportError:
            raise ImportError("metrics.wandb.project is set but wandb is not installed: "
                              "pip install 'jaxsft[wandb]'") from None
        id_file = epath.Path(rundir.join(output_dir, "wandb_run_id"))
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else None  # None: W&B makes one
        self.run = wandb.init(project=settings.project, entity=settings.entity or None, name=settings.name or None,
                              mode=os.environ.get("WANDB_MODE") or settings.mode, id=run_id, resume="allow",
                              # W&B's own files are local: under a gs:// run directory they go to ./wandb.
                              dir=None if rundir.is_gcs(output_dir) else output_dir, config=run_config)
        id_file.write_text(self.run.id)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, step, metrics):
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log({"step": step, **numbers})

    def close(self):
        self.run.finish()


class ConsoleSink:
    """A tqdm progress bar: steps, ETA, and the latest figures (an eval's stay shown until the
    next eval). The bar starts at the first trained step it is given (a resumed run's at its own
    step), so neither compilation, an eval at step 0, nor the steps before a resume count in the
    rate. A stream that is not a terminal (a log file) gets one line per logged step instead."""

    SHOWN = ("loss", "eval_loss", "gsm8k_accuracy", "grad_norm", "learning_rate", "tokens_per_s", "mfu", "alerts")

    def __init__(self, total_steps, stream=sys.stderr):
        self.total = total_steps
        self.stream = stream
        self.interactive = stream.isatty()
        self.bar = None
        self.latest = {}

    def write(self, step, metrics):
        self.latest.pop("alerts", None)  # alerts belong to their step only
        self.latest.update(metrics)
        if self.bar is None and step > 0:
            # Off a terminal tqdm never draws by itself (delay=inf): the lines are written below.
            self.bar = tqdm(total=self.total, initial=step, unit="step", file=self.stream,
                            dynamic_ncols=self.interactive, delay=0 if self.interactive else math.inf)
        if self.bar is None:
            return
        self.bar.set_postfix_str(" ".join(f"{k}={_fmt(self.latest[k])}" for k in self.SHOWN if k in self.latest),
                                 refresh=False)
        self.bar.update(step - self.bar.n)
        if self.interactive:
            self.bar.refresh()
        else:
            self.stream.write(str(self.bar) + "\n")
            self.stream.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _fmt(v):
    if isinstance(v, list):
        return ",".join(v).upper()
    return f"{v:.4g}" if isinstance(v, float) else str(v)


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

    def flush(self):
        """Make everything logged so far durable (before a checkpoint: a gs:// file is rewritten)."""
        for sink in self._unique():
            if hasattr(sink, "flush"):
                sink.flush()

    def close(self):
        for sink in self._unique():
            sink.close()

    def _unique(self):
        return {id(s): s for s in self.sinks + self.eval_sinks}.values()


def device_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**30


def standard_logger(output_dir, total_steps, progress=True, resumed_from=0, config=None) -> MetricsLogger:
    """metrics.jsonl and eval.jsonl in the run directory, TensorBoard events, the console, a W&B
    run when `config.metrics.wandb.project` is set (`config`: the run config, also recorded in
    W&B), and every registered sink (which gets both train and eval metrics).

    `output_dir` may be gs://. `resumed_from`: the step the run continues from; what an earlier
    run logged after it is dropped from the jsonl files and hidden in TensorBoard."""
    tensorboard = TensorBoardSink(rundir.join(output_dir, "tensorboard"), purge_step=resumed_from + 1 if resumed_from else 0)
    console = [ConsoleSink(total_steps)] if progress else []
    wandb = ([WandbSink(config.metrics.wandb, output_dir, config.to_dict(), resumed=resumed_from > 0)]
             if config is not None and config.metrics.wandb.project else [])
    extra = [s for s in (f(output_dir, total_steps, progress) for f in SINK_FACTORIES) if s is not None]
    return MetricsLogger(
        [JsonlSink(rundir.join(output_dir, "metrics.jsonl"), resumed_from), tensorboard, *console, *wandb, *extra],
        [JsonlSink(rundir.join(output_dir, "eval.jsonl"), resumed_from), tensorboard, *console, *wandb, *extra])


from jaxsft.metrics.health import HealthMonitor, TrainingDiverged, spikes  # noqa: E402,F401
