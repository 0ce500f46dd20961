"""Everything a lent GPU should prove, in one command, in under 8 minutes of device time:

    python benchmarks/gpu_check.py              # on the GPU machine: benchmarks/results/gpu_check_<device>.json
    python benchmarks/gpu_check.py --dry-run    # the same stages at tiny shapes on CPU (tests/test_gpu_check.py)

Stages, in order, each job a subprocess under its own time cap (a fresh process per measurement:
clean peak-memory counters, and JAX and torch never share the GPU's memory pool):
1. attention: tests/test_gpu.py (cuDNN packed attention = xla, forward and backward, sliding
   window), then the cuDNN segment-slot profile (one slot per token vs the cap).
2. throughput: Llama-3.2-1B / -3B shapes on real packed rows at seq 4096, remat policies, and
   the PyTorch + transformers reference step.
3. offload: Llama-3.1-8B shape with the optimizer state in host memory over many micro-batches.
4. smollm2: 200 steps of the real SmolLM2-135M on GSM8K through the CLI.
5. offload/8b_qlora: the Llama-3.1-8B QLoRA recipe (NF4 base): peak device memory, tokens/s.
The JSON is rewritten after every job, so a timeout or crash keeps what finished. One table at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# Targets on one H100/H200 at seq 4096 (issue 19): tokens/s of the best remat policy.
TARGET_TOKENS_PER_S = {"1b": 55_000, "3b": 22_000}
OFFLOAD_TARGET = 0.9  # the 8B step with host-offloaded optimizer state, as a fraction of the 3B MFU
TOTAL_BUDGET_S = 465  # all jobs together stay under 8 minutes of device time, start-up included
DRY_RUN_CAP_S, DRY_RUN_BUDGET_S = 300, 1200  # CPU: a 2-core machine shared with other jobs is slow


def plan(dry: bool) -> list[dict]:
    """The jobs in order of importance (the budget cuts the tail), each with its time cap in seconds
    on the GPU (a dry run has one tiny shape, one remat policy and DRY_RUN_CAP_S per job)."""
    sizes = {"test": 45} if dry else {"3b": 45, "1b": 35}
    jobs = [dict(stage="attention", name="tests", cap=50), dict(stage="attention", name="slots", cap=30)]
    jobs += [dict(stage="throughput", name=f"{size}_{remat}", size=size, remat=remat, cap=cap)
             for size, cap in sizes.items() for remat in ("full", "dots")]
    jobs += [dict(stage="offload", name="8b_offload", size="offload", cap=150),
             dict(stage="smollm2", name="cli_200_steps", cap=80),
             dict(stage="offload", name="8b_qlora", size="qlora", cap=100)]
    jobs += [dict(stage="throughput", name=f"{size}_torch", size=size, cap=cap) for size, cap in sizes.items()]
    big = next(iter(sizes))
    jobs += [dict(stage="throughput", name=f"{big}_dots_no_batch", size=big, remat="dots_no_batch", cap=sizes[big])]
    if dry:  # one policy, the same code path as every other: the dry run stays short
        return [{**job, "cap": DRY_RUN_CAP_S} for job in jobs if job.get("remat") in (None, "full")]
    return jobs


# ---------------------------------------------------------------- the jobs (each in its own process)

def job_tests(args) -> dict:
    """pytest on tests/test_gpu.py; the outcome of every test (on CPU the GPU tests skip)."""
    report = os.path.join(tempfile.mkdtemp(), "junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
           os.path.join(ROOT, "tests", "test_gpu.py")]
    if args.dry_run:
        cmd += ["-k", "layout or matches_xla"]  # the CPU layout test and the (skipped) GPU ones
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    import xml.etree.ElementTree as ET

    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = kinds[0] if kinds else "passed"
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failure", "error", "skipped")}
    return {"returncode": proc.returncode, **counts, "tests": outcomes,
            "output_tail": proc.stdout[-1500:] if proc.returncode else ""}


def job_slots(args) -> dict:
    """Forward + backward time of packed attention on real packed rows, per cuDNN slot count."""
    import jax
    import jax.numpy as jnp

    from jaxsft.models import attention as attn
    from throughput import packed_microbatches

    on_gpu = jax.devices()[0].platform == "gpu"
    seq, n, k, h = (128, 4, 2, 64) if args.dry_run else (4096, 24, 8, 128)  # the 3B's attention
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    seg = jnp.asarray(packed_microbatches(seq, 2, 1, 32000)[0]["segment_ids"])
    needed = int(jnp.max(attn.slots_needed(seg)))
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, seq, n, h), dtype)
    kk = jax.random.normal(keys[1], (2, seq, k, h), dtype)
    v = jax.random.normal(keys[2], (2, seq, k, h), dtype)

    def timed(fn, reps=10):
        grad = jax.jit(jax.grad(lambda q, kk, v: jnp.sum(fn(q, kk, v).astype(jnp.float32)), (0, 1, 2)))
        jax.block_until_ready(grad(q, kk, v))
        t0 = time.perf_counter()
        for _ in range(reps):
            out = grad(q, kk, v)
        jax.block_until_ready(out)
        return round((time.perf_counter() - t0) / reps * 1e3, 3)

    variants = {"xla": lambda *a: attn.xla_attention(*a, seg, scale=h ** -0.5, sliding_window=None)}
    if on_gpu:
        for slots in (seq, 64, attn.CUDNN_SEGMENT_SLOTS, needed):
            variants[f"cudnn_slots_{slots}"] = lambda *a, s=slots: attn.cudnn_attention(
                *a, seg, scale=h ** -0.5, sliding_window=None, slots=s)
        variants["cudnn_default"] = lambda *a: attn.cudnn_attention(*a, seg, scale=h ** -0.5, sliding_window=None)
    else:  # no cuDNN: build each layout, so the code path runs
        for slots in (seq, attn.CUDNN_SEGMENT_SLOTS):
            jax.block_until_ready(attn.packed_layout(seg, slots))
    fwd_bwd_ms = {name: timed(fn) for name, fn in variants.items()}
    return {"seq": seq, "rows": 2, "heads": [n, k, h], "slots_needed_max": needed,
            "cap": attn.CUDNN_SEGMENT_SLOTS, "fwd_bwd_ms": fwd_bwd_ms}


def job_throughput(args) -> dict:
    import jax

    from throughput import SHAPES, bench_jaxsft, bench_torch

    seq, microbatches, steps = (128, 2, 2) if args.dry_run else (4096, 4, 3)
    if args.remat is None:
        return {"torch": bench_torch(SHAPES[args.size], seq, 1, microbatches, steps)}
    target = TARGET_TOKENS_PER_S.get(args.size)
    on_gpu = jax.devices()[0].platform == "gpu"
    # Below target on the GPU (always in a dry run): trace one more step, record where its time goes.
    threshold = math.inf if args.dry_run else (target if on_gpu and target else 0)
    result = bench_jaxsft(SHAPES[args.size], seq, 1, microbatches, steps, args.remat,
                          profile_dir=tempfile.mkdtemp(prefix="jaxsft_trace_"), profile_below=threshold)
    return {"target_tokens_per_s": target, **result}


LLAMA_TOKENIZER = os.path.join(ROOT, "tests", "assets", "tokenizers", "llama-3.2-1b-instruct")
GSM8K_TRAIN = os.path.join(ROOT, "configs", "assets", "gsm8k", "train.jsonl")


def job_offload(args) -> dict:
    """Llama-3.1-8B shape (random weights, the real Llama 3 tokenizer and packed GSM8K rows at seq
    4096) through the CLI with the 8B recipe config: `--size offload` a full fine-tune with the
    optimizer state in host memory at a step of many micro-batches, `--size qlora` the
    `configs/llama3_1_8b.py:qlora` recipe (NF4 base, r=16 all-linear adapters). The run is stopped
    once it has logged its steps: the full fine-tune's checkpoint (~100 GB) would not fit the disk."""
    from throughput import SHAPES

    shape = SHAPES["test" if args.dry_run else "8b"]
    model_dir = tempfile.mkdtemp(prefix="jaxsft_8b_shape_")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(llama_hf_config({**shape, "vocab_size": 128256}), f)
    qlora = args.size == "qlora"
    # GSM8K at 4096: ~22 samples a row; 16 micro-batches a step (QLoRA: 4, its recipe's small batch).
    seq, samples = (128, 2) if args.dry_run else (4096, 88 if qlora else 352)
    overrides = {
        "model.path": model_dir, "model.init": "random", "model.remat": "full",
        "data.sources": [{"path": GSM8K_TRAIN, "format": "gsm8k"}], "data.tokenizer": LLAMA_TOKENIZER,
        "data.max_seq_len": seq, "data.micro_batch_rows": 1, "data.global_batch_size": samples,
        "data.eval_fraction": 0.0, "train.num_steps": 100, **({} if qlora else {"optim.offload": "host"}),
        **QUIET_RUN}
    # Three steps: from step 2 on, a second gradient tree alive at a step's start would show (issue 24).
    env = None if args.dry_run or qlora else emulate_80gb_device()
    config = os.path.join(ROOT, "configs", "llama3_1_8b.py") + (":qlora" if qlora else "")
    run = run_cli(config, overrides, stop_after=3, env=env)
    last = run["metrics"][-1] if len(run["metrics"]) >= 2 else {}  # step 1 includes compilation
    return {"device_fraction": env and env["XLA_PYTHON_CLIENT_MEM_FRACTION"],
            "returncode": run["returncode"], "cli_wall_s": run["wall_s"],
            "steps_logged": len(run["metrics"]), "step_s": last.get("step_time_s"), **{k: last.get(k) for k in (
                "tokens_per_s", "mfu", "microbatches", "samples", "tokens", "device_memory_gib", "loss")},
            "peak_device_bytes": last["device_memory_gib"] * 2**30 if last.get("device_memory_gib") else None,
            "first_step_s": run["metrics"][0].get("step_time_s") if run["metrics"] else None,
            **({"output_tail": run["output_tail"]} if run["returncode"] else {})}


