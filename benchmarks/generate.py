"""Generation tokens/s of jaxsft.generate beside transformers' generate, same model and prompts.

    python benchmarks/generate.py                              # batches 16 and 64, 128 new tokens, fp32
    python benchmarks/generate.py --batch 8 --new-tokens 64 --dtype bfloat16

The real SmolLM2-135M-Instruct (GGUF) answers the first `batch` GSM8K test questions (chat
template), greedily, with end tokens ignored, so each produces exactly batch x new-tokens tokens
(prefill included in the time). transformers gets one left-padded batch with its KV cache, jaxsft
one call after a warm-up call of the same shapes (its compile time is reported separately). The
two are timed alternately, repeat by repeat, so a machine shared with other work slows both alike;
the load average is recorded. In float32 the greedy tokens of the two are compared too, up to
the first end token jaxsft emits (transformers is kept from emitting it by min_new_tokens).
Writes benchmarks/results/generate_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch
    import transformers as tf

    path = smollm2_path()
    tokenizer = load_gguf_tokenizer(path)
    batches = [int(b) for b in args.batch.split(",")]
    questions = [ex["question"] for ex in load_jsonl(GSM8K_TEST)[:max(batches)]]
    all_prompts = [build_prompt(tokenizer, q) for q in questions]
    dtype = getattr(jnp, args.dtype)
    model = jaxsft.load_model(path, dtype=dtype, compute_dtype=dtype, remat="none")
    hf = tf.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=getattr(torch, args.dtype)).eval()
    end_ids = {tokenizer.eos_token_id, model.config.eos_token_id} - {None}

    device = jax.devices()[0].platform
    out = args.out or os.path.join(HERE, "results", f"generate_{device}.json")
    result = {
        "device": device, "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "torch": version("torch"), "transformers": version("transformers"),
        "python": platform.python_version(), "model": os.path.basename(path), "dtype": args.dtype,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "note": ("jaxsft and transformers timed alternately in one process (best of `repeats`); the machine "
                 "was shared with other jobs (see load_average_1m), which slows both."),
        "runs": [],
    }
    for batch in batches:
        prompts, generated = all_prompts[:batch], batch * args.new_tokens
        first_s, _ = timed(lambda: jaxsft_run(model, prompts, args.new_tokens))
        transformers_run(hf, tokenizer, prompts, 2)  # warm-up
        times = {"jaxsft": [], "transformers": []}
        loads = []
        for _ in range(args.repeats):
            seconds, ours = timed(lambda: jaxsft_run(model, prompts, args.new_tokens))
            times["jaxsft"].append(seconds)
            seconds, theirs = timed(lambda: transformers_run(hf, tokenizer, prompts, args.new_tokens))
            times["transformers"].append(seconds)
            loads.append(os.getloadavg()[0])
        best = {impl: min(t) for impl, t in times.items()}
        run = {"batch": batch, "prompt_lengths": [len(p) for p in prompts],
               "jaxsft": {"seconds": best["jaxsft"], "tokens_per_s": generated / best["jaxsft"],
                          "first_call_s": first_s, "all_seconds": times["jaxsft"]},
               "transformers": {"seconds": best["transformers"], "tokens_per_s": generated / best["transformers"],
                                "all_seconds": times["transformers"]},
               "speedup": best["transformers"] / best["jaxsft"], "load_average_1m": loads}
        if args.dtype == "float32":
            run["rows_equal_to_transformers"] = rows_equal_until_end(ours, theirs, end_ids)
        result["runs"].append(run)
        with open(out, "w") as f:  # after each batch size, so a cut-short run keeps what it measured
            json.dump(result, f, indent=2)
        print(f"batch {batch}: jaxsft {run['jaxsft']['tokens_per_s']:.1f} tokens/s, transformers "
              f"{run['transformers']['tokens_per_s']:.1f} ({run['speedup']:.2f}x); "
              f"equal rows {run.get('rows_equal_to_transformers', '-')}/{batch}; load {loads}", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
