"""Generation tokens/s of jaxsft.generate beside transformers' generate, same model and prompts.

    python benchmarks/generate.py                          # SmolLM2-135M GGUF, 8 GSM8K prompts, 64 tokens
    python benchmarks/generate.py --batch 16 --new-tokens 128 --dtype bfloat16

Both decode greedily with end tokens ignored, so each produces exactly batch x new-tokens tokens
(prefill included in the time). transformers gets one left-padded batch with its KV cache, jaxsft
one call after a warm-up call of the same shapes (its compile time is reported separately).
Writes benchmarks/results/generate_<device>.json with device, versions, settings and load average.
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


def time_jaxsft(model, prompts, new_tokens, repeats):
    start = time.perf_counter()
    jaxsft.generate(model, prompts, new_tokens, eos_token_id=[])
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jaxsft.generate(model, prompts, new_tokens, eos_token_id=[])
        times.append(time.perf_counter() - start)
    assert all(len(row) == new_tokens for row in out)
    return min(times), first


def time_transformers(path, tokenizer, prompts, new_tokens, repeats, dtype):
    import torch
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=getattr(torch, dtype)).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  pad_token_id=tokenizer.pad_token_id)
    times = []
    with torch.no_grad():
        hf.generate(**batch, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = hf.generate(**batch, **kwargs)
            times.append(time.perf_counter() - start)
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    path = smollm2_path()
    tokenizer = load_gguf_tokenizer(path)
    questions = [ex["question"] for ex in load_jsonl(GSM8K_TEST)[:args.batch]]
    prompts = [build_prompt(tokenizer, q) for q in questions]
    dtype = getattr(jnp, args.dtype)
    model = jaxsft.load_model(path, dtype=dtype, compute_dtype=dtype, remat="none")
    generated = args.batch * args.new_tokens

    jax_s, jax_first = time_jaxsft(model, prompts, args.new_tokens, args.repeats)
    rows = [{"impl": "jaxsft", "seconds": jax_s, "tokens_per_s": generated / jax_s, "first_call_s": jax_first}]
    if not args.skip_transformers:
        hf_s = time_transformers(path, tokenizer, prompts, args.new_tokens, args.repeats, args.dtype)
        rows.append({"impl": "transformers", "seconds": hf_s, "tokens_per_s": generated / hf_s})

    device = jax.devices()[0].platform
    print(f"SmolLM2-135M {args.dtype}, {args.batch} GSM8K prompts ({min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens), {args.new_tokens} new tokens each, {device}")
    print(f"{'impl':<14}{'seconds':>10}{'tokens/s':>12}")
    for r in rows:
        print(f"{r['impl']:<14}{r['seconds']:>10.2f}{r['tokens_per_s']:>12.1f}")
    result = {
        "device": device, "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0], "jax": jax.__version__, "torch": version("torch"),
        "transformers": version("transformers"), "python": platform.python_version(),
        "model": os.path.basename(path), "dtype": args.dtype, "batch": args.batch,
        "new_tokens": args.new_tokens, "prompt_lengths": [len(p) for p in prompts], "results": rows,
    }
    out = args.out or os.path.join(HERE, "results", f"generate_{device}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
