"""`python -m jaxsft.train --config configs/NAME.py`: the whole run, from config to export."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft import memory
from jaxsft import metrics as metrics_lib
from jaxsft.checkpoint import Checkpointer, is_converted, load_converted, truncate_jsonl
from jaxsft.data import DataPipeline
from jaxsft.eval import gsm8k_accuracy, side_by_side
from jaxsft.models import Decoder, ModelConfig, load_model, save_hf
from jaxsft.sharding import make_mesh, optimizer_shardings, param_shardings
from jaxsft.train.config import validate
from jaxsft.train.distributed import exit_on_failure, maybe_initialize_distributed
from jaxsft.train.optimizer import make_optimizer
from jaxsft.train.step import host_shardings, make_train_step

log = logging.getLogger("jaxsft.train")

def init_model(config, mesh) -> Decoder:
    m = config.model
    dtypes = dict(dtype=jnp.dtype(m.param_dtype), compute_dtype=jnp.dtype(m.compute_dtype))
    if m.init == "pretrained" and is_converted(m.path):  # made once by `python -m jaxsft.convert`
        return load_converted(m.path, mesh=mesh, remat=m.remat, attention=m.attention, **dtypes)
    if m.init == "pretrained":
        return load_model(m.path, mesh=mesh, remat=m.remat, attention=m.attention, **dtypes)
    # Random weights from the folder's config.json, created already sharded (never whole on one device).
    from jaxsft.models.hf_io import local_dir
    model_config = ModelConfig.from_json_file(
        os.path.join(local_dir(m.path), "config.json"), remat=m.remat, attention=m.attention)

    def create():
        return Decoder(model_config, param_dtype=dtypes["dtype"], compute_dtype=dtypes["compute_dtype"],
                       rngs=nnx.Rngs(config.train.seed))

    abstract = nnx.eval_shape(create)
    graphdef, state = nnx.split(abstract)
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=param_shardings(state, mesh))()
    return nnx.merge(graphdef, state)


def load_tokenizer(config):
    from transformers import AutoTokenizer
    from jaxsft.models.gguf import find_gguf, load_gguf_tokenizer
    from jaxsft.models.hf_io import local_dir
    path = config.data.tokenizer or config.model.path
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return load_gguf_tokenizer(gguf_file)
    return AutoTokenizer.from_pretrained(local_dir(path))


def to_global(batch: dict, sharding) -> dict:
    """Each process's rows of a micro-batch -> one global array per key."""
    n = jax.process_count()
    return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n, *v.shape[1:]))
            for k, v in batch.items()}


def evaluate(fns, params, batches, sharding) -> float | None:
    if not batches:
        return None
    total, count = 0.0, 0.0
    for b in batches:
        s, c = fns.eval_loss(params, to_global(b, sharding))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


