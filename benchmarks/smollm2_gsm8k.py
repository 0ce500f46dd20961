"""The real model fine-tuned and measured: SmolLM2-135M-Instruct on GSM8K, GSM8K accuracy before
and after, for the fine-tuning recipes back to back.

    python benchmarks/smollm2_gsm8k.py                   # the CPU quickstart (configs/smollm2_gsm8k.py)
    python benchmarks/smollm2_gsm8k.py --size full       # on a GPU: the whole GSM8K, paper vs TULU recipe
    python benchmarks/smollm2_gsm8k.py --dry-run         # the full size's code path, tiny, on CPU

`--size full` runs, for each recipe (see RECIPES and docs/gsm8k.md): a greedy chat-template eval
on all 1,319 GSM8K test problems, fine-tuning on all 7,473 training problems for the configured
epochs, and the same eval again. The results go to benchmarks/results/smollm2_gsm8k_<device>.json,
rewritten after each recipe: per recipe the base and fine-tuned strict-match and flexible-extract
accuracy with 95% Wilson intervals, the held-out loss before and after, training tokens/s and MFU
(steps after the first, which compiles), generation tokens/s and wall time. Training goes through
the public entry point `jaxsft.train.run` with `--config.*` overrides on configs/smollm2_gsm8k.py;
any further --config.* override given here applies to every recipe. Each recipe's run directory
is deleted first, so a run never resumes an earlier one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time

import jax

from jaxsft.cli import parse_args
from jaxsft.evals.gsm8k import load_jsonl
from jaxsft.train import run

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GSM8K = os.path.join(REPO, "tests", "assets", "data", "gsm8k")  # the whole splits: 7,473 and 1,319

# The paper's 3,840 samples per step would be half an epoch of GSM8K's 7,473 training problems,
# so its recipe is scaled to 512 samples per step (~44 steps over 3 epochs), keeping its low
# constant learning rate without warmup; the TULU-style recipe keeps its 128 samples per step.
RECIPES = {
    "paper": {"data.global_batch_size": 512, "optim.learning_rate": 2e-5, "optim.schedule": "constant",
              "optim.warmup_fraction": 0.0},
    "tulu": {"data.global_batch_size": 128, "optim.learning_rate": 1e-4, "optim.schedule": "warmup_linear",
             "optim.warmup_fraction": 0.03},
}
FULL = {
    "data.sources": [{"path": os.path.join(GSM8K, "train.jsonl"), "format": "gsm8k"}],
    "data.eval_sources": [{"path": os.path.join(GSM8K, "test.jsonl"), "format": "gsm8k"}],
    "gsm8k.file": os.path.join(GSM8K, "test.jsonl"),
    "gsm8k.subset": 0, "gsm8k.every": 0, "gsm8k.batch_size": 512, "gsm8k.max_new_tokens": 256,
    "train.eval_every": 0, "train.progress": False,
}
# The full size's code path on CPU in well under a minute: a tiny random model, a few problems.
DRY_RUN = {
    "model.path": os.path.join(REPO, "configs", "assets", "tiny-qwen2"), "model.init": "random",
    "model.compute_dtype": "float32", "model.remat": "none",
    "data.max_seq_len": 256, "data.micro_batch_rows": 2, "train.num_steps": 2, "train.export_hf": False,
    "gsm8k.batch_size": 8, "gsm8k.max_new_tokens": 8, "gsm8k.show": 0,  # one generate call per eval
}
DRY_RUN_BATCH = {"paper": 4, "tulu": 2}


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> list[float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if total == 0:
        return [0.0, 1.0]
    p = correct / total
    center = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [max(0.0, center - half), min(1.0, center + half)]


def gsm8k_summary(result: dict) -> dict:
    """Both metrics with their intervals, and generation speed, from one eval's result file."""
    summary = {"problems": result["total"], "primary_metric": result["primary_metric"]}
    for metric in ("strict_match", "flexible_extract"):
        correct = result[f"{metric}_correct"]
        summary[metric] = {"accuracy": result[metric], "correct": correct,
                           "ci95": wilson_interval(correct, result["total"])}
    summary["generation_tokens_per_s"] = result["generated_tokens"] / result["generation_s"]
    summary["generation_s"] = result["generation_s"]
    return summary


