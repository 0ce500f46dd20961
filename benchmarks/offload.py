"""The optimizer's memory tiers: update time per step with the state on the devices, in host memory
and on local disk, and the disk tier's achieved read/write bandwidth beside the raw bandwidth of the
same disk, measured in the same run.

    python benchmarks/offload.py [--shapes smollm2,1b] [--dir /local/disk/dir] [--steps 3]

Writes benchmarks/results/offload_<device>.json. Only the update is timed (the accumulator holds
random gradients): the forward and backward passes are the same in every tier. The overhead is
reported as a fraction of a step of the paper's recipe, 3,840 samples per optimizer step, from the
measured accumulate time of one micro-batch (samples of `--sample-tokens` tokens).

A tier whose run does not fit is skipped, with the reason in the JSON: its compiled memory plan
(`jaxsft.memory.plan`, before any weight is made) against the device's memory, and on CPU, where
the devices' memory is host memory, device peak + host bytes against the host's available memory.
The accumulate rate is measured in the first tier that runs. Results of other shapes already in
the JSON file are kept.

Raw disk bandwidth: a file as large as the offloaded state written in 64 MiB blocks and fsync'ed,
then read back. Caveat: the read comes through the page cache unless the kernel dropped the file's
pages (we ask it to with posix_fadvise(DONTNEED) after the fsync); TensorStore's reads see the same
cache, so the comparison is like for like, but neither is the bare device's figure when the state fits
in free RAM. Writes are fsync'ed in the raw figure; TensorStore's writes end when the data is in
the page cache (no fsync), so the achieved write figure can exceed the raw one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft import memory
from jaxsft.checkpoint import flatten, unflatten
from jaxsft.memory import parameter_count
from jaxsft.models import Decoder, ModelConfig
from jaxsft.sharding import make_mesh, optimizer_shardings, param_shardings
from jaxsft.train import default_config
from jaxsft.train.offload import Offloaded
from jaxsft.train.state import OnDevice
from jaxsft.train.optimizer import make_optimizer
from jaxsft.train.step import make_train_step

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, tie_word_embeddings=True),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
               num_kv_heads=8, head_dim=64, tie_word_embeddings=True),
}
RECIPE_SAMPLES = 3840
BLOCK = 64 * 2**20


def raw_disk_bandwidth(directory: str, size: int) -> dict:
    path = os.path.join(directory, "raw.bin")
    block = np.random.default_rng(0).integers(0, 255, BLOCK, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, size // BLOCK)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    written = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t0 = time.perf_counter()
    while os.read(fd, BLOCK):
        pass
    read_s = time.perf_counter() - t0
    os.close(fd)
    os.remove(path)
    return {"bytes": written, "write_gb_s": written / write_s / 1e9, "read_gb_s": written / read_s / 1e9}


def available_host_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def cannot_fit(c: ModelConfig, tier: str, mesh, seq: int, rows: int) -> dict[str, str]:
    """Why `tier` cannot run the update, or the accumulate, of this shape here ('' when it fits),
    from the compiled memory plan."""
    config = default_config()
    config.model.remat, config.optim.offload = "full", tier
    config.data.max_seq_len, config.data.micro_batch_rows = seq, rows
    with jax.set_mesh(mesh):
        plan = memory.plan(config, c, mesh, advise=False)
    reasons = {}
    for part in ("update", "accumulate"):
        peak = max(v["peak"] for k, v in plan.programs.items() if k.startswith(part))
        if jax.devices()[0].platform == "cpu":  # the devices' memory is the host's
            need, have = peak + plan.host, available_host_bytes()
            reasons[part] = "" if need <= memory.HEADROOM * have else (
                f"needs {need / 1e9:.1f} GB of RAM ({part} peak {peak / 1e9:.1f} + host {plan.host / 1e9:.1f}), "
                f"{have / 1e9:.1f} GB available")
        else:
            reasons[part] = "" if plan.host_fits and peak <= memory.HEADROOM * (plan.device_bytes or math.inf) \
                else plan.report
    return reasons


def bench_shape(name: str, directory: str, steps: int, seq: int, rows: int, sample_tokens: int,
                rate_from: tuple[str, float] | None = None) -> dict:
    """rate_from: (shape, accumulate tokens/s) measured for another shape, to estimate the recipe
    step when this one cannot accumulate here."""
    c = ModelConfig(architecture="LlamaForCausalLM", remat="full", attention="xla", **SHAPES[name])
    mesh = make_mesh()
    abstract = nnx.eval_shape(lambda: Decoder(c, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    shardings = param_shardings(state, mesh)
    optim = default_config().optim
    tx, schedule = make_optimizer(optim, 1000)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    n = parameter_count(c)[0]
    result = {"parameters": n, "state_bytes": n * 12}

    def fresh_params():  # random weights (the update's time does not depend on their values)
        flat = flatten(shardings)
        return fill_randomly(unflatten(state, {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=flat[k])
                                               for k, x in flatten(state).items()}), scale=0.02)

    for tier in ("none", "host", "disk"):
        reasons = cannot_fit(c, tier, mesh, seq, rows)
        if reasons["update"]:
            result[tier] = {"skipped": reasons["update"]}
            print(f"{name} {tier}: skipped, {reasons['update']}", flush=True)
            continue
        params = fresh_params()
        opt_sharding = optimizer_shardings(tx, params, shardings, mesh)
        fns = make_train_step(graphdef, tx, schedule, shardings, opt_sharding, batch_sharding)
        offload = None
        if tier == "none":
            opt = OnDevice(jax.jit(tx.init, out_shardings=opt_sharding)(params), fns.apply_update)
        else:
            offload = opt = Offloaded(tier, os.path.join(directory, f"{name}-live"), params, shardings, optim,
                                        schedule, jnp.bfloat16, c.num_layers, group_layers=1)
            params = offload.init(params)
        times = []
        for i in range(steps + 1):
            acc = {"grads": fill_randomly(jax.tree.map(
                lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding), params), scale=1e-3),
                "loss_sum": jnp.float32(1.0)}
            jax.block_until_ready(acc)
            t0 = time.perf_counter()
            params, metrics = opt.update(params, acc, jnp.int32(100), jnp.int32(i))
            jax.block_until_ready((params, metrics))
            times.append(time.perf_counter() - t0)
        result[tier] = {"update_s": float(np.median(times[1:])), "first_update_s": times[0]}
        if tier == "disk":
            # Each update reads and writes every master weight and moment once.
            moved = result["state_bytes"]
            result[tier]["read_write_gb_s"] = 2 * moved / result[tier]["update_s"] / 1e9
            result[tier]["group_layers"] = offload.group_layers
        if "recipe_step_s" not in result and reasons["accumulate"]:
            result["accumulate_skipped"] = reasons["accumulate"]
        elif "recipe_step_s" not in result:
            # The step the update is a part of: accumulate time of one micro-batch.
            batch = {k: jax.device_put(np.ones((rows * jax.device_count(), seq), np.float32 if k == "loss_mask"
                                               else np.int32), batch_sharding)
                     for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}
            acc = fns.zero_accumulator(params)
            acc = fns.accumulate(acc, params, batch)
            jax.block_until_ready(acc)
            t0 = time.perf_counter()
            acc = fns.accumulate(acc, params, batch)
            jax.block_until_ready(acc)
            micro_s = time.perf_counter() - t0
            tokens = rows * jax.device_count() * seq
            result["accumulate_tokens_per_s"] = tokens / micro_s
            result["recipe_step_s"] = RECIPE_SAMPLES * sample_tokens / result["accumulate_tokens_per_s"]
            result.pop("accumulate_skipped", None)
        if offload is not None:
            offload.close()
        del params, opt, fns
        shutil.rmtree(os.path.join(directory, f"{name}-live"), ignore_errors=True)  # disk for the raw test
    if "recipe_step_s" not in result and rate_from:  # no tier could accumulate this shape here
        shape, rate = rate_from
        result["recipe_step_s"] = RECIPE_SAMPLES * sample_tokens / (rate * parameter_count(
            ModelConfig(architecture="LlamaForCausalLM", **SHAPES[shape]))[0] / n)
        result["recipe_step_estimated_from"] = (f"{shape}'s accumulate rate ({rate:.1f} tokens/s) scaled by "
                                                "the parameter counts (6 x parameters FLOPs per token)")
    for tier in ("none", "host", "disk"):
        if "update_s" in result[tier] and "recipe_step_s" in result:
            result[tier]["fraction_of_recipe_step"] = result[tier]["update_s"] / result["recipe_step_s"]
    if "update_s" in result["disk"]:
        result["raw_disk"] = raw_disk_bandwidth(directory, result["state_bytes"])
        result["disk"]["fraction_of_raw_bandwidth"] = result["disk"]["read_write_gb_s"] / (
            2 / (1 / result["raw_disk"]["read_gb_s"] + 1 / result["raw_disk"]["write_gb_s"]))
    return result


def fill_randomly(like, scale: float):
    """Arrays of `like`'s ShapeDtypeStructs (with shardings) drawn from a normal times `scale`, one
    array at a time: drawing a whole 1B-parameter tree in one program takes XLA:CPU 12 GB of
    temporaries."""
    def draw(i, x):
        fn = jax.jit(lambda key: (jax.random.normal(key, x.shape, jnp.float32) * scale).astype(x.dtype),
                     out_shardings=x.sharding)
        return jax.block_until_ready(fn(jax.random.key(i)))
    leaves, structure = jax.tree.flatten(like)
    return jax.tree.unflatten(structure, [draw(i, x) for i, x in enumerate(leaves)])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="smollm2,1b")
    parser.add_argument("--dir", default="")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--sample-tokens", type=int, default=256)
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="jaxsft-offload-bench-")
    device = jax.devices()[0].platform
    out = {"device": f"{device} x {jax.device_count()}", "recipe_samples_per_step": RECIPE_SAMPLES,
           "sample_tokens": args.sample_tokens, "dir": directory, "shapes": {}}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"offload_{device}.json")
    kept = {}
    if os.path.exists(path):  # keep the other shapes' results
        with open(path) as f:
            kept = json.load(f).get("shapes", {})
    for name in args.shapes.split(","):
        measured = [(k, v["accumulate_tokens_per_s"]) for k, v in {**kept, **out["shapes"]}.items()
                    if "accumulate_tokens_per_s" in v]
        out["shapes"][name] = bench_shape(name, directory, args.steps, args.seq, args.rows, args.sample_tokens,
                                          measured[0] if measured else None)
        print(json.dumps({name: out["shapes"][name]}, indent=1), flush=True)
    out["shapes"] = {**kept, **out["shapes"]}
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
