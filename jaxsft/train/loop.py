"""`python -m jaxsft.train --config configs/NAME.py`: `setup` builds the run, `train` steps it,
`finish` saves and exports it. `run(config)` is the three in a row."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft import metrics as metrics_lib
from jaxsft import rundir, writer_lock
from jaxsft.evals.gsm8k import side_by_side
from jaxsft.hub import push_to_hub
from jaxsft.model_card import model_card
from jaxsft.models import gguf_export, peft_io, save_hf
from jaxsft.models.hf_io import local_dir
from jaxsft.train.config import validate
from jaxsft.train.distributed import exit_on_failure, maybe_initialize_distributed
from jaxsft.train.hooks import run_evals, save_checkpoint, to_global
from jaxsft.train.preemption import Preempted, PreemptionNotice
from jaxsft.train.setup import Run, setup

log = logging.getLogger("jaxsft.train")


# jax's compile phases (tracing, lowering, XLA): a step that compiles is timed without them.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
PAUSES = ("eval_s", "checkpoint_s", "compile_s")


class StepMetrics:
    """Each step's metrics are read once the next step is dispatched, so the host never waits
    for the device between steps. A step's time is the interval between two steps finishing,
    less what ran in between that is not training: evals and checkpoint saves (`pause`) and
    compiling. Those are logged on the next line as eval_s / checkpoint_s / compile_s, and
    `train_time` sums the steps' own times (the numerator of goodput)."""

    def __init__(self, run: Run):
        self.run = run
        self.health = metrics_lib.HealthMonitor(run.config.health)
        self.peak_flops = metrics_lib.peak_flops_per_device()
        self.pending = None
        self.finished_at = time.perf_counter()
        self.last: dict = {}
        self.paused = dict.fromkeys(PAUSES, 0.0)  # since the last step finished
        self.pausing = False
        self.train_time = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        # Compiles inside a pause (an eval's) are part of that pause; other threads' overlap the step.
        if event in COMPILE_EVENTS and not self.pausing and threading.current_thread() is threading.main_thread():
            self.paused["compile_s"] += duration

    @contextlib.contextmanager
    def pause(self, key: str):
        """Time spent in the block is not the next step's: it is logged as `key` instead."""
        start, self.pausing = time.perf_counter(), True
        try:
            yield
        finally:
            self.pausing = False
            self.paused[key] = self.paused.get(key, 0.0) + time.perf_counter() - start

    def push(self, step: int, batch, device_metrics) -> None:
        """Step `step` was dispatched: finish the one before it."""
        self.flush()
        # The FLOPs of the whole step (every process's samples), as MFU divides by every device.
        self.pending = (step, batch, device_metrics, metrics_lib.step_flops(self.run.model_config, batch.sample_lengths))

    def flush(self) -> None:
        """Wait for the pending step, health-check it and log its line."""
        if self.pending is None:
            return
        step, batch, device_metrics, flops = self.pending
        self.pending = None
        values = jax.device_get(device_metrics)
        now = time.perf_counter()
        step_time = max(now - self.finished_at - sum(self.paused.values()), 1e-6)
        info = metrics_lib.StepInfo(step, batch, values, flops, step_time, self.peak_flops)
        self.finished_at = now
        line = {**self.health.check(step, metrics_lib.step_metrics(info)), **self.paused}
        self.paused = dict.fromkeys(PAUSES, 0.0)
        self.train_time += step_time
        every = self.run.config.train.log_every
        if self.run.logger and (step % every == 0 or step == self.run.end or "alerts" in line):
            self.run.logger.log(step, line)
        self.last = line

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)


def train(run: Run, preemption: PreemptionNotice | None = None) -> Run:
    """Steps the run from `run.start` to `run.end`, calling its hooks; everything that traces
    the model (steps and evals) runs under the mesh. On a `preemption` notice it stops after the
    step every process agrees on (`run.preempted_at`), which `finish` saves."""
    run.step_metrics = StepMetrics(run)
    with jax.set_mesh(run.mesh), _close_on_divergence(run):
        if run.start == 0 and run.config.train.eval_at_start:
            with run.step_metrics.pause("eval_s"):
                run_evals(run, run.evals, 0)
        acc = run.fns.zero_accumulator(run.params, jnp.int32(run.start))  # the one gradient tree of the run
        for step in range(run.start, run.end):
            batch = next(run.data)
            for mb in batch.microbatches:
                acc = run.fns.accumulate(acc, run.params, to_global(mb, run.batch_sharding))
            run.params, device_metrics = run.state.update(run.params, acc, jnp.int32(batch.num_loss_tokens),
                                                          jnp.int32(step))
            acc = run.fns.clear_accumulator(acc, jnp.int32(step))  # the same buffers, zeroed for step + 1
            run.step_metrics.push(step + 1, batch, device_metrics)
            if preemption is not None and preemption.reached(step + 1):
                run.preempted_at = step + 1
                break
            if step + 1 < run.end:  # the last step's evals and checkpoint follow the loop
                evals = [e for e in run.evals if e.every and (step + 1) % e.every == 0]
                hooks = [h for h in run.hooks if (step + 1) % h.every == 0]
                if evals or hooks:
                    run.step_metrics.flush()  # this step is timed up to here, without them
                with run.step_metrics.pause("eval_s"):
                    run_evals(run, evals, step + 1)
                for hook in hooks:
                    with run.step_metrics.pause(f"{hook.name}_s"):
                        hook.call(run, step + 1)
        del acc  # the final evals and the export need its memory
        run.step_metrics.flush()
        run.step_metrics.close()
        if run.preempted_at is None:
            run_evals(run, run.evals, run.end)
    return run


