"""Train-step tokens/s and MFU of jaxsft, beside a PyTorch + transformers reference step.

    python benchmarks/throughput.py                      # on a GPU: 1b, 3b, 8b at seq 4096
    (8B with the optimizer state offloaded to host memory: benchmarks/gpu_check.py, through the CLI)
    python benchmarks/throughput.py --sizes tiny         # on CPU: a small shape, to check the script

jaxsft runs real packed SFT rows (GSM8K from configs/assets through the data pipeline; ids folded
into the model's vocabulary). The reference is what TRL runs: fp32 weights under bf16 autocast,
fused AdamW, SDPA attention, gradient checkpointing, on rows of the same length. Writes
benchmarks/results/throughput_<device>.json with device, versions and settings.
"""

from __future__ import annotations

import argparse
import functools
import glob
import gzip
import json
import math
import os
import platform
import re
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
from jaxsft.train.step import make_train_step

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "..", "configs", "assets")
SHAPES = {  # Llama 3.2 1B / 3B and Llama 3.1 8B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
               head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8,
               head_dim=128, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
               head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    "test": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, vocab_size=512, tie_word_embeddings=True),
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


def bench_jaxsft(shape, seq, rows, microbatches, steps, remat, profile_dir=None, profile_below=math.inf):
    """One optimizer step of `microbatches` real packed micro-batches, compiled ahead of time (so
    compile time and the compiler's memory figures are exact), then timed over `steps` steps; the
    accumulate and update parts are also timed alone (to extrapolate to more micro-batches). With
    `profile_dir`, a step slower than `profile_below` tokens/s is traced and summarized."""
    c = ModelConfig(architecture="LlamaForCausalLM", remat=remat, **shape)
    mesh = make_mesh()
    abstract = nnx.eval_shape(lambda: Decoder(c, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    shardings = param_shardings(state, mesh)
    params = jax.jit(lambda: nnx.split(Decoder(c, rngs=nnx.Rngs(0)), nnx.Param)[1], out_shardings=shardings)()
    optim = default_config().optim
    tx, schedule = make_optimizer(optim, 1000)
    opt_sharding = optimizer_shardings(tx, params, shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    fns = make_train_step(graphdef, tx, schedule, shardings, opt_sharding, batch_sharding)
    host_batches = packed_microbatches(seq, rows * jax.device_count(), microbatches, c.vocab_size)
    batches = [jax.device_put(b, batch_sharding) for b in host_batches]
    tokens = sum(int((b["segment_ids"] > 0).sum()) for b in host_batches)
    lengths = np.concatenate([metrics.segment_lengths(b["segment_ids"]) for b in host_batches])
    flops = metrics.step_flops(c, lengths)
    loss_tokens = jnp.int32(sum(int(b["loss_mask"].sum()) for b in host_batches))

    t0 = time.perf_counter()
    zero = compiled(fns.zero_accumulator, params)
    acc = zero(params)
    accumulate = compiled(fns.accumulate, acc, params, batches[0])
    update = compiled(fns.apply_update, params, opt_state, acc, loss_tokens, jnp.int32(0))
    compile_s = time.perf_counter() - t0

    def step(params, opt_state, i):
        acc = zero(params)
        for b in batches:
            acc = accumulate(acc, params, b)
        return update(params, opt_state, acc, loss_tokens, jnp.int32(i))

    t0 = time.perf_counter()
    params, opt_state, m = step(params, opt_state, 0)
    jax.block_until_ready(m)
    first_step_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        params, opt_state, m = step(params, opt_state, i + 1)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    # The parts alone: the mean micro-batch (accumulate) and the update.
    acc = jax.block_until_ready(zero(params))
    t0 = time.perf_counter()
    for b in batches:
        acc = accumulate(acc, params, b)
    jax.block_until_ready(acc)
    accumulate_s = (time.perf_counter() - t0) / len(batches)
    t0 = time.perf_counter()
    params, opt_state, m = jax.block_until_ready(update(params, opt_state, acc, loss_tokens, jnp.int32(steps + 1)))
    update_s = time.perf_counter() - t0
    trace = None
    if profile_dir and tokens / dt < profile_below:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            params, opt_state, m = jax.block_until_ready(step(params, opt_state, steps + 2))
        trace = summarize_trace(profile_dir)
    peak = metrics.peak_flops_per_device()
    return {"tokens_per_s": tokens / dt, "step_s": dt, "compile_s": compile_s, "first_step_s": first_step_s,
            "accumulate_s": accumulate_s, "update_s": update_s, "tokens_per_step": tokens,
            "samples_per_step": len(lengths), "microbatches": len(batches),
            "mfu": flops / dt / (peak * jax.device_count()) if peak else None, "loss": float(m["loss"]),
            "peak_device_bytes": peak_device_bytes(),
            "compiled_peak_bytes": {"accumulate": compiled_peak(accumulate), "update": compiled_peak(update)},
            **({"trace": trace} if trace else {})}


def compiled(fn, *args):
    """`fn` (a jitted function, or one with bound leading arguments) compiled ahead of time for
    `args`, callable like `fn`."""
    if isinstance(fn, functools.partial):
        return functools.partial(compiled(fn.func, *fn.args, *args), *fn.args)
    return fn.lower(*args).compile()


def peak_device_bytes() -> int | None:
    """The allocator's peak since the process started (None where the backend keeps no count: CPU)."""
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def compiled_peak(executable) -> int | None:
    """The compiler's own peak device memory for one call (arguments, outputs and temporaries)."""
    executable = getattr(executable, "func", executable)
    analysis = executable.memory_analysis()
    return getattr(analysis, "peak_memory_in_bytes", None) if analysis else None


# Kernel-name patterns per category, first match wins (cuDNN, cuBLAS/CUTLASS and XLA's own names).
TRACE_CATEGORIES = (
    ("attention", re.compile(r"fmha|flash|cudnn|attention|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|xmma|nvjet|matmul|dot", re.I)),
    ("memcpy", re.compile(r"memcpy|memset|copy|transfer|h2d|d2h", re.I)),
    ("reduce", re.compile(r"reduce|scatter|gather|sort", re.I)),
    ("elementwise", re.compile(r"fusion|loop|input|convert|broadcast", re.I)),
)


def summarize_trace(profile_dir: str, top: int = 12) -> dict:
    """Where one traced step's time went: device busy time by kernel category and the top kernels,
    from the Perfetto trace jax.profiler writes. The 'device' is the GPU's streams, or on CPU the
    XLA executor threads. `host_gap_s` = traced wall time the device was idle (host stalls)."""
    path = max(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True),
               key=os.path.getmtime)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
    device_pids = {pid for (pid, tid), n in names.items() if tid is None and re.search(r"device:(GPU|TPU)", n)}

    def on_device(e):
        if device_pids:
            return e["pid"] in device_pids
        return names.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")

    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    kernels = [e for e in spans if on_device(e)]
    if not kernels:
        return {"error": "no device events in the trace"}
    by_kernel: dict[str, float] = {}
    for e in kernels:
        by_kernel[e["name"]] = by_kernel.get(e["name"], 0.0) + e["dur"] * 1e-6
    by_category: dict[str, float] = {}
    for name, secs in by_kernel.items():
        category = next((c for c, pattern in TRACE_CATEGORIES if pattern.search(name)), "other")
        by_category[category] = by_category.get(category, 0.0) + secs
    intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end = 0.0, -math.inf
    for a, b in intervals:  # union of the kernels' intervals (streams overlap)
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    wall = (max(b for _, b in intervals) - intervals[0][0]) * 1e-6
    return {"device_wall_s": wall, "device_busy_s": busy * 1e-6, "host_gap_s": wall - busy * 1e-6,
            "kernel_s_by_category": {k: round(v, 4) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "top_kernels_s": {k[:120]: round(v, 4) for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]},
            "source": path}


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

    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    first_step_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    c = ModelConfig(architecture="LlamaForCausalLM", **shape)
    flops = metrics.step_flops(c, np.full(rows * microbatches, seq))  # unpacked rows: whole-row attention
    peak = metrics.peak_flops_per_device()
    return {"tokens_per_s": rows * seq * microbatches / dt, "step_s": dt, "first_step_s": first_step_s,
            "mfu": flops / dt / peak if peak and cuda else None,
            "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def main():
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU's memory to torch too
    on_cpu = jax.devices()[0].platform == "cpu"
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="tiny" if on_cpu else "1b,3b,8b")
    p.add_argument("--seq", type=int, default=512 if on_cpu else 4096)
    p.add_argument("--rows", type=int, default=1, help="packed rows per device per micro-batch")
    p.add_argument("--microbatches", type=int, default=2 if on_cpu else 4)
    p.add_argument("--steps", type=int, default=2 if on_cpu else 5)
    p.add_argument("--remat", default="full", help="comma-separated remat policies to try")
    p.add_argument("--no-reference", action="store_true")
    args = p.parse_args()

    device = jax.devices()[0].device_kind
    results = []
    for size in args.sizes.split(","):
        row = {"size": size, "seq": args.seq, "rows": args.rows, "microbatches": args.microbatches}
        for remat in args.remat.split(","):
            try:
                row[f"jaxsft_{remat}"] = bench_jaxsft(SHAPES[size], args.seq, args.rows, args.microbatches,
                                                      args.steps, remat)
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
