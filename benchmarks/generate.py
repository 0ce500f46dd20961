"""Generation tokens/s of jaxsft.generate beside transformers' generate, same model and prompts.

    python benchmarks/generate.py                       # batches 16 and 64, 128 new tokens, fp32 and bf16
    python benchmarks/generate.py --batch 8 --new-tokens 64 --dtypes bfloat16

The real SmolLM2-135M-Instruct (GGUF) answers the first `batch` GSM8K test questions (chat
template), greedily, with end tokens ignored, so each produces exactly batch x new-tokens tokens
(prefill included in the time). transformers gets one left-padded batch with its KV cache, jaxsft
one call after a warm-up call of the same shapes (its compile time is reported separately), in
float32 and in bfloat16 (weights, activations and KV cache; matmuls accumulate in float32);
transformers in float32, its fastest on this CPU (in bfloat16 it is about 5x slower). They are
timed alternately, repeat by repeat, so a machine shared with other work slows all alike; the load
average is recorded. The greedy tokens are compared with transformers' up to the first end token
jaxsft emits (transformers is kept from emitting it by min_new_tokens): float32 must equal them.
Each figure is the median of `repeats` (default 3) timed calls.
Writes benchmarks/results/generate_<device>.json.
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

import jaxsft
from jaxsft.evals.gsm8k import build_prompt, load_jsonl
from jaxsft.models.gguf import load_gguf_tokenizer, smollm2_path

HERE = os.path.dirname(os.path.abspath(__file__))
GSM8K_TEST = os.path.join(HERE, "..", "tests", "assets", "data", "gsm8k", "test.jsonl")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def jaxsft_run(model, prompts, new_tokens):
    out = jaxsft.generate(model, prompts, new_tokens, eos_token_id=[])
    assert all(len(row) == new_tokens for row in out)
    return out


def transformers_run(hf, tokenizer, prompts, new_tokens):
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          pad_token_id=tokenizer.pad_token_id)
    out = out[:, batch["input_ids"].shape[1]:].tolist()
    assert all(len(row) == new_tokens for row in out)
    return out


def rows_equal_until_end(ours, theirs, end_ids):
    """How many rows agree token for token up to (not including) the first end token in ours."""
    equal = 0
    for a, b in zip(ours, theirs):
        cut = next((i for i, t in enumerate(a) if t in end_ids), len(a))
        equal += a[:cut] == b[:cut]
    return equal


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="16,64", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="jaxsft's decode dtypes (weights, "
                        "activations and KV cache); transformers runs in float32, its fastest on CPU")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch
    import transformers as tf

    path = smollm2_path()
    tokenizer = load_gguf_tokenizer(path)
    batches = [int(b) for b in args.batch.split(",")]
    questions = [ex["question"] for ex in load_jsonl(GSM8K_TEST)[:max(batches)]]
    all_prompts = [build_prompt(tokenizer, q) for q in questions]
    dtypes = args.dtypes.split(",")
    models = {d: jaxsft.load_model(path, dtype=getattr(jnp, d), compute_dtype=getattr(jnp, d), remat="none")
              for d in dtypes}
    hf = tf.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    end_ids = {tokenizer.eos_token_id, models[dtypes[0]].config.eos_token_id} - {None}

    device = jax.devices()[0].platform
    out = args.out or os.path.join(HERE, "results", f"generate_{device}.json")
    result = {
        "device": device, "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "torch": version("torch"), "transformers": version("transformers"),
        "python": platform.python_version(), "model": os.path.basename(path), "jaxsft_dtypes": dtypes,
        "transformers_dtype": "float32", "new_tokens": args.new_tokens, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "note": ("jaxsft (each dtype) and transformers timed alternately in one process (median of `repeats`), "
                 "so a machine shared with other jobs (see load_average_1m) slows all alike. Greedy rows are "
                 "compared with transformers' up to jaxsft's first end token."),
        "runs": [],
    }
    for batch in batches:
        prompts, generated = all_prompts[:batch], batch * args.new_tokens
        first_s = {d: timed(lambda: jaxsft_run(models[d], prompts, args.new_tokens))[0] for d in dtypes}
        transformers_run(hf, tokenizer, prompts, 2)  # warm-up
        times = {**{d: [] for d in dtypes}, "transformers": []}
        outputs, loads = {}, []
        for _ in range(args.repeats):
            for d in dtypes:
                seconds, outputs[d] = timed(lambda: jaxsft_run(models[d], prompts, args.new_tokens))
                times[d].append(seconds)
            seconds, outputs["transformers"] = timed(
                lambda: transformers_run(hf, tokenizer, prompts, args.new_tokens))
            times["transformers"].append(seconds)
            loads.append(os.getloadavg()[0])
        best = {impl: statistics.median(t) for impl, t in times.items()}
        run = {"batch": batch, "prompt_lengths": [len(p) for p in prompts],
               "transformers": {"seconds": best["transformers"], "tokens_per_s": generated / best["transformers"],
                                "all_seconds": times["transformers"]},
               "load_average_1m": loads}
        for d in dtypes:
            run[f"jaxsft_{d}"] = {
                "seconds": best[d], "tokens_per_s": generated / best[d], "first_call_s": first_s[d],
                "all_seconds": times[d], "speedup": best["transformers"] / best[d],
                "rows_equal_to_transformers": rows_equal_until_end(outputs[d], outputs["transformers"], end_ids)}
        result["runs"].append(run)
        with open(out, "w") as f:  # after each batch size, so a cut-short run keeps what it measured
            json.dump(result, f, indent=2)
        print(f"batch {batch}: transformers float32 {run['transformers']['tokens_per_s']:.1f} tokens/s; " + "; ".join(
            f"jaxsft {d} {run[f'jaxsft_{d}']['tokens_per_s']:.1f} ({run[f'jaxsft_{d}']['speedup']:.2f}x, equal rows "
            f"{run[f'jaxsft_{d}']['rows_equal_to_transformers']}/{batch})" for d in dtypes) + f"; load {loads}", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
