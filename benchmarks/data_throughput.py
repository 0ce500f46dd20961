"""Data pipeline throughput on GSM8K after caching: tokens per second delivered to the train loop.

    python benchmarks/data_throughput.py [--tokenizer DIR] [--data FILE] [--steps N]

Prints and writes `benchmarks/results/data_throughput_cpu.json`: the first (tokenizing, wall and
CPU seconds) and second (cached) build times, the production rate without prefetch, and the rate and the time
spent waiting in `next()` with the prefetch thread while the loop simulates a train step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer  # noqa: E402

from jaxsft.data import DataPipeline, default_data_config  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "tests" / "assets"
RESULT = Path(__file__).resolve().parent / "results" / "data_throughput_cpu.json"


def build(args, cache_dir: str, prefetch: int) -> tuple[DataPipeline, float, float]:
    cfg = default_data_config()
    cfg.sources = [{"path": args.data}]
    cfg.cache_dir = cache_dir
    cfg.max_seq_len = args.max_seq_len
    cfg.global_batch_size = args.global_batch_size
    cfg.micro_batch_rows = args.micro_batch_rows
    cfg.prefetch = prefetch
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    start, cpu_start = time.perf_counter(), time.process_time()
    pipeline = DataPipeline(cfg, tokenizer)
    return pipeline, time.perf_counter() - start, time.process_time() - cpu_start


def consume(pipeline: DataPipeline, steps: int, train_step_s: float) -> dict:
    next(pipeline)  # starts the prefetch thread and fills its queue
    time.sleep(train_step_s)
    tokens, waited, start = 0, 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        step = next(pipeline)
        waited += time.perf_counter() - t
        tokens += step.num_tokens
        time.sleep(train_step_s)
    elapsed = time.perf_counter() - start
    pipeline.close()
    return {"tokens_per_s": round(tokens / elapsed), "mean_wait_in_next_ms": round(1e3 * waited / steps, 3),
            "steps": steps, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", default=str(ASSETS / "tokenizers/qwen2.5-0.5b-instruct"))
    parser.add_argument("--data", default=str(ASSETS / "data/gsm8k/train.jsonl"))
    parser.add_argument("--max_seq_len", type=int, default=2048)
    parser.add_argument("--global_batch_size", type=int, default=512)
    parser.add_argument("--micro_batch_rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--train_step_ms", type=float, default=50.0)
    parser.add_argument("--note", default="", help="recorded with the figures (e.g. the machine's load)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache_dir:
        pipeline, first_build_s, first_build_cpu_s = build(args, cache_dir, prefetch=0)
        pipeline.close()
        pipeline, cached_build_s, _ = build(args, cache_dir, prefetch=0)
        unprefetched = consume(pipeline, args.steps, 0.0)
        pipeline, _, _ = build(args, cache_dir, prefetch=4)
        prefetched = consume(pipeline, args.steps, args.train_step_ms / 1e3)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        **({"note": args.note} if args.note else {}),
        "tokenizer": Path(args.tokenizer).name,
        "data": Path(args.data).name,
        "max_seq_len": args.max_seq_len,
        "global_batch_size": args.global_batch_size,
        "micro_batch_rows": args.micro_batch_rows,
        "first_build_s": round(first_build_s, 2),
        # CPU seconds of this process: less sensitive than wall time to a machine shared with other jobs.
        "first_build_cpu_s": round(first_build_cpu_s, 2),
        "cached_build_s": round(cached_build_s, 3),
        "tokens_per_s": unprefetched["tokens_per_s"],
        "no_prefetch": unprefetched,
        f"prefetch_with_{args.train_step_ms:g}ms_train_step": prefetched,
        "packing_efficiency": pipeline.summary["packing_efficiency"],
        "batch_efficiency": pipeline.summary["batch_efficiency"],
    }
    print(json.dumps(result, indent=1))
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