def run_recipe(size: str, overrides: dict, extra: list[str]) -> dict:
    """Trains one recipe through jaxsft.train.run and collects its figures from the run's files."""
    argv = ["--config", os.path.join(REPO, f"configs/smollm2_gsm8k.py:{size}")]
    argv += [f"--config.{key}={value}" for key, value in overrides.items()] + extra
    config, _ = parse_args(argv)
    shutil.rmtree(config.train.output_dir, ignore_errors=True)
    start = time.perf_counter()
    summary = run(config)
    wall = time.perf_counter() - start

    out = config.train.output_dir
    steps = load_jsonl(os.path.join(out, "metrics.jsonl"))
    timed = steps[1:] or steps
    mfus = [s["mfu"] for s in timed if "mfu" in s]
    evals = [json.load(open(os.path.join(out, "eval", f"gsm8k_step{step}.json"))) for step in (0, summary["steps"])]
    losses = summary["eval_losses"]
    return {
        "samples_per_step": config.data.global_batch_size, "learning_rate": config.optim.learning_rate,
        "schedule": config.optim.schedule, "warmup_fraction": config.optim.warmup_fraction,
        "epochs": config.train.num_epochs if not config.train.num_steps else None, "steps": summary["steps"],
        "base": gsm8k_summary(evals[0]), "fine_tuned": gsm8k_summary(evals[1]),
        "held_out_loss": {"before": losses[0][1] if losses else None, "after": losses[-1][1] if losses else None},
        "train_tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["step_time_s"] for s in timed),
        "train_mfu": sum(mfus) / len(mfus) if mfus else None,
        "final_training_loss": steps[-1]["loss"], "wall_s": round(wall, 1), "output_dir": out,
    }


def dry_run_data(root: str) -> dict:
    """A few real GSM8K problems in files of their own, for the dry run."""
    os.makedirs(root, exist_ok=True)
    paths = {}
    for split, count in (("train", 24), ("test", 6)):
        paths[split] = os.path.join(root, f"{split}.jsonl")
        with open(os.path.join(GSM8K, f"{split}.jsonl")) as src, open(paths[split], "w") as dst:
            dst.writelines(line for line, _ in zip(src, range(count)))
    return {"data.sources": [{"path": paths["train"], "format": "gsm8k"}],
            "data.eval_sources": [{"path": paths["test"], "format": "gsm8k"}], "gsm8k.file": paths["test"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="cpu", choices=("cpu", "full"))
    p.add_argument("--dry-run", action="store_true", help="the full size's code path, tiny, on CPU")
    p.add_argument("--recipes", default="paper,tulu", help="for --size full: which recipes, in order")
    p.add_argument("--runs-dir", default="runs", help="run directories go under it")
    p.add_argument("--out", default="", help="the result JSON (default benchmarks/results/smollm2_gsm8k_<device>.json; "
                                             "for --dry-run, RUNS_DIR/smollm2_gsm8k_dry_run/result.json)")
    a, extra = p.parse_known_args(argv)
    size = "full" if a.dry_run else a.size
    device = jax.devices()[0]
    device_name = "cpu" if device.platform == "cpu" else device.device_kind.replace(" ", "_").lower()
    name = "dry_run" if a.dry_run else device_name
    out = a.out or (os.path.join(a.runs_dir, "smollm2_gsm8k_dry_run", "result.json") if a.dry_run
                    else os.path.join(HERE, "results", f"smollm2_gsm8k_{name}.json"))

    plans = {"quickstart": {}} if size == "cpu" else {r: dict(FULL, **RECIPES[r]) for r in a.recipes.split(",")}
    if a.dry_run:
        data = dry_run_data(os.path.join(a.runs_dir, "smollm2_gsm8k_dry_run", "data"))
        plans = {r: {**o, **DRY_RUN, **data, "data.global_batch_size": DRY_RUN_BATCH[r]} for r, o in plans.items()}
    record = {
        "device": device.device_kind, "device_count": jax.device_count(), "jax": jax.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "size": size, "dry_run": a.dry_run,
        "overrides": extra, "recipes": {},
        "note": ("The paper's 3,840 samples per step are half an epoch of GSM8K's 7,473 training problems: "
                 "its recipe is scaled to 512 samples per step. Accuracy intervals are 95% Wilson intervals; "
                 "accuracy counts an answer right when it equals the reference as a number."),
    }
    started = time.perf_counter()
    for recipe, overrides in plans.items():
        overrides = {**overrides, "train.output_dir": os.path.join(a.runs_dir, f"smollm2_gsm8k_{name}", recipe)}
        record["recipes"][recipe] = result = run_recipe(size, overrides, extra)
        record["wall_s"] = round(time.perf_counter() - started, 1)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(record, f, indent=2)
        b, t, loss = result["base"], result["fine_tuned"], result["held_out_loss"]
        print(f"{recipe}: {result['steps']} steps of {result['samples_per_step']} samples; GSM8K strict-match "
              f"{b['strict_match']['accuracy']:.3f} -> {t['strict_match']['accuracy']:.3f}, flexible-extract "
              f"{b['flexible_extract']['accuracy']:.3f} -> {t['flexible_extract']['accuracy']:.3f} "
              f"({t['problems']} problems); held-out loss {loss['before']} -> {loss['after']}; "
              f"{result['wall_s']} s", flush=True)
    print("wrote", out)


if __name__ == "__main__":
    main()