@exit_on_failure
def run(config) -> dict:
    """Train as configured; returns the last step's metrics and the final eval loss."""
    validate(config)
    maybe_initialize_distributed()
    out = config.train.output_dir
    is_main = jax.process_index() == 0
    os.makedirs(out, exist_ok=True)
    if is_main:
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))

    mesh = make_mesh(**config.mesh)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    tokenizer = load_tokenizer(config)
    data = DataPipeline(config.data, tokenizer, num_batch_devices=batch_devices,
                        process_index=jax.process_index(), process_count=jax.process_count())
    if is_main:
        log.info("data: %s", json.dumps(data.summary))
        with open(os.path.join(out, "data_summary.json"), "w") as f:
            json.dump(data.summary, f, indent=2)
    total_steps = config.train.num_steps or math.ceil(config.train.num_epochs * data.steps_per_epoch)

    model = init_model(config, mesh)
    fits, memory_report = memory.check(config, model.config)
    if not fits:
        raise ValueError(f"this run does not fit in memory:\n{memory_report}")
    graphdef, params = nnx.split(model, nnx.Param)
    model_config = model.config
    del model
    tx, schedule = make_optimizer(config.optim, total_steps)
    param_sharding = param_shardings(params, mesh)
    opt_sharding = optimizer_shardings(tx, params, param_sharding, mesh)
    offload = config.optim.offload_state
    opt_state = jax.jit(tx.init, out_shardings=host_shardings(opt_sharding) if offload else opt_sharding)(params)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    fns = make_train_step(graphdef, tx, schedule, param_sharding, opt_sharding, batch_sharding,
                          offload_optimizer=offload)

    checkpointer = Checkpointer(os.path.abspath(config.checkpoint.dir or os.path.join(out, "checkpoints"))
                                if not (config.checkpoint.dir or "").startswith("gs://")
                                else config.checkpoint.dir, keep=config.checkpoint.keep,
                                keep_best=config.checkpoint.keep_best)
    start, latest = 0, None
    restored = checkpointer.restore_latest(params, opt_state) if config.checkpoint.resume else None
    if restored is not None:
        params, opt_state, record = restored
        data.set_state(record["data"])
        start = latest = record["step"]
        log.info("resumed from step %d", start)
    if is_main:
        # Lines logged after the restored step (by a killed run) are logged again by this one.
        # Step `start`'s own lines were written before its checkpoint (see `save`), step 0's were not.
        for name in ("metrics.jsonl", "eval.jsonl"):
            truncate_jsonl(os.path.join(out, name), start if start else -1)

    logger = metrics_lib.standard_logger(out, total_steps, config.train.progress and is_main, start) if is_main else None
    eval_batches = data.eval_microbatches()
    peak = metrics_lib.peak_flops_per_device()
    health = metrics_lib.HealthMonitor(config.health)
    last, eval_loss = {}, None
    # stop_after_steps ends the run early without changing its schedule (which spans total_steps).
    end = max(min(total_steps, config.train.stop_after_steps or total_steps), start)

    accuracy_results, eval_losses = [], []

    def run_eval(step):
        loss = evaluate(fns, params, eval_batches, batch_sharding)
        line = {} if loss is None else {"eval_loss": loss}
        if loss is not None:
            eval_losses.append((step, loss))
        if config.gsm8k.file:
            result = gsm8k_accuracy(config, nnx.merge(graphdef, params), tokenizer, step)
            accuracy_results.append(result)
            line["gsm8k_accuracy"] = result["accuracy"]
        if line and logger:
            logger.log_eval(step, line)
        return loss

    def save(step, eval_loss=None):
        # No randomness is drawn during training: init and data order come from these seeds.
        rng = {"train.seed": config.train.seed, "data.seed": config.data.seed}
        checkpointer.save(step, params, opt_state,
                          {"step": step, "data": data.get_state(), "rng": rng, "config": config.to_dict()},
                          eval_loss=eval_loss)

    if start == 0 and config.train.eval_at_start:
        eval_loss = run_eval(0)

    # Each step's metrics are read after the next step is dispatched, so the host never waits
    # for the device between steps; step time is the interval between two steps finishing.
    pending = None
    clock = [time.perf_counter()]

    def finish(pending):
        step, batch, device_metrics, flops = pending
        now = time.perf_counter()
        info = metrics_lib.StepInfo(step, batch, jax.device_get(device_metrics), flops, now - clock[0], peak)
        clock[0] = now
        line = health.check(step, metrics_lib.step_metrics(info))
        if logger and (step % config.train.log_every == 0 or step == end or "alerts" in line):
            logger.log(step, line)
        return line

    with jax.set_mesh(mesh), _close_on_divergence(checkpointer, data, logger):
        for step in range(start, end):
            batch = next(data)
            acc = fns.zero_accumulator(params)
            for mb in batch.microbatches:
                acc = fns.accumulate(acc, params, to_global(mb, batch_sharding))
            params, opt_state, device_metrics = fns.update(
                params, opt_state, acc, jnp.int32(batch.num_loss_tokens), jnp.int32(step))
            if pending is not None:
                last = finish(pending)
            flops = metrics_lib.step_flops(model_config, np.concatenate(
                [metrics_lib.segment_lengths(mb["segment_ids"]) for mb in batch.microbatches]))
            pending = (step + 1, batch, device_metrics, flops)
            every = [n for n in (config.train.eval_every, config.gsm8k.every) if n]
            if any((step + 1) % n == 0 for n in every) and step + 1 < end:
                eval_loss = run_eval(step + 1)
            if (config.checkpoint.every_steps and (step + 1) % config.checkpoint.every_steps == 0
                    and step + 1 < end):  # the last step is saved after the final eval
                # Health-check this step before its params are saved: a NaN state is never saved.
                # And its metrics line is logged before its checkpoint exists, so a run resumed
                # from it has every line (the save waits for this step's params anyway).
                last, pending = finish(pending), None
                save(step + 1, eval_loss if config.train.eval_every and
                     (step + 1) % config.train.eval_every == 0 else None)
        if pending is not None:
            last = finish(pending)
        eval_loss = run_eval(end)
    if latest != end:
        save(end, eval_loss)
    checkpointer.close()
    data.close()
    if config.train.export_hf:
        model = nnx.merge(graphdef, params)
        save_hf(model, os.path.join(out, "hf"), tokenizer=tokenizer, dtype=jnp.dtype(config.train.export_dtype))
    if logger:
        logger.close()
    if is_main and len(accuracy_results) > 1 and config.gsm8k.show:
        print(side_by_side(accuracy_results[0], accuracy_results[-1], config.gsm8k.show), flush=True)
    accuracy = [(r["step"], r["accuracy"]) for r in accuracy_results]
    return {**last, "eval_loss": eval_loss, "steps": end, "eval_losses": eval_losses, "gsm8k_accuracy": accuracy}


@contextlib.contextmanager
def _close_on_divergence(*resources):
    """A diverged run stops only after its last good checkpoint is completely written."""
    try:
        yield
    except metrics_lib.TrainingDiverged:
        for r in resources:
            if r is not None:
                r.close()
        raise