def emulate_80gb_device() -> dict | None:
    """On a device larger than an H100's 80 GB (an H200: 141 GB), the fraction of its memory that
    JAX may take so that the 8B run gets what it would get on one 80 GB GPU (0.95 of it, as
    `child_env` gives every job): the "8B full fine-tune on one 80 GB GPU" claim is checked on
    either card. None where the device is not larger."""
    query = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    try:
        total_mib = float(subprocess.run(query, capture_output=True, text=True, check=True).stdout.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None
    h100_mib = 81559  # nvidia-smi's memory.total of an H100 80GB HBM3
    if total_mib <= h100_mib:
        return None
    return {**child_env(), "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.95 * h100_mib / total_mib:.4f}"}


def llama_hf_config(shape: dict) -> dict:
    """A Hugging Face config.json of a Llama 3 model of this shape."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": shape["vocab_size"],
            "hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"],
            "num_hidden_layers": shape["num_layers"], "num_attention_heads": shape["num_heads"],
            "num_key_value_heads": shape["num_kv_heads"], "head_dim": shape["head_dim"], "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 131072, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": shape["tie_word_embeddings"],
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


# Overrides that keep a benchmark run to its training steps (no evaluation, export or progress bar).
QUIET_RUN = {"train.eval_at_start": False, "train.eval_every": 0, "train.progress": False, "train.export_hf": False,
             "gsm8k.file": "", "checkpoint.every_steps": 0}


def run_cli(config: str, overrides: dict, stop_after: int | None = None, env: dict | None = None) -> dict:
    """`python -m jaxsft.train --config CONFIG --config.k=v ...` in a fresh output directory (in
    `env`, default this process's); with `stop_after`, the run is ended once metrics.jsonl has that
    many steps. Returns the step lines."""
    out = tempfile.mkdtemp(prefix="jaxsft_run_")
    cmd = [sys.executable, "-m", "jaxsft.train", "--config", config, f"--config.train.output_dir={out}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    log_path = os.path.join(out, "console.log")
    metrics_path = os.path.join(out, "metrics.jsonl")
    print("running", " ".join(cmd[1:]), f"(console output: {log_path})", flush=True)  # in the job's tail
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            if stop_after and len(read_jsonl(metrics_path)) >= stop_after:
                proc.kill()
                proc.wait()
                break
            time.sleep(1)
    lines = read_jsonl(metrics_path)
    stopped = bool(stop_after) and len(lines) >= stop_after
    with open(log_path) as f:
        tail = f.read()[-1500:]
    return {"returncode": 0 if stopped else proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "metrics": [m for m in lines if "tokens_per_s" in m], "output_tail": tail, "command": cmd}


def read_jsonl(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]  # a line being written is not complete


def job_smollm2(args) -> dict:
    """The real SmolLM2-135M (GGUF) through the CLI on GSM8K: loss and tokens/s from metrics.jsonl."""
    steps = 2 if args.dry_run else 200  # the first step includes compilation
    size = {"data.max_seq_len": 128, "data.global_batch_size": 2, "data.micro_batch_rows": 2} if args.dry_run else \
        {"data.max_seq_len": 1024, "data.global_batch_size": 32, "data.micro_batch_rows": 4,
         "model.compute_dtype": "bfloat16", "model.remat": "none"}
    run = run_cli(os.path.join(ROOT, "configs", "smollm2_gsm8k.py"),
                  {"train.num_steps": steps, "data.eval_fraction": 0.0, **size, **QUIET_RUN})
    train, later = run["metrics"], run["metrics"][1:]  # the first step includes compilation
    return {"returncode": run["returncode"], "steps": len(train), "cli_wall_s": run["wall_s"],
            "command": " ".join(run["command"][1:]),
            "first_loss": train[0].get("loss") if train else None, "last_loss": train[-1].get("loss") if train else None,
            "tokens_per_s": sum(m["tokens_per_s"] for m in later) / len(later) if later else None,
            "mfu": later[-1].get("mfu") if later else None,
            "peak_device_bytes": train[-1]["device_memory_gib"] * 2**30 if train and train[-1].get("device_memory_gib")
            else None, **({"output_tail": run["output_tail"]} if run["returncode"] else {})}


JOBS = {"tests": job_tests, "slots": job_slots, "throughput": job_throughput, "offload": job_offload,
        "smollm2": job_smollm2}


# ---------------------------------------------------------------- the driver

def device_kind() -> str:
    probe = "import jax; print(jax.devices()[0].device_kind)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env=child_env()).stdout.strip().splitlines()[-1]


def child_env() -> dict:
    # Each job owns the GPU alone: let JAX take most of it (the 8B step needs it) and leave the rest
    # to the allocator's own use. Torch ignores these.
    return {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def run_job(job: dict, dry: bool, cap: float) -> dict:
    result_file = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, os.path.abspath(__file__), "--job", job["stage"] if job["stage"] != "attention"
           else job["name"], "--result", result_file]
    cmd += [f"--size={job['size']}"] if "size" in job else []
    cmd += [f"--remat={job['remat']}"] if "remat" in job else []
    cmd += ["--dry-run"] if dry else []
    t0 = time.perf_counter()
    # A session of its own, so a timeout ends the job's children too (pytest, a CLI run).
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env(), start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=cap)
        status = "ok" if proc.returncode == 0 else "error"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = "timeout"
    tail = output[-1500:]
    result = {"status": status, "wall_s": round(time.perf_counter() - t0, 1), "cap_s": cap}
    if os.path.exists(result_file):
        with open(result_file) as f:
            result.update(json.load(f))
        os.remove(result_file)
    if status != "ok":
        result["output_tail"] = tail
    elif result.get("returncode"):  # a job that ran a command which failed (pytest, the CLI)
        result["status"] = "failed"
    return result


def summary_rows(stages: dict) -> list[tuple[str, str, str]]:
    """(job, status, the figures that matter) per job, for the final table."""
    rows = []
    for stage, jobs in stages.items():
        for name, r in jobs.items():
            r = {**r.pop("torch", {}), **r} if "torch" in r else r
            if stage == "attention" and name == "tests":
                figures = f"{r.get('passed', 0)} passed, {r.get('failure', 0) + r.get('error', 0)} failed, " \
                          f"{r.get('skipped', 0)} skipped"
            elif stage == "attention":
                figures = ", ".join(f"{k} {v} ms" for k, v in r.get("fwd_bwd_ms", {}).items())
            elif stage == "smollm2":
                figures = f"{r.get('steps')} steps, loss {fmt(r.get('first_loss'))} -> {fmt(r.get('last_loss'))}, " \
                          f"{fmt(r.get('tokens_per_s'), '.0f')} tok/s"
            else:
                figures = f"{fmt(r.get('tokens_per_s'), '.0f')} tok/s, MFU {fmt(r.get('mfu'), '.1%')}, " \
                          f"step {fmt(r.get('step_s'), '.3f')} s, compile {fmt(r.get('compile_s'), '.1f')} s, " \
                          f"peak {fmt(gib(r.get('peak_device_bytes') or max_compiled(r)), '.1f')} GiB"
                if name == "8b_offload":
                    figures += f", {r.get('microbatches')} micro-batches a step"
            rows.append((f"{stage}/{name}", r.get("status", "?"), figures))
    return rows


def fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def gib(n):
    return None if n is None else n / 2**30


def max_compiled(r):
    peaks = [v for v in (r.get("compiled_peak_bytes") or {}).values() if v]
    return max(peaks) if peaks else None


def verdicts(stages: dict) -> dict:
    """Per model size: the best jaxsft policy against the target and the torch reference; the 8B
    offload step's MFU against the 3B full-remat MFU (the no-offload speed)."""
    runs = stages.get("throughput", {})
    out = {}
    for size in sorted({name.split("_")[0] for name in runs}):
        jax_runs = {n: r for n, r in runs.items() if n.startswith(size + "_") and r.get("tokens_per_s")}
        if not jax_runs:
            continue
        best = max(jax_runs, key=lambda n: jax_runs[n]["tokens_per_s"])
        tokens = jax_runs[best]["tokens_per_s"]
        torch_tokens = runs.get(f"{size}_torch", {}).get("torch", {}).get("tokens_per_s")
        target = TARGET_TOKENS_PER_S.get(size)
        out[size] = {"best": best, "tokens_per_s": tokens, "target": target,
                     "meets_target": tokens >= target if target else None,
                     "vs_torch": tokens / torch_tokens if torch_tokens else None}
    offload = stages.get("offload", {}).get("8b_offload", {})
    base = runs.get("3b_full", {}).get("mfu")
    if offload.get("mfu") and base:
        out["8b_offload"] = {"vs_3b_mfu": offload["mfu"] / base,
                             "meets_target": offload["mfu"] / base >= OFFLOAD_TARGET}
    return out


def drive(args) -> dict:
    jobs = plan(args.dry_run)
    budget = DRY_RUN_BUDGET_S if args.dry_run else TOTAL_BUDGET_S
    started = time.perf_counter()
    device = device_kind()
    name = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_") or "unknown"
    out = args.out or os.path.join(HERE, "results", f"gpu_check_{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    report = {"device": device, "dry_run": args.dry_run, "python": sys.version.split()[0],
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "budget_s": budget, "caps_s": {f"{j['stage']}/{j['name']}": j["cap"] for j in jobs},
              "targets": {"tokens_per_s": TARGET_TOKENS_PER_S, "offload_vs_3b_mfu": OFFLOAD_TARGET},
              "stages": {}}
    print(f"gpu_check on {device}: {len(jobs)} jobs, caps {report['caps_s']} s, budget {budget} s", flush=True)
    for job in jobs:
        left = budget - (time.perf_counter() - started)
        if left < 10:
            result = {"status": "skipped", "reason": "total time budget spent"}
        else:
            result = run_job(job, args.dry_run, min(job["cap"], left))
        report["stages"].setdefault(job["stage"], {})[job["name"]] = result
        report["verdicts"] = verdicts(report["stages"])
        report["wall_s"] = round(time.perf_counter() - started, 1)
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"  {job['stage']}/{job['name']}: {result['status']} in {result.get('wall_s', 0)} s", flush=True)
    rows = summary_rows(json.loads(json.dumps(report["stages"])))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'job'.ljust(width)}  status   figures")
    for job, status, figures in rows:
        print(f"{job.ljust(width)}  {status:7s}  {figures}")
    for size, v in report["verdicts"].items():
        print(f"{size}: " + ", ".join(f"{k} {fmt(x, '.2f') if isinstance(x, float) else x}" for k, x in v.items()))
    print(f"\nwrote {out} ({report['wall_s']} s)")
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, to check the script")
    p.add_argument("--out", help="result JSON (default benchmarks/results/gpu_check_<device>.json)")
    p.add_argument("--job", choices=sorted(JOBS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--remat", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job is None:
        drive(args)
        return
    result = JOBS[args.job](args)
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
