"""Multi-process training on CPU with real processes (2 processes x 4 simulated devices against
1 process x 8; 2 x 2 against 1 x 4 on hosts under 40 GB), checkpoints across process counts, QLoRA in 2 processes, a failing worker, a preempted one (SIGTERM), and the
launchers' dry runs."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxsft.train.distributed import initialize_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs through the real CLI (`jaxsft.train.__main__.main`) after two test-only additions: a dump
# of this process's own rows of the first steps, computed exactly as `run` computes them, and an
# injected exception in one process at a given step (once that step's checkpoint is complete).
WORKER = r'''
import logging, os, signal, sys, time
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # before jax's own logging
import jax
import numpy as np
from jaxsft.train.distributed import maybe_initialize_distributed
maybe_initialize_distributed()
from jaxsft.cli import parse_args
from jaxsft.data import DataPipeline
from jaxsft.models import load_tokenizer

config, _ = parse_args(sys.argv[1:])
if os.environ.get("DUMP_ROWS"):
    data = DataPipeline(config.data, load_tokenizer(config.data.tokenizer or config.model.path), num_batch_devices=jax.device_count(),
                        process_index=jax.process_index(), process_count=jax.process_count())
    steps = [next(data).microbatches for _ in range(2)]
    data.close()
    np.savez(f"{os.environ['DUMP_ROWS']}.{jax.process_index()}.npz",
             **{f"{s}_{m}{suffix}": mb[key] for s, mbs in enumerate(steps) for m, mb in enumerate(mbs)
                for key, suffix in (("input_ids", ""), ("segment_ids", "_segments"))})
fail_at = int(os.environ.get("FAIL_AT_STEP", "-1"))
if jax.process_index() == 1 and fail_at >= 0:
    original = DataPipeline.__next__

    def failing(self):
        if self._next_step == fail_at:
            done = os.path.join(config.train.output_dir, "checkpoints", str(fail_at))
            deadline = time.time() + 60
            while not os.path.exists(done) and time.time() < deadline:
                time.sleep(0.2)
            raise RuntimeError("simulated worker failure")
        return original(self)

    DataPipeline.__next__ = failing
term_at = int(os.environ.get("SIGTERM_AT_STEP", "-1"))
if jax.process_index() == 1 and term_at >= 0:
    original_next = DataPipeline.__next__

    def terminated(self):
        # The signal a preempted host gets, sent while this process fetches step term_at + 1's
        # batch: the other process may already be past step term_at (it dispatches ahead), never
        # past the run's last step, which a signal sent from outside could not promise.
        if self._next_step == term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_next(self)

    DataPipeline.__next__ = terminated
from jaxsft.train.__main__ import main
main(sys.argv[1:])
'''

HEARTBEAT_S = 10


# 2 processes x 4 devices against 1 x 8 where the host has the ~2 GB per simulated device the demo
# model's step needs (40 GB or more); 2 x 2 against 1 x 4 below that. MULTIHOST_TEST_DEVICES sets it.
HOST_GB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
DEVICES = int(os.environ.get("MULTIHOST_TEST_DEVICES", "8" if HOST_GB >= 40 else "4"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(out, cache, devices=DEVICES, **overrides):
    settings = {
        "train.num_steps": 4, "checkpoint.every_steps": 1, "data.global_batch_size": 8, "mesh.fsdp": devices,
        "data.max_seq_len": 128, "data.micro_batch_rows": 1, "data.eval_sources": "[]",
        "train.eval_at_start": False, "train.export_hf": False, "train.progress": False,
        "train.output_dir": out, "data.cache_dir": cache, **overrides}
    return ["--config", "configs/demo.py", *[f"--config.{k}={v}" for k, v in settings.items()]]


def launch(tmp_path, processes, args, devices=DEVICES, **env):
    """Start the job: `processes` processes sharing `devices` simulated CPU devices."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    base = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // processes}",
            "HF_HUB_OFFLINE": "1", "JAXSFT_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S), **env}
    if processes > 1:
        base.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES=str(processes))
    procs = []
    for i in range(processes):
        log = open(tmp_path / f"log.{len(list(tmp_path.glob('log.*')))}", "w+")
        procs.append((subprocess.Popen([sys.executable, str(worker), *args], cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT, env={**base, "JAX_PROCESS_ID": str(i)}), log))
    return procs


