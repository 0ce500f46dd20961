"""The real-model quickstart, measured: fine-tunes SmolLM2-135M-Instruct with
configs/smollm2_gsm8k.py and writes benchmarks/results/smollm2_gsm8k_<device>.json.

    python benchmarks/smollm2_gsm8k.py                   # the CPU size
    python benchmarks/smollm2_gsm8k.py --size full       # on a GPU: the whole split, 3 epochs
    python benchmarks/smollm2_gsm8k.py --size full --name tulu --config.data.global_batch_size=32 ...

Any --config.* override is passed to the run. The JSON holds the base and fine-tuned GSM8K
accuracy, the held-out loss before and after, training tokens/s and MFU (steps after the first,
which compiles), generation tokens/s of the last evaluation, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax

from jaxsft.cli import parse_args
from jaxsft.evals.gsm8k import load_jsonl
from jaxsft.train import run

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="cpu", choices=("cpu", "full"))
    p.add_argument("--name", default="", help="suffix of the result file, e.g. paper or tulu")
    a, overrides = p.parse_known_args(argv)
    config, _ = parse_args(["--config", os.path.join(REPO, f"configs/smollm2_gsm8k.py:{a.size}"), *overrides])
    start = time.perf_counter()
    result = run(config)
    wall = time.perf_counter() - start

    out = config.train.output_dir
    steps = load_jsonl(os.path.join(out, "metrics.jsonl"))
    timed = steps[1:] or steps
    evals = load_jsonl(os.path.join(out, "eval.jsonl"))
    before, after = (json.load(open(os.path.join(out, "eval", f"gsm8k_step{e['step']}.json")))
                     for e in (evals[0], evals[-1]))
    mfus = [s["mfu"] for s in timed if "mfu" in s]
    device = jax.devices()[0]
    record = {
        "device": device.device_kind, "device_count": jax.device_count(), "jax": jax.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "size": a.size, "overrides": overrides,
        "model": os.path.basename(config.model.path), "steps": result["steps"],
        "samples_per_step": config.data.global_batch_size, "learning_rate": config.optim.learning_rate,
        "schedule": config.optim.schedule, "wall_s": round(wall, 1),
        "held_out_loss": {"before": evals[0].get("eval_loss"), "after": evals[-1].get("eval_loss")},
        "gsm8k_accuracy": {"before": before["accuracy"], "after": after["accuracy"], "problems": after["total"],
                           "k_shot": after["k_shot"], "max_new_tokens": after["max_new_tokens"]},
        "train_tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["step_time_s"] for s in timed),
        "train_mfu": sum(mfus) / len(mfus) if mfus else None,
        "generation_tokens_per_s": after["generated_tokens"] / after["generation_s"],
        "final_training_loss": steps[-1]["loss"],
    }
    name = "cpu" if device.platform == "cpu" else device.device_kind.replace(" ", "_").lower()
    path = os.path.join(HERE, "results", f"smollm2_gsm8k_{name}{'_' + a.name if a.name else ''}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps({k: v for k, v in record.items() if k not in ("overrides",)}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