def finish(run: Run) -> dict:
    """Saves the last step, exports, closes everything; returns the run's summary: the last
    step's metrics, the held-out loss and GSM8K accuracy histories. A preempted run saves the
    step it stopped at and raises `Preempted`."""
    last = run.end if run.preempted_at is None else run.preempted_at
    if not (run.resumed and run.start == last):
        save_checkpoint(run, last)
    run.checkpointer.close()
    run.data.close()
    if run.preempted_at is not None:
        if run.logger:
            run.logger.close()
        raise Preempted(f"stopped after step {last} of {run.end}, which is saved in "
                        f"{run.checkpointer.directory}; run the same command again to resume")
    c = run.config
    if run.frozen is not None:  # a LoRA run: its adapters as a Hugging Face PEFT folder
        peft_io.save_adapter(nnx.merge(run.graphdef, run.params, run.frozen),
                             rundir.join(run.output_dir, "adapter"), base_model_name_or_path=c.model.path)
    gsm8k = run.history.get("gsm8k", [])
    losses = [(r["step"], r["eval_loss"]) for r in run.history.get("heldout_loss", []) if "eval_loss" in r]
    summary = {**run.step_metrics.last, "train_time_s": run.step_metrics.train_time,
               "eval_loss": losses[-1][1] if losses else None, "steps": run.end,
               "eval_losses": losses, "gsm8k_accuracy": [(r["step"], r["accuracy"]) for r in gsm8k],
               "gsm8k_strict_match": [(r["step"], r["strict_match"]) for r in gsm8k],
               "gsm8k_answer_form": [(r["step"], r["answer_form"]) for r in gsm8k]}
    if c.train.export_hf:
        export_dir = rundir.join(run.output_dir, "hf")
        name = rundir.run_name(run.output_dir)
        dtype = jnp.dtype(c.train.export_dtype)
        save_hf(run.model(masters=dtype == jnp.float32), export_dir, tokenizer=run.tokenizer, dtype=dtype,
                name=name, model_card=model_card(c.to_dict(), name, summary))
        if c.train.push_to_hub and run.is_main:
            log.info("pushed %s to %s", export_dir, push_to_hub(local_dir(export_dir), c.train.push_to_hub))
    if c.train.export_gguf:
        name = rundir.run_name(run.output_dir)
        if run.frozen is not None:
            gguf_export.save_gguf_adapter(nnx.merge(run.graphdef, run.params, run.frozen),
                                          rundir.join(run.output_dir, "adapter.gguf"), name=name)
        gguf_export.save_gguf(run.model(), rundir.join(run.output_dir, "model.gguf"), run.tokenizer,
                              c.train.export_gguf, name=name)
    if run.logger:
        run.logger.close()
    if run.is_main and len(gsm8k) > 1 and c.gsm8k.show:
        print(side_by_side(gsm8k[0], gsm8k[-1], c.gsm8k.show), flush=True)
    return summary


@exit_on_failure
def run(config) -> dict:
    """Train as configured; returns `finish`'s summary with the run's wall time and goodput (the
    steps' own time over the wall time, setup and the final save and export included)."""
    started = time.perf_counter()
    validate(config)
    maybe_initialize_distributed()
    with writer_lock.holding(config.train.output_dir):
        the_run = setup(config)
        preemption = PreemptionNotice()  # once jax knows the processes (a SIGTERM before ends the process)
        try:
            summary = finish(train(the_run, preemption))
        finally:
            preemption.close()
    wall = time.perf_counter() - started
    return {**summary, "wall_time_s": wall, "goodput": summary["train_time_s"] / wall}


@contextlib.contextmanager
def _close_on_divergence(run: Run):
    """A diverged run stops only after its last good checkpoint is completely written."""
    try:
        yield
    except metrics_lib.TrainingDiverged:
        for resource in (run.checkpointer, run.data, run.logger):
            if resource is not None:
                resource.close()
        raise