def wait(procs, timeout=300):
    codes, texts = [], []
    for p, log in procs:
        try:
            codes.append(p.wait(timeout))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise
        log.seek(0)
        texts.append(log.read())
    return codes, texts


def run_job(tmp_path, processes, args, devices=DEVICES, **env):
    codes, texts = wait(launch(tmp_path, processes, args, devices, **env))
    assert codes == [0] * processes, "\n".join(t[-3000:] for t in texts)
    return texts


def losses(out):
    return {x["step"]: x["loss"] for x in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}


def step_samples(dump, step):
    """The token ids of every packed sample of `step` in a DUMP_ROWS file, sorted."""
    out = []
    for key in dump.files:
        if key.startswith(f"{step}_") and not key.endswith("_segments"):
            for ids, segments in zip(dump[key], dump[f"{key}_segments"]):
                out += [tuple(ids[segments == s].tolist()) for s in np.unique(segments[segments > 0])]
    return sorted(out)


@pytest.mark.slow
def test_two_processes_train_like_one_and_checkpoints_cross_process_counts(tmp_path):
    from jaxsft.eval import main as eval_main
    from tests.test_lm_eval import write_tasks

    cache = tmp_path / "cache"
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    # 1xN and 2x(N/2): the first two steps of the same 4-step run (same mesh: fsdp=N), with an
    # lm-eval evaluation at the end (step 2) of a multiple-choice and a generation task.
    tasks = write_tasks(tmp_path / "tasks")
    # float32 compute: the CLI below evaluates the checkpoint on another mesh (8 devices) and must
    # reach the same accuracies.
    first = {"train.stop_after_steps": 2, "model.compute_dtype": "float32", "lm_eval.tasks": "mc_local,gsm8k_local",
             "lm_eval.limit": 2, "lm_eval.include_path": tasks, "lm_eval.batch_size": 4}
    peak = {"JAXSFT_PEAK_FLOPS_PER_DEVICE": "1e12"}  # CPUs have no peak in the table: MFU is reported with one
    run_job(tmp_path, 1, train_args(one, cache, **first), DUMP_ROWS=f"{one}-rows", **peak)
    texts = run_job(tmp_path, 2, train_args(two, cache, **first), DUMP_ROWS=f"{two}-rows", **peak)
    assert f"process 1 of 2, {DEVICES // 2} local devices of {DEVICES}" in texts[1]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2]
    # fp32 on CPU: only the order of reductions differs (rows are packed per process).
    np.testing.assert_allclose([b[s] for s in (1, 2)], [a[s] for s in (1, 2)], rtol=2e-5)
    # MFU counts the whole step's FLOPs over every device, however many processes share them:
    # mfu x step time = FLOPs / (peak x devices) is the same number in both jobs.
    work = [{x["step"]: x["mfu"] * x["step_time_s"] for x in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}
            for out in (one, two)]
    assert work[0].keys() == {1, 2}
    np.testing.assert_allclose([work[1][s] for s in (1, 2)], [work[0][s] for s in (1, 2)], rtol=1e-9)

    # Process 0 drives lm-eval, process 1 joins its model calls: the same results as one process.
    (lm_one,), (lm_two,) = ([json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))] for out in (one, two))
    assert lm_one["step"] == 2 and {"lm_eval/mc_local/acc", "lm_eval/gsm8k_local/exact_match/strict-match"} <= lm_one.keys()
    assert lm_two == pytest.approx(lm_one, rel=1e-6)
    assert json.load(open(os.path.join(two, "eval", "lm_eval_step2.json")))["config"]["limit"] == 2
    # `python -m jaxsft.eval --model RUN` evaluates the run's newest checkpoint (step 2): the same again.
    eval_main(["--config", "configs/demo.py", "--config.model.compute_dtype=float32", "--model", one, "--tasks", "mc_local", "--include-path", str(tasks),
               "--limit", "2", "--batch-size", "4", "--output", str(tmp_path / "cli.json")])
    cli = json.load(open(tmp_path / "cli.json"))["results"]["mc_local"]
    assert [cli["acc,none"], cli["acc_norm,none"]] == [lm_one["lm_eval/mc_local/acc"], lm_one["lm_eval/mc_local/acc_norm"]]

    # Each process packs the samples it read (records p mod 2) into its half of every micro-batch;
    # together the two hold exactly the single process's samples of each step, none twice.
    whole = np.load(f"{one}-rows.0.npz")
    halves = [np.load(f"{two}-rows.{i}.npz") for i in (0, 1)]
    assert sorted(halves[0].files) == sorted(halves[1].files)
    assert all(halves[i][k].shape[0] == DEVICES // 2 for i in (0, 1) for k in halves[i].files)
    for step in (0, 1):
        expected = step_samples(whole, step)
        assert expected == sorted(step_samples(halves[0], step) + step_samples(halves[1], step))
        assert len(set(expected)) == len(expected) > 0

    # Cross restores: the 2-process checkpoint continues in 1 process and the 1-process one in 2;
    # both give the same steps 3 and 4.
    run_job(tmp_path, 1, train_args(two, cache))
    run_job(tmp_path, 2, train_args(one, cache))
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([a[3], a[4]], [b[3], b[4]], rtol=2e-5)
    print(f"losses 1 process then 2 ({DEVICES} devices):", [a[s] for s in (1, 2, 3, 4)],
          "2 then 1:", [b[s] for s in (1, 2, 3, 4)])


@pytest.mark.slow
def test_a_failed_or_preempted_worker_stops_the_job_and_the_same_command_resumes(tmp_path):
    cache, out = tmp_path / "cache", str(tmp_path / "run")
    # 2 x 2 devices: failing and resuming do not depend on the mesh size.
    args = train_args(out, cache, devices=4, **{"train.num_steps": 3})
    start = time.time()
    procs = launch(tmp_path, 2, args, devices=4, FAIL_AT_STEP="2")
    codes, texts = wait(procs, timeout=240)
    # Process 1 raises at step 3 and exits at once. Process 0, waiting for it in a collective,
    # stops either on the collective's error (gloo: "Connection closed by peer") or on the missed
    # heartbeats (within HEARTBEAT_S); either way well within the timeout above.
    assert codes[0] != 0 and codes[1] == 1, codes
    assert "simulated worker failure" in texts[1] and "process 1 of 2 failed" in texts[1]
    assert "stopped sending heartbeats" in texts[0] or "process 0 of 2 failed" in texts[0], texts[0][-2000:]
    print(f"failed job stopped after {time.time() - start:.0f} s")
    assert os.path.exists(os.path.join(out, "checkpoints", "2"))

    texts = run_job(tmp_path, 2, args, devices=4)  # the same command again
    assert "resumed from step 2" in texts[0]
    assert sorted(losses(out)) == [1, 2, 3]

    # A SIGTERM to process 1 alone (a preempted host) while it fetches step 2's batch: jax's
    # preemption service makes both processes stop after the same step (2 or 3: process 0 may have
    # passed step 2's sync point already), save it and exit 75; the same command resumes to the
    # losses of the job above.
    termed = str(tmp_path / "termed")
    args = train_args(termed, cache, devices=4, **{"train.num_steps": 3, "checkpoint.every_steps": 0})
    # A longer heartbeat timeout than the failure test above needs: on a loaded CI host a process
    # compiling the step can miss 10 s of heartbeats.
    patient = {"JAXSFT_HEARTBEAT_TIMEOUT_S": "60"}
    codes, texts = wait(launch(tmp_path, 2, args, devices=4, SIGTERM_AT_STEP="1", **patient), timeout=600)
    assert codes == [75, 75], "\n".join(t[-3000:] for t in texts)
    saved = [int(re.search(r"preempted: stopped after step (\d+) of 3", t).group(1)) for t in texts]
    assert saved[0] == saved[1] and os.listdir(os.path.join(termed, "checkpoints")) == [str(saved[0])]
    texts = run_job(tmp_path, 2, args, devices=4, **patient)
    assert f"resumed from step {saved[0]}" in texts[0]
    a, b = losses(out), losses(termed)
    assert sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], rtol=2e-5)
    print(f"SIGTERM to process 1: both saved step {saved[0]}")


