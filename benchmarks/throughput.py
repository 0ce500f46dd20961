"""Train-step tokens/s and MFU of jaxsft, beside a PyTorch + transformers reference step.

    python benchmarks/throughput.py                      # on a GPU: 1b, 3b, 8b at seq 4096
    python benchmarks/throughput.py --sizes tiny         # on CPU: a small shape, to check the script

jaxsft runs real packed SFT rows (GSM8K from configs/assets through the data pipeline; ids folded
into the model's vocabulary). The reference is what TRL runs: fp32 weights under bf16 autocast,
fused AdamW, SDPA attention, gradient checkpointing, on rows of the same length. Writes
benchmarks/results/throughput_<device>.json with device, versions and settings.
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

from jaxsft import metrics
from jaxsft.models import Decoder, ModelConfig
from jaxsft.sharding import make_mesh, optimizer_shardings, param_shardings
from jaxsft.train import default_config
from jaxsft.train.optimizer import make_optimizer
from jaxsft.train.step import host_shardings, make_train_step

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "..", "configs", "assets")
SHAPES = {  # Llama 3.2 1B / 3B and Llama 3.1 8B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
               head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8,
               head_dim=128, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
               head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=64, vocab_size=32000, tie_word_embeddings=True),
}


def packed_microbatches(seq: int, rows: int, count: int, vocab: int):
    """`count` micro-batches of real packed GSM8K rows."""
    from transformers import AutoTokenizer

    from jaxsft.data import DataPipeline, default_data_config

    cfg = default_data_config()
    cfg.sources = [{"path": os.path.join(ASSETS, "gsm8k", "train.jsonl"), "format": "gsm8k"}]
    cfg.max_seq_len, cfg.micro_batch_rows, cfg.prefetch = seq, rows, 0
    cfg.global_batch_size = max(8, rows * seq // 150 * count)  # GSM8K samples are ~150-250 tokens
    pipeline = DataPipeline(cfg, AutoTokenizer.from_pretrained(os.path.join(ASSETS, "tiny-qwen2")))
    step = next(pipeline)
    pipeline.close()
    batches = step.microbatches[:count]
    for b in batches:
        b["input_ids"] %= vocab
        b["targets"] %= vocab
    return batches


def bench_jaxsft(shape, seq, rows, microbatches, steps, remat, offload):
    c = ModelConfig(architecture="LlamaForCausalLM", remat=remat, **shape)
    mesh = make_mesh()
    abstract = nnx.eval_shape(lambda: Decoder(c, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    shardings = param_shardings(state, mesh)
    params = jax.jit(lambda: nnx.split(Decoder(c, rngs=nnx.Rngs(0)), nnx.Param)[1], out_shardings=shardings)()
    optim = default_config().optim
    tx, schedule = make_optimizer(optim, 1000)
    opt_sharding = optimizer_shardings(tx, params, shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=host_shardings(opt_sharding) if offload else opt_sharding)(params)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    fns = make_train_step(graphdef, tx, schedule, shardings, opt_sharding, batch_sharding, offload_optimizer=offload)
    batches = [jax.device_put(b, batch_sharding) for b in packed_microbatches(seq, rows * jax.device_count(),
                                                                              microbatches, c.vocab_size)]
    tokens = sum(int((np.asarray(b["segment_ids"]) > 0).sum()) for b in batches)
    flops = metrics.step_flops(c, np.concatenate([metrics.segment_lengths(np.asarray(b["segment_ids"]))
                                                  for b in batches]))
    loss_tokens = jnp.int32(sum(int(b["loss_mask"].sum()) for b in batches))

    def step(params, opt_state, i):
        acc = fns.zero_accumulator(params)
        for b in batches:
            acc = fns.accumulate(acc, params, b)
        return fns.update(params, opt_state, acc, loss_tokens, jnp.int32(i))

    t0 = time.perf_counter()
    params, opt_state, m = step(params, opt_state, 0)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        params, opt_state, m = step(params, opt_state, i + 1)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    peak = metrics.peak_flops_per_device()
    return {"tokens_per_s": tokens / dt, "step_s": dt, "first_step_s": compile_s, "tokens_per_step": tokens,
            "mfu": flops / dt / (peak * jax.device_count()) if peak else None,
            "loss": float(m["loss"])}


def bench_torch(shape, seq, rows, microbatches, steps):
    import torch
    import transformers as tf

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    config = tf.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"], tie_word_embeddings=shape["tie_word_embeddings"],
        attn_implementation="sdpa")
    model = tf.LlamaForCausalLM(config).to(device)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=cuda)
    ids = torch.randint(0, shape["vocab_size"], (rows, seq), device=device)

    def step():
        for _ in range(microbatches):
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / microbatches
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"tokens_per_s": rows * seq * microbatches / dt, "step_s": dt}


def main():
    on_cpu = jax.devices()[0].platform == "cpu"
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="tiny" if on_cpu else "1b,3b,8b")
    p.add_argument("--seq", type=int, default=512 if on_cpu else 4096)
    p.add_argument("--rows", type=int, default=1, help="packed rows per device per micro-batch")
    p.add_argument("--microbatches", type=int, default=2 if on_cpu else 4)
    p.add_argument("--steps", type=int, default=2 if on_cpu else 5)
    p.add_argument("--remat", default="full", help="comma-separated remat policies to try")
    p.add_argument("--offload", default="", help="sizes to run with optimizer-state offload")
    p.add_argument("--no-reference", action="store_true")
    args = p.parse_args()

    device = jax.devices()[0].device_kind
    results = []
    for size in args.sizes.split(","):
        row = {"size": size, "seq": args.seq, "rows": args.rows, "microbatches": args.microbatches}
        for remat in args.remat.split(","):
            try:
                row[f"jaxsft_{remat}"] = bench_jaxsft(SHAPES[size], args.seq, args.rows, args.microbatches,
                                                      args.steps, remat, size in args.offload.split(","))
            except Exception as e:  # out of memory at this size and policy: record it, go on
                row[f"jaxsft_{remat}"] = {"error": str(e).splitlines()[0][:200]}
        if not args.no_reference:
            try:
                row["torch"] = bench_torch(SHAPES[size], args.seq, args.rows, args.microbatches, args.steps)
            except Exception as e:
                row["torch"] = {"error": str(e).splitlines()[0][:200]}
        results.append(row)
        best = max((v["tokens_per_s"], k) for k, v in row.items()
                   if k.startswith("jaxsft_") and "tokens_per_s" in v)
        ref = row.get("torch", {}).get("tokens_per_s")
        mfu = row[best[1]]["mfu"]
        print(f"{size:5s} best {best[1]:22s} {best[0]:10.0f} tok/s  "
              f"mfu {'-' if mfu is None else f'{mfu:.1%}'}  torch {ref or '-'}"
              + (f"  ratio {best[0] / ref:.2f}x" if ref else ""), flush=True)

    import torch
    import transformers
    out = {"device": device, "device_count": jax.device_count(), "jax": jax.__version__,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "results": results}
    name = "cpu" if on_cpu else device.replace(" ", "_").lower()
    path = os.path.join(HERE, "results", f"throughput_{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
