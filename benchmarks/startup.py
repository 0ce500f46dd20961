"""Start-up of a resumed run with and without the persistent compilation cache
(`train.compile_cache_dir`, `jaxsft/compile_cache.py`).

configs/demo.py with 3 steps is stopped after step 2 (`train.stop_after_steps`, as a killed or
pruned run), then resumed to the end in a fresh process, which needs its init, train step and
checkpoint functions again: compiled anew without the cache, loaded from it with the cache. No
held-out eval and no export (`data.eval_sources=[]`, `train.export_hf=False`): on the shared
2-core machine they would double the benchmark's length, and start-up is what is measured.

Per repetition and variant: a fresh output directory (and for `cache` a fresh cache directory),
the first run (steps 1-2: it fills the cache), then the timed resumed run (step 3 and its
checkpoint). The variants alternate, as the machine is shared. Tokenized data come from one data
cache, so both variants pay the same data cost. The package is copied once at the start, so edits
to the working tree during the benchmark cannot change what is compiled (and with it the cache keys).

Reported per resumed run: the process's wall time, and the time from process start until its
step-3 line is in metrics.jsonl (imports, data, model, restore and the step's compile or load).

Usage: python benchmarks/startup.py [--reps 3] [--out benchmarks/results/startup_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What `python -m jaxsft.train` does, with the cache enabled from the config first (as run setup does).
DRIVER = ("import sys; from jaxsft.cli import parse_args; from jaxsft.compile_cache import enable_compile_cache; "
          "from jaxsft.train.__main__ import main; "
          "enable_compile_cache(parse_args(sys.argv[1:])[0].train.compile_cache_dir); main(sys.argv[1:])")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def train(code, out, cache_dir, data_cache, *overrides):
    """Runs the demo in a new process; returns (wall seconds, seconds until a step-3 metrics line)."""
    args = [sys.executable, "-c", DRIVER, "--config", "configs/demo.py", f"--config.train.output_dir={out}",
            "--config.train.num_steps=3", f"--config.train.compile_cache_dir={cache_dir}",
            f"--config.data.cache_dir={data_cache}", "--config.train.progress=False",
            "--config.data.eval_sources=[]", "--config.train.export_hf=False", *overrides]
    metrics = os.path.join(out, "metrics.jsonl")
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=code, env={**ENV, "PYTHONPATH": code}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first_step = None
    while proc.poll() is None:
        if first_step is None and _has_step(metrics, 3):
            first_step = time.perf_counter() - start
        time.sleep(0.05)
    wall = time.perf_counter() - start
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"run failed:\n{output[-3000:]}")
    return wall, first_step if first_step is not None else wall


def _has_step(path, step):
    try:
        with open(path) as f:
            return any(json.loads(line)["step"] == step for line in f if line.strip())
    except (OSError, ValueError):
        return False


def cache_entries(cache_dir):
    return sorted(f for f in os.listdir(cache_dir) if f.endswith("-cache")) if cache_dir and os.path.isdir(cache_dir) else []


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks/results/startup_cpu.json"))
    args = parser.parse_args()
    runs = {"no_cache": [], "cache": []}
    with tempfile.TemporaryDirectory() as tmp:
        data_cache, code = os.path.join(tmp, "data_cache"), os.path.join(tmp, "code")
        for folder in ("jaxsft", "configs"):
            shutil.copytree(os.path.join(REPO, folder), os.path.join(code, folder))
        for rep in range(args.reps):
            for variant in ("no_cache", "cache"):
                out = os.path.join(tmp, f"{variant}{rep}", "run")
                cache_dir = os.path.join(tmp, f"{variant}{rep}", "jax_compile") if variant == "cache" else ""
                first_wall, _ = train(code, out, cache_dir, data_cache, "--config.train.stop_after_steps=2")
                written = cache_entries(cache_dir)
                wall, first_step = train(code, out, cache_dir, data_cache)
                new = [e for e in cache_entries(cache_dir) if e not in written]
                runs[variant].append({"resumed_wall_s": round(wall, 2), "resumed_to_first_step_s": round(first_step, 2),
                                      "first_run_wall_s": round(first_wall, 2), "cache_entries_after_first_run": len(written),
                                      "entries_the_resumed_run_compiled": [e.split("-")[0] for e in new]})
                print(variant, rep, runs[variant][-1], flush=True)
    median = {v: {k: round(statistics.median(r[k] for r in rs), 2) for k in ("resumed_wall_s", "resumed_to_first_step_s")}
              for v, rs in runs.items()}
    result = {
        "what": "configs/demo.py (tiny random Qwen2, 32 samples/step of <=512 tokens) with num_steps=3, no "
                "held-out eval, no export, stopped after step 2, then resumed to step 3 in a fresh process; "
                "variants interleaved, each repetition with fresh output and cache dirs",
        "command": "python benchmarks/startup.py --reps %d" % args.reps,
        "runs": runs,
        "median": median,
        "saved_by_cache_s": {k: round(median["no_cache"][k] - median["cache"][k], 2) for k in median["cache"]},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg(),
                    "note": "shared 2-core machine, other engineers' jobs running: compare within a repetition"},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["median"], indent=2), json.dumps(result["saved_by_cache_s"]))


if __name__ == "__main__":
    main()