EXIT_ON_FAILURE = r"""
import json, os, sys
import jax
from jaxsft.train import distributed
distributed._initialized = True
jax.process_count = lambda: 2  # as in a job of two processes, without starting one
from jaxsft.checkpoint import CheckpointMismatch
from jaxsft.metrics.health import TrainingDiverged
from jaxsft.models import ConfigError
from jaxsft.train.preemption import Preempted
errors = {"usage": ConfigError("bad key"), "checkpoint": CheckpointMismatch("does not fit"),
          "diverged": TrainingDiverged("nan"), "preempted": Preempted("step 3 saved"), "bug": RuntimeError("a bug")}
results = {}
for kind, error in errors.items():
    log = os.path.join(sys.argv[1], kind)
    pid = os.fork()
    if pid == 0:  # the child is the failing process: its stderr goes to `log`
        os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT), 2)

        @distributed.exit_on_failure
        def run():
            raise error

        run()
    results[kind] = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), open(log).read()]
print(json.dumps(results))
"""


def test_a_process_of_a_job_exits_with_the_single_process_statuses(tmp_path):
    r = subprocess.run([sys.executable, "-c", EXIT_ON_FAILURE, str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(r.stdout.splitlines()[-1])
    expected = {"usage": (2, "error: bad key"), "checkpoint": (3, "checkpoint error: does not fit"),
                "diverged": (4, "training diverged: nan"), "preempted": (75, "preempted: step 3 saved"),
                "bug": (1, "RuntimeError: a bug")}
    for kind, (status, line) in expected.items():
        code, stderr = results[kind]
        assert code == status and line in stderr, (kind, code, stderr)
        assert ("Traceback" in stderr) == (kind == "bug")  # one line for the errors a user acts on


# --- initialisation from the environment (no jax started) ---

def test_initialize_args_from_the_environment():
    assert initialize_args({}) is None
    assert initialize_args({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
                            "JAX_PROCESS_ID": "1", "JAXSFT_HEARTBEAT_TIMEOUT_S": "5"}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
        "heartbeat_timeout_seconds": 5}
    # Inside srun with several tasks jax reads Slurm's variables; a bare sbatch shell is one process.
    assert initialize_args({"SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "gpu[1-2]"}) == {}
    assert initialize_args({"SLURM_NTASKS": "8"}) is None
    assert initialize_args({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "gpu1"}) is None
    assert initialize_args({"JAXSFT_DISTRIBUTED": "1"}) == {}  # TPU pods: jax asks the metadata server
    assert initialize_args({"JAXSFT_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "h:1"}) is None
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        initialize_args({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="outside"):
        initialize_args({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="not an integer"):
        initialize_args({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})


# --- the launchers' dry runs ---

SOURCES = "[{'path': 'gs://bucket/data/train.jsonl', 'format': 'chat'}]"
TRAIN = ["--config", "configs/demo.py", "--config.train.output_dir=gs://bucket/runs/my run",
         f"--config.data.sources={SOURCES}"]


def dry_run(cmd, **env):
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [x[2:] for x in r.stdout.splitlines() if x.startswith("+ ")]
    return [shlex.split(x.split("  #")[0]) for x in lines]


def test_tpu_pod_launcher_dry_run():
    cmds = dry_run([sys.executable, "launch/tpu_pod.py", "--name", "sft", "--zone", "us-central2-b",
                    "--accelerator", "v4-32", "--create", "--queued", "--delete", "--env", "A=b c",
                    "--dry-run", "--", *TRAIN])
    assert [c[:5] for c in cmds] == [
        ["gcloud", "compute", "tpus", "queued-resources", "create"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe"],
        ["git", "-C", REPO, "archive", "--format=tar.gz"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "queued-resources", "delete"]]
    assert "--accelerator-type=v4-32" in cmds[0] and "--zone=us-central2-b" in cmds[0]
    assert "pip install" in cmds[4][-2] and "--worker=all" in cmds[4]
    train = cmds[5]
    assert "--worker=all" in train
    remote = next(a for a in train if a.startswith("--command="))[len("--command="):]
    # The remote shell sees exactly the arguments given after `--`.
    words = shlex.split(remote)
    assert words[words.index("python3"):] == ["python3", "-m", "jaxsft.train", *TRAIN]
    assert "JAXSFT_DISTRIBUTED=1" in words and "A=b c" in words

    plain = dry_run([sys.executable, "launch/tpu_pod.py", "--name", "sft", "--zone", "z", "--dry-run",
                     "--", *TRAIN])
    assert len(plain) == 1 and plain[0][3:6] == ["tpu-vm", "ssh", "sft"]
    r = subprocess.run([sys.executable, "launch/tpu_pod.py", "--name", "sft", "--zone", "z", "--dry-run",
                        "--", "--config.train.num_steps=2"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "need --config" in r.stderr


@pytest.mark.parametrize("tasks", ["node", "gpu"])
def test_slurm_script_dry_run(tasks):
    [cmd] = dry_run(["bash", "launch/slurm.sbatch", *TRAIN], DRY_RUN="1", TASKS=tasks, GPUS_PER_NODE="4")
    assert cmd[0] == "srun" and "--kill-on-bad-exit=1" in cmd and "--gpus-per-node=4" in cmd
    assert cmd[cmd.index("python"):] == ["python", "-m", "jaxsft.train", *TRAIN]
    if tasks == "node":
        assert "--ntasks-per-node=1" in cmd and "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in cmd
    else:
        assert "--ntasks-per-node=4" in cmd and not any("JAX_LOCAL_DEVICE_IDS" in c for c in cmd)
    r = subprocess.run(["bash", "launch/slurm.sbatch", "--config.train.num_steps=2"], cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, "DRY_RUN": "1"})
    assert r.returncode == 2 and "usage" in r.stderr



@pytest.mark.slow
def test_qlora_in_two_processes_resumes_trains_and_saves_like_one(tmp_path):
    """QLoRA (an NF4 base, its packed weights sharded over both processes' devices; with LoRA+) on
    the tiny demo model: a 2 process x 1 device job resumes a 1-process (2-device) adapters-only
    checkpoint, and its next step, its checkpoint (read back by `python -m jaxsft.export`) and its
    gathered PEFT adapter equal the 1-process run's. Dropout is left out: its masks follow each
    row's place in the batch, which the process count changes."""
    import shutil

    import jax.numpy as jnp
    import ml_collections
    from safetensors.numpy import load_file
    from test_metrics import tiny_model

    from jaxsft.export import main as export_main
    from jaxsft.models import load_model, peft_io
    from jaxsft.models.loading import model_for_run

    from transformers import AutoConfig, AutoModelForCausalLM

    model, tokenizer = tiny_model(tmp_path, hidden_size=64)  # projections' inputs in NF4's 64-value blocks
    # Pretrained (random) weights in safetensors: each process reads only its devices' share.
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).save_pretrained(model)
    cache, one, two = tmp_path / "cache", tmp_path / "one", tmp_path / "two"
    lora = {"model.path": model, "data.tokenizer": tokenizer, "data.global_batch_size": 4, "train.num_steps": 3,
            "model.init": "pretrained", "lora.r": 4, "lora.alpha": 8, "lora.lr_ratio": 4, "lora.base_quant": "nf4",
            "optim.learning_rate": 1e-2,
            "checkpoint.keep": 3,
            "model.compute_dtype": "float32"}  # in the demo's bf16 the 2-process grad norm is 8e-5 off
    run_job(tmp_path, 1, train_args(one, cache, devices=2, **lora), devices=2)
    shutil.copytree(one / "checkpoints", tmp_path / "ckpt", ignore=shutil.ignore_patterns("3"))
    texts = run_job(tmp_path, 2, train_args(two, cache, devices=2, **lora, **{"checkpoint.dir": tmp_path / "ckpt"}),
                    devices=2)
    assert "resumed from step 2" in texts[0] and "process 1 of 2, 1 local devices of 2" in texts[1]
    # Each process read its half of the checkpoint (the 152k x 64 embedding, most of it, is split
    # over the two devices), not the whole.
    read = [re.search(r"process (\d) read ([\d.]+) MB of the checkpoint's ([\d.]+) MB", t) for t in texts]
    assert [int(r[1]) for r in read] == [0, 1], read
    assert all(0.4 < float(r[2]) / float(r[3]) < 0.6 for r in read), read

    a, b = (metrics_by_step(out) for out in (one, two))
    assert sorted(b) == [3]
    for key in ("loss", "grad_norm", "param_norm"):  # the loss of a random 152k-vocabulary model hardly moves
        np.testing.assert_allclose(b[3][key], a[3][key], rtol=2e-5, err_msg=key)
    export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--dtype", "float32"])
    expected = load_file(one / "adapter" / "adapter_model.safetensors")
    assert len(expected) == 7 * 2 and all(np.abs(v).max() > 0 for v in expected.values())  # A, B of 7 targets
    for adapter in (two / "adapter", tmp_path / "hf" / "adapter"):
        got = load_file(adapter / "adapter_model.safetensors")
        assert sorted(got) == sorted(expected)
        for k, v in expected.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-6, err_msg=f"{adapter}: {k}")
    # The base was NF4: the merged export's kernels are the dequantized random base + the adapter.
    c = ml_collections.ConfigDict(json.loads((one / "config.json").read_text()))
    nf4_base = model_for_run(c.model, seed=c.train.seed, base_quant="nf4")
    merged = peft_io.merged(peft_io.load_adapter(nf4_base, two / "adapter"))
    exported = load_model(tmp_path / "hf", dtype=jnp.float32)
    np.testing.assert_allclose(exported.layers.down[...], merged.layers.down[...], rtol=1e-5, atol=1e-6)
    full_precision = model_for_run(c.model, seed=c.train.seed).layers.down[...]
    assert np.abs(np.asarray(full_precision) - np.asarray(merged.layers.down[...])).max() > 1e-4


def metrics_by_step(out):
    return {x["step"]: x for x in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}


def fake_commands(tmp_path, **scripts):
    """An environment whose PATH finds these bash `scripts` first (every call is logged to calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        (bin_dir / name).write_text(f'#!/bin/bash\necho "{name} $*" >> {tmp_path / "calls"}\n{body}\n')
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_launchers_relaunch_a_preempted_run(tmp_path):
    calls = tmp_path / "calls"
    # Slurm: the run exits 75 (preempted, its step saved): the script requeues the job and says so.
    env = fake_commands(tmp_path, srun="exit 75", scontrol="")
    r = subprocess.run(["bash", "launch/slurm.sbatch", *TRAIN], cwd=REPO, env={**env, "SLURM_JOB_ID": "42"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 75 and calls.read_text().splitlines()[-1] == "scontrol requeue 42", r.stderr
    assert "sbatch" not in r.stderr and "#SBATCH --requeue" in open(os.path.join(REPO, "launch/slurm.sbatch")).read()

    # TPU pod: the training command exits 75 twice (the spot VM is gone after the first), then 0.
    (tmp_path / "tpu").mkdir()
    env = fake_commands(tmp_path / "tpu", gcloud=f'''calls={tmp_path / "tpu" / "calls"}
case "$*" in
  *jaxsft.train*) [ "$(grep -c jaxsft.train "$calls")" -lt 3 ] && exit 75; exit 0 ;;
  *describe*) [ "$(grep -c jaxsft.train "$calls")" -eq 1 ] && echo PREEMPTED || echo READY ;;
esac''')
    r = subprocess.run([sys.executable, "launch/tpu_pod.py", "--name", "sft", "--zone", "z", "--create", "--spot",
                        "--", *TRAIN], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    words = [line.split()[:5] for line in (tmp_path / "tpu" / "calls").read_text().splitlines()]
    kinds = [" ".join(w[3:5]) for w in words]
    assert kinds == ["tpu-vm create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",  # create, install, train: 75
                     "tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm scp", "tpu-vm ssh",  # gone: again
                     "tpu-vm ssh",  # train: 75
                     "tpu-vm describe", "tpu-vm ssh"], kinds  # the VM is up: train again, 0
    assert r.stderr.count("was preempted and saved its step") == 2
