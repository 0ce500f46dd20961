"""LoRA (r=16, all-linear) and QLoRA (the same adapters on an NF4 base) against full fine-tuning on
the SmolLM2-135M shape: train-step tokens/s, the steps' peak memory (XLA's memory analysis of the
compiled accumulate and update), the base weights' device bytes and the optimizer-state bytes, in
one process.

    python benchmarks/lora.py                 # CPU: writes benchmarks/results/lora_cpu.json
    python benchmarks/lora.py --seq 2048 --rows 8 --steps 10   # on a GPU (lora_gpu.json)

All runs use the same random weights, rows and optimizer (AdamW, fp32 state); the base weights
are fp32 in the first two, so their difference is only what LoRA leaves out: base-weight gradients
(their matmuls, the fp32 accumulator) and their optimizer state. QLoRA stores the projections as NF4
(embeddings and norms stay fp32) and dequantizes each layer's inside the step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft.models import Decoder, ModelConfig, lora
from jaxsft.models.loading import quantized
from jaxsft.sharding import make_mesh, optimizer_shardings, param_shardings
from jaxsft.train import default_config
from jaxsft.train.optimizer import make_optimizer
from jaxsft.train.step import make_train_step

HERE = os.path.dirname(os.path.abspath(__file__))
SMOLLM2_135M = ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576,
                           intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                           tie_word_embeddings=True, remat="full", attention="xla")


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(r: int, rows: int, seq: int, steps: int, compute_dtype, nf4: bool = False) -> dict:
    mesh = make_mesh(devices=jax.devices()[:1])
    model = Decoder(SMOLLM2_135M, param_dtype=jnp.float32, compute_dtype=compute_dtype, rngs=nnx.Rngs(0))
    if nf4:
        model = quantized(model, mesh)
    frozen = frozen_sharding = None
    if r:
        lora_config = default_config().lora
        lora_config.update(r=r, alpha=2.0 * r, target_modules="all-linear")
        lora.attach(model, lora.make_spec(lora_config, model.config), mesh=mesh)
        graphdef, params, frozen = nnx.split(model, lora.LoraParam, nnx.Param)
        frozen_sharding = param_shardings(frozen, mesh)
    else:
        graphdef, params = nnx.split(model, nnx.Param)
    optim = default_config().optim
    optim.learning_rate = 2e-4 if r else 2e-5
    tx, schedule = make_optimizer(optim, total_steps=steps + 1)
    shardings = param_shardings(params, mesh)
    opt_sharding = optimizer_shardings(tx, params, shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    fns = make_train_step(graphdef, tx, schedule, shardings, opt_sharding, batch_sharding,
                          frozen=frozen, frozen_sharding=frozen_sharding)
    rng = np.random.RandomState(0)
    ids = rng.randint(1, SMOLLM2_135M.vocab_size, (rows, seq + 1)).astype(np.int32)
    batch = jax.device_put({"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                            "loss_mask": np.ones((rows, seq), np.float32),
                            "segment_ids": np.ones((rows, seq), np.int32),
                            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()},
                           batch_sharding)
    tokens = jnp.int32(rows * seq)

    # XLA's view of the two jitted steps: what they keep alive at their peak.
    acc = fns.zero_accumulator(params, jnp.int32(0))  # the loop's one gradient tree
    accumulate = fns.accumulate.func.lower(frozen, acc, params, batch).compile().memory_analysis()
    update = fns.apply_update.lower(params, opt_state, acc, tokens, jnp.int32(0)).compile().memory_analysis()

    def step(params, opt_state, acc, i):
        acc = fns.accumulate(acc, params, batch)
        return fns.update(params, opt_state, acc, tokens, jnp.int32(i))

    with jax.set_mesh(mesh):
        params, opt_state, acc, metrics = step(params, opt_state, acc, 0)  # compile
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for i in range(steps):
            params, opt_state, acc, metrics = step(params, opt_state, acc, i + 1)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / steps

    def peak(m):
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)

    return {
        "tokens_per_s": rows * seq / seconds, "step_s": seconds, "loss": float(metrics["loss"]),
        "trained_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "trained_params_bytes": tree_bytes(params),
        "frozen_params_bytes": 0 if frozen is None else tree_bytes(frozen),
        "optimizer_state_bytes": tree_bytes(opt_state),
        "grad_accumulator_bytes": tree_bytes(acc["grads"]),
        "accumulate_peak_bytes": peak(accumulate), "accumulate_temp_bytes": int(accumulate.temp_size_in_bytes),
        "update_peak_bytes": peak(update),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    device = jax.devices()[0].platform
    # CPU: bf16 matmuls are slower there, so both runs compute in fp32 (as the CPU quickstarts do).
    compute_dtype = jnp.float32 if device == "cpu" else jnp.bfloat16
    full = measure(0, args.rows, args.seq, args.steps, compute_dtype)
    adapted = measure(args.rank, args.rows, args.seq, args.steps, compute_dtype)
    adapted_nf4 = measure(args.rank, args.rows, args.seq, args.steps, compute_dtype, nf4=True)
    result = {
        "device": device, "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
        "python": platform.python_version(), "shape": "SmolLM2-135M (random weights)",
        "rows": args.rows, "seq": args.seq, "timed_steps": args.steps, "compute_dtype": jnp.dtype(compute_dtype).name,
        "remat": SMOLLM2_135M.remat, "lora": {"r": args.rank, "alpha": 2 * args.rank, "target_modules": "all-linear"},
        "full_finetuning": full, "lora_run": adapted, "qlora_run": adapted_nf4,
        "lora_speedup": adapted["tokens_per_s"] / full["tokens_per_s"],
        "qlora_speed_vs_lora": adapted_nf4["tokens_per_s"] / adapted["tokens_per_s"],
        "qlora_base_bytes_vs_lora": adapted_nf4["frozen_params_bytes"] / adapted["frozen_params_bytes"],
        "optimizer_state_ratio": adapted["optimizer_state_bytes"] / full["optimizer_state_bytes"],
    }
    out = os.path.join(HERE, "results", f"lora_{device}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    assert result["lora_speedup"] > 1, "LoRA must be faster than full fine-tuning"


if __name__ == "__main__":
    main()
