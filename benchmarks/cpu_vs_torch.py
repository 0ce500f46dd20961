"""jaxsft against PyTorch + transformers on this machine's CPU, in one command.

    python benchmarks/cpu_vs_torch.py                   # train step and generation (~15 min, 2 quiet cores)
    python benchmarks/cpu_vs_torch.py --only train      # or --only generate

Train step: the SmolLM2-135M shape (random weights), 3 micro-batches of 2 packed GSM8K rows of 512
tokens (the quickstart's rows), summed cross-entropy, gradient clipping, AdamW. jaxsft runs the
programs `jaxsft.train.build` makes for the loop, called in the loop's order, in bfloat16 compute
(float32 masters, matmuls bf16 x bf16 -> float32, as the CPU configs do), no remat, with XLA's
default flags and glibc's default allocator (`python -m jaxsft.train` changes both: see
benchmarks/README.md). The reference is what a PyTorch user writes:
`LlamaForCausalLM` (sdpa) on the same token ids, summed cross-entropy backward per micro-batch,
`clip_grad_norm_`, `torch.optim.AdamW`, in its fastest CPU form: float32 or bfloat16 autocast,
whichever the first (warm-up) step of each finds faster.

Generation: the real SmolLM2-135M-Instruct (GGUF), greedy, 128 new tokens on the first GSM8K test
questions (chat template), batch 16 and 64, jaxsft.generate and transformers' generate both in
float32 (the greedy rows are compared).

Each measurement is repeated (`--repeats`, default 3) alternately, jaxsft then the reference, so a
machine shared with other work slows both alike; the medians and their ratio are reported with the
load average. Writes benchmarks/results/cpu_vs_torch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from importlib.metadata import version

import jax
import jax.numpy as jnp
import numpy as np

from throughput import packed_microbatches

HERE = os.path.dirname(os.path.abspath(__file__))
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                    head_dim=64, vocab_size=49152, tie_word_embeddings=True)


def jaxsft_train_step(batches, compute_dtype):
    """A callable running one jaxsft optimizer step over `batches` (host micro-batches): the
    programs and optimizer state `jaxsft.train.build.build` makes for the loop, called as
    `jaxsft.train.loop.train` calls them."""
    from jaxsft.models import ModelConfig
    from jaxsft.models.loading import random_model
    from jaxsft.sharding import make_mesh
    from jaxsft.train import default_config
    from jaxsft.train.build import build

    config = default_config()
    config.model.compute_dtype = compute_dtype
    c = ModelConfig(architecture="LlamaForCausalLM", remat="none", attention="xla", **SMOLLM2_135M)
    mesh = make_mesh()
    # Created sharded as a run's random model is: a Decoder made in place gives arrays whose type
    # lacks the mesh, so the second step (fed the update's params) would compile again.
    model = random_model(c, jnp.float32, getattr(jnp, compute_dtype), mesh)
    run = build(config, model, mesh, total_steps=1000, group_layers=1)
    loss_tokens = jnp.int32(sum(int(b["loss_mask"].sum()) for b in batches))
    with jax.set_mesh(mesh):
        state = {"params": run.params, "acc": run.fns.zero_accumulator(run.params, jnp.int32(0)), "step": 0}

    def step():
        acc, index = state["acc"], jnp.int32(state["step"])
        with jax.set_mesh(mesh):
            for b in batches:
                acc = run.fns.accumulate(acc, state["params"], jax.device_put(b, run.batch_sharding))
            state["params"], metrics = run.state.update(state["params"], acc, loss_tokens, index)
            state["acc"] = run.fns.clear_accumulator(acc, index)
        state["step"] += 1
        return float(metrics["loss"])
    return step


def torch_train_step(batches, autocast: bool):
    import torch
    import transformers as tf

    s = SMOLLM2_135M
    config = tf.LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"], head_dim=s["head_dim"],
        tie_word_embeddings=s["tie_word_embeddings"], attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
    data = [(torch.from_numpy(np.asarray(b["input_ids"], np.int64)),
             torch.from_numpy(np.where(np.asarray(b["loss_mask"]) > 0, np.asarray(b["targets"]), -100).astype(np.int64)))
            for b in batches]
    loss_tokens = sum(int((t >= 0).sum()) for _, t in data)

    def step():
        total = 0.0
        for ids, targets in data:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            loss.backward()
            total += float(loss.detach())
        for p in model.parameters():
            p.grad /= loss_tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total / loss_tokens
    return step


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def alternate(runs: dict, repeats: int):
    """{name: seconds per call} over `repeats` rounds, each round calling every run once in turn."""
    seconds = {name: [] for name in runs}
    loads = []
    for _ in range(repeats):
        for name, fn in runs.items():
            seconds[name].append(timed(fn)[0])
        loads.append(round(os.getloadavg()[0], 2))
    return seconds, loads


def bench_train(args):
    batches = packed_microbatches(512, 2, 3, SMOLLM2_135M["vocab_size"])
    tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    ours = jaxsft_train_step(batches, args.jaxsft_dtype)
    compile_and_first_s = timed(ours)[0]
    # One torch model at a time (each holds weights, gradients and AdamW moments).
    warmup = {}
    for name in args.torch_forms.split(","):
        warmup[name] = timed(torch_train_step(batches, autocast=name == "bfloat16_autocast"))[0]
    fastest = min(warmup, key=warmup.get)
    theirs = torch_train_step(batches, autocast=fastest != "float32")
    theirs()  # its own warm-up
    seconds, loads = alternate({"jaxsft": ours, "torch": theirs}, args.repeats)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {"shape": "SmolLM2-135M", "seq_len": 512, "microbatches": 3, "rows": 2, "tokens_per_step": tokens,
            "jaxsft": {"compute_dtype": args.jaxsft_dtype, "remat": "none", "seconds": seconds["jaxsft"],
                       "median_s": median["jaxsft"], "tokens_per_s": tokens / median["jaxsft"],
                       "compile_and_first_step_s": compile_and_first_s},
            "torch": {"form": fastest, "warmup_step_s": warmup, "seconds": seconds["torch"],
                      "median_s": median["torch"], "tokens_per_s": tokens / median["torch"]},
            "speedup": median["torch"] / median["jaxsft"], "load_average_1m": loads}


def bench_generate(args):
    import torch
    import transformers as tf

    import jaxsft
    from generate import jaxsft_run, rows_equal_until_end, transformers_run
    from jaxsft.evals.gsm8k import build_prompt, load_jsonl
    from jaxsft.models.gguf import load_gguf_tokenizer, smollm2_path

    path = smollm2_path()
    tokenizer = load_gguf_tokenizer(path)
    batches = [int(b) for b in args.batch.split(",")]
    questions = [ex["question"] for ex in load_jsonl(os.path.join(HERE, "..", "tests", "assets", "data", "gsm8k",
                                                                  "test.jsonl"))[:max(batches)]]
    all_prompts = [build_prompt(tokenizer, q) for q in questions]
    model = jaxsft.load_model(path, dtype=jnp.float32, compute_dtype=jnp.float32, remat="none")
    hf = tf.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    end_ids = {tokenizer.eos_token_id, model.config.eos_token_id} - {None}
    runs = []
    for batch in batches:
        prompts, generated = all_prompts[:batch], batch * args.new_tokens
        outputs = {}

        def ours():
            outputs["jaxsft"] = jaxsft_run(model, prompts, args.new_tokens)

        def theirs():
            outputs["transformers"] = transformers_run(hf, tokenizer, prompts, args.new_tokens)

        first_s = timed(ours)[0]
        transformers_run(hf, tokenizer, prompts, 2)  # warm-up
        seconds, loads = alternate({"jaxsft": ours, "transformers": theirs}, args.repeats)
        median = {k: statistics.median(v) for k, v in seconds.items()}
        runs.append({
            "batch": batch, "new_tokens": args.new_tokens, "dtype": "float32",
            "jaxsft": {"seconds": seconds["jaxsft"], "tokens_per_s": generated / median["jaxsft"],
                       "first_call_s": first_s},
            "transformers": {"seconds": seconds["transformers"], "tokens_per_s": generated / median["transformers"]},
            "speedup": median["transformers"] / median["jaxsft"],
            "rows_equal": rows_equal_until_end(outputs["jaxsft"], outputs["transformers"], end_ids),
            "load_average_1m": loads})
        print(f"generate batch {batch}: jaxsft {runs[-1]['jaxsft']['tokens_per_s']:.1f} tokens/s, transformers "
              f"{runs[-1]['transformers']['tokens_per_s']:.1f} ({runs[-1]['speedup']:.2f}x), greedy rows equal "
              f"{runs[-1]['rows_equal']}/{batch}, load {loads}", flush=True)
    return runs


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "jax": jax.__version__, "torch": version("torch"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "transformers": version("transformers")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("train", "generate"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jaxsft-dtype", default="bfloat16", help="jaxsft's train compute dtype")
    parser.add_argument("--torch-forms", default="float32,bfloat16_autocast",
                        help="the PyTorch train-step forms to try (the faster one is timed)")
    parser.add_argument("--batch", default="16,64", help="generation batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "cpu_vs_torch.json"))
    args = parser.parse_args()
    import torch

    result = {"machine": {**machine(), "torch_threads": torch.get_num_threads()}, "repeats": args.repeats,
              "note": "medians of alternating runs in one process; a loaded machine slows both sides alike"}
    if args.only != "generate":
        result["train"] = train = bench_train(args)
        print(f"train step: jaxsft {train['jaxsft']['tokens_per_s']:.1f} tokens/s ({args.jaxsft_dtype}), torch "
              f"{train['torch']['tokens_per_s']:.1f} ({train['torch']['form']}): {train['speedup']:.2f}x, "
              f"load {train['load_average_1m']}", flush=True)
    if args.only != "train":
        result["generate"] = bench_generate(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
