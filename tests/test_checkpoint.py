"""Checkpoints: another mesh on restore, fallback from corrupt steps, mismatch errors, keep-best,
exact resume after SIGKILL and after SIGTERM (preemption) through the CLI, convert once / start from it, export to transformers."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft.checkpoint import Checkpointer, CheckpointCorrupt, CheckpointMismatch, flatten
from jaxsft.rundir import truncate_jsonl
from jaxsft.models import Decoder, ModelConfig
from jaxsft.sharding import make_mesh, optimizer_shardings, param_shardings
from jaxsft.train import default_config
from jaxsft.train.optimizer import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "configs", "assets")
CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=97, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, remat="none", attention="xla")


def state_on(mesh, seed=0, config=CONFIG):
    """Params and Adam state of a small model, sharded on `mesh`."""
    _, params = nnx.split(Decoder(config, param_dtype=jnp.float32, compute_dtype=jnp.float32,
                                  rngs=nnx.Rngs(seed)), nnx.Param)
    shardings = param_shardings(params, mesh)
    params = jax.device_put(params, shardings)
    tx, _ = make_optimizer(default_config().optim, total_steps=10)
    opt_state = jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, shardings, mesh))(params)
    # Non-trivial moments, so a restore that dropped them would show.
    opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x + 3, opt_state)
    return params, opt_state


def assert_same(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_restore_on_another_mesh_and_device_count(tmp_path):
    mesh8 = make_mesh(data=1, fsdp=8, tensor=1)
    params, opt_state = state_on(mesh8)
    ckpt = Checkpointer(str(tmp_path), keep=2)
    ckpt.save(3, params, opt_state, {"step": 3, "data": {"step": 3}})
    ckpt.close()

    mesh4 = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    like_params, like_opt = state_on(mesh4, seed=1)
    p, o, record = Checkpointer(str(tmp_path)).restore_latest(like_params, like_opt)
    assert record["step"] == 3 and record["data"] == {"step": 3}
    assert_same(p, params)
    assert_same(o, opt_state)
    for restored, like in zip(jax.tree.leaves(p), jax.tree.leaves(like_params)):
        assert restored.sharding == like.sharding and len(restored.sharding.device_set) <= 4


def _three_steps(directory):
    mesh = make_mesh(devices=jax.devices()[:2])
    params, opt_state = state_on(mesh)
    ckpt, saved = Checkpointer(str(directory), keep=3), {}
    for step in (1, 2, 3):
        params = saved[step] = jax.tree.map(lambda x: x + 1, params)
        ckpt.save(step, params, opt_state, {"step": step, "data": {}})
    ckpt.close()
    return mesh, saved


def _data_files(step_dir):
    return [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "record_deleted", "metadata_garbage"])
def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, caplog, damage):
    mesh, saved = _three_steps(tmp_path)
    newest = tmp_path / "3"
    if damage == "truncate":
        for f in _data_files(newest):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "flip_bytes":
        for f in _data_files(newest):
            data = bytearray(f.read_bytes())
            for i in range(len(data) // 3, len(data), 97):
                data[i] ^= 0x5A
            f.write_bytes(bytes(data))
    elif damage == "record_deleted":
        shutil.rmtree(newest / "record")
    else:
        (newest / "params" / "_METADATA").write_text("{not json")
    # A save cut short by a kill leaves a temporary directory: it must be ignored.
    (tmp_path / "4.orbax-checkpoint-tmp-1234567").mkdir()
    (tmp_path / "4.orbax-checkpoint-tmp-1234567" / "params").mkdir()

    like = state_on(mesh, seed=5)
    with caplog.at_level(logging.WARNING, logger="jaxsft.checkpoint"):
        restored = Checkpointer(str(tmp_path), keep=3).restore_latest(*like)
    assert restored[2]["step"] == 2
    assert "checkpoint" in caplog.text and "/3 is unusable" in caplog.text
    assert not (tmp_path / "3").exists() and list(tmp_path.glob("3.corrupt-*"))
    assert_same(restored[0], saved[2])


def test_all_checkpoints_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    mesh, _ = _three_steps(tmp_path)
    for step in (1, 2, 3):
        shutil.rmtree(tmp_path / str(step) / "record")
    with pytest.raises(CheckpointCorrupt, match="no usable checkpoint"):
        Checkpointer(str(tmp_path)).restore_latest(*state_on(mesh))


def test_keep_best_by_eval_loss(tmp_path):
    mesh = make_mesh(devices=jax.devices()[:1])
    params, opt_state = state_on(mesh)
    ckpt = Checkpointer(str(tmp_path), keep=1, keep_best=1)
    for step, loss in [(1, 3.0), (2, 1.0), (3, None), (4, 2.0), (5, None)]:
        ckpt.save(step, params, opt_state, {"step": step, "data": {}}, eval_loss=loss)
    ckpt.close()
    assert Checkpointer(str(tmp_path)).all_steps() == [2, 5]


def test_truncate_jsonl(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    truncate_jsonl(str(f), 3)
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1, 2, 3]


def small_run_config(tmp_path, **changes):
    """The demo model (tiny, random, 152k vocab) on a few GSM8K problems: seconds per step on CPU."""
    train = tmp_path / "train.jsonl"
    if not train.exists():
        with open(os.path.join(ASSETS, "gsm8k", "train.jsonl")) as f:
            train.write_text("".join(f.readlines()[:24]))
    c = default_config()
    c.model.path = os.path.join(ASSETS, "tiny-qwen2")
    c.model.init = "random"
    c.model.compute_dtype = "float32"
    c.model.remat = "none"
    c.data.sources = [{"path": str(train), "format": "gsm8k"}]
    c.data.eval_sources = []
    c.data.max_seq_len = 256
    c.data.global_batch_size = 4
    c.data.micro_batch_rows = 2
    c.data.cache_dir = str(tmp_path / "cache")
    c.optim.learning_rate = 5e-3
    c.train.num_steps = 2
    c.train.eval_at_start = False
    c.train.progress = False
    c.train.output_dir = str(tmp_path / "run")
    for key, value in changes.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


@pytest.mark.slow
def test_checkpoint_of_another_model_names_keys_and_shapes(tmp_path):
    from jaxsft.train import run

    # A checkpoint saved by a narrower model with the same vocabulary.
    with open(os.path.join(ASSETS, "tiny-qwen2", "config.json")) as f:
        hf = {**json.load(f), "hidden_size": 32, "intermediate_size": 96}
    other = ModelConfig.from_hf(hf, remat="none", attention="xla")
    params, opt_state = state_on(make_mesh(devices=jax.devices()[:1]), config=other)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, params, opt_state, {"step": 1, "data": {}})
    ckpt.close()

    config = small_run_config(tmp_path, **{"checkpoint.dir": str(tmp_path / "ckpt")})
    with pytest.raises(CheckpointMismatch) as e:
        run(config)
    message = str(e.value)
    assert "embed: checkpoint float32[151936, 32], run float32[151936, 64]" in message, message
    assert "\n" not in message and "(and " in message and "checkpoint.overwrite=True" in message


# --- through the CLI, in subprocesses (one device each) ---

def cli(tmp_path, out, *extra):
    train = tmp_path / "train.jsonl"
    if not train.exists():
        with open(os.path.join(ASSETS, "gsm8k", "train.jsonl")) as f:
            train.write_text("".join(f.readlines()[:24]))
    return [sys.executable, "-m", "jaxsft.train", "--config", "configs/demo.py",
            "--config.train.num_steps=4", "--config.checkpoint.every_steps=2",
            "--config.data.global_batch_size=4", "--config.data.max_seq_len=128",
            "--config.train.eval_at_start=False", "--config.data.eval_sources=[]",
            "--config.train.eval_every=0", "--config.train.export_hf=False",
            "--config.train.progress=False",
            f"--config.data.sources=[{{'path': '{train}', 'format': 'gsm8k'}}]",
            f"--config.data.cache_dir={tmp_path / 'cache'}", f"--config.train.output_dir={out}", *extra]


ENV = {**os.environ, "XLA_FLAGS": ""}
DETERMINISTIC = ("loss", "grad_norm", "learning_rate", "samples", "tokens", "loss_tokens", "epoch")


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def final_params(out, step):
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as c:
        return c.restore(out / "checkpoints" / str(step) / "params")


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
    # Tokenize once, so both runs below spend their time training.
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = subprocess.run(cli(tmp_path, whole), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

    sigkill_after_checkpoint(cli(tmp_path, killed), killed)
    before = (killed / "metrics.jsonl").read_text().splitlines()[:2]

    r = subprocess.run(cli(tmp_path, killed), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "taking over" in r.stderr and "is not running on this host" in r.stderr  # the killed run's lock
    # Resumed, not restarted: steps 1-2 are the killed run's lines (their timings included).
    assert (killed / "metrics.jsonl").read_text().splitlines()[:2] == before

    a, b = metrics(whole), metrics(killed)
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert {k: x[k] for k in DETERMINISTIC} == {k: y[k] for k in DETERMINISTIC}, (x, y)
    pa, pb = final_params(whole, 4), final_params(killed, 4)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)  # bitwise

    # Export the run's checkpoint: transformers loads it and gives jaxsft's logits.
    export_and_compare(killed, tmp_path / "hf")

    # SIGTERM at a random moment of step 2 or 3: the run saves the step it finished, exits 75,
    # and the same command resumes to the uninterrupted run's losses.
    termed = tmp_path / "termed"
    proc = subprocess.Popen(cli(tmp_path, termed), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    rng = random.Random()
    after_line = rng.choice([1, 2])  # line k is logged once step k+1 is dispatched
    wait_for(lambda: len(metrics_lines(termed)) >= after_line, proc)
    time.sleep(rng.uniform(0, 0.3))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    saved = Checkpointer(str(termed / "checkpoints")).all_steps()[-1]
    assert f"preempted: stopped after step {saved} of 4" in err
    assert [x["step"] for x in metrics(termed)] == list(range(1, saved + 1))
    r = subprocess.run(cli(tmp_path, termed), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and f"resumed from step {saved}" in r.stderr, r.stderr[-3000:]
    assert [{k: x[k] for k in DETERMINISTIC} for x in metrics(termed)] == [{k: x[k] for k in DETERMINISTIC} for x in a]
    pc = final_params(termed, 4)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pc[k], err_msg=k)
    print(f"SIGTERM {after_line} lines in: saved step {saved}")

    # A dtype change on resume: one line naming the config field, status 3, nothing renamed.
    steps = sorted(os.listdir(termed / "checkpoints"))
    r = subprocess.run(cli(tmp_path, termed, "--config.train.num_steps=5", "--config.optim.state_dtype=bfloat16"),
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 3, r.stderr[-3000:]
    [line] = [x for x in r.stderr.splitlines() if x.startswith("checkpoint error:")]
    assert "1.0.mu.embed: checkpoint float32[151936, 64], run bfloat16[151936, 64]" in line, line
    assert "changed since it was saved: optim.state_dtype 'float32' -> 'bfloat16'." in line
    assert sorted(os.listdir(termed / "checkpoints")) == steps
    # checkpoint.resume=False is refused on a directory with steps, unless checkpoint.overwrite moves them aside.
    r = subprocess.run(cli(tmp_path, termed, "--config.checkpoint.resume=False"), cwd=REPO, env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "holds steps [" in r.stderr and "checkpoint.overwrite=True" in r.stderr, r.stderr[-3000:]
    r = subprocess.run(cli(tmp_path, termed, "--config.checkpoint.resume=False", "--config.checkpoint.overwrite=True",
                           "--config.train.num_steps=1"), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    [aside] = [p for p in termed.iterdir() if p.name.startswith("checkpoints.overwritten-")]
    assert sorted(os.listdir(aside)) == steps and sorted(os.listdir(termed / "checkpoints")) == ["1"]
    assert [x["step"] for x in metrics(termed)] == [1]  # the new run's lines only


def metrics_lines(out):
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def wait_for(condition, proc, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, "the run ended first"
        time.sleep(0.05)


def sigkill_after_checkpoint(cmd, run_dir, step=2, next_step=4):
    """Starts the run `cmd` writing to `run_dir` and SIGKILLs it once its checkpoint `step` is
    complete, before checkpoint `next_step`."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # Orbax renames the step directory into place once every file is written.
    while not (run_dir / "checkpoints" / str(step) / "record").exists():
        assert proc.poll() is None and time.time() < deadline, f"the run ended before checkpoint {step}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / str(next_step)).exists(), "killed too late to test a resume"


def export_and_compare(checkpoint, hf_dir, jax_model=None):
    import torch
    import transformers as tf

    from jaxsft.export import main as export_main
    from jaxsft.models import load_model

    export_main(["--checkpoint", str(checkpoint), "--out", str(hf_dir), "--dtype", "float32"])
    hf = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(hf_dir)
    ids = np.array([tok("Natalia sold clips to 48 of her friends in April.")["input_ids"]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    jax_model = jax_model or load_model(hf_dir, compute_dtype=jnp.float32)
    ours = np.asarray(jax_model(jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def make_hf_qwen2(folder):
    """A random Qwen2 model in the demo's shape (152k vocab) with the demo's tokenizer."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen2Config.from_pretrained(os.path.join(ASSETS, "tiny-qwen2"))
    tf.Qwen2ForCausalLM(config).save_pretrained(folder)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(ASSETS, "tiny-qwen2", f), os.path.join(folder, f))
    return folder


@pytest.mark.slow
def test_convert_once_then_start_from_it_and_export(tmp_path):
    from jaxsft.convert import main as convert_main
    from jaxsft.models import load_model, load_tokenizer
    from jaxsft.models.converted import is_converted, load_converted
    from jaxsft.models.loading import model_for_run

    hf_dir = make_hf_qwen2(str(tmp_path / "hf"))
    conv = tmp_path / "converted"
    convert_main(["--from", hf_dir, "--to", str(conv)])
    assert is_converted(str(conv)) and not list(conv.glob("*.safetensors"))

    ids = jnp.asarray([[1, 5, 9, 151000, 3]])
    reference = np.asarray(load_model(hf_dir, compute_dtype=jnp.float32)(ids))
    config = default_config()
    config.model.path = str(conv)
    config.model.compute_dtype = "float32"
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = model_for_run(config.model, mesh)  # as a run loads it: no safetensors read
    np.testing.assert_allclose(np.asarray(model(ids)), reference, rtol=1e-5, atol=1e-5)
    assert load_tokenizer(config.model.path)("hello")["input_ids"]
    # bfloat16 storage, cast back to the run's float32 on load.
    convert_main(["--from", hf_dir, "--to", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    small = load_converted(str(tmp_path / "bf16"), compute_dtype=jnp.float32)
    assert small.embed.value.dtype == jnp.float32

    export_and_compare(conv, tmp_path / "exported", jax_model=model)


@pytest.mark.slow
def test_a_checkpoint_of_the_gguf_quickstart_exports_without_the_gguf(tmp_path):
    """Checkpoints describe themselves: export needs neither the model file the run started from
    (here the README quickstart's GGUF, deleted before the export) nor its folder."""
    from jaxsft.models.gguf import smollm2_path

    gguf = tmp_path / "model" / "smollm2.gguf"
    gguf.parent.mkdir()
    shutil.copy(smollm2_path(), gguf)
    r = subprocess.run(
        [sys.executable, "-m", "jaxsft.train", "--config", "configs/smollm2_gsm8k.py",
         f"--config.model.path={gguf}", "--config.data.max_seq_len=256", "--config.data.global_batch_size=2",
         "--config.data.micro_batch_rows=1", "--config.data.eval_fraction=0.0", "--config.gsm8k.file=",
         "--config.train.num_steps=1", "--config.train.eval_at_start=False", "--config.train.export_hf=False",
         "--config.train.progress=False", f"--config.data.cache_dir={tmp_path / 'cache'}",
         f"--config.train.output_dir={tmp_path / 'run'}"],
        cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(gguf.parent)
    export_and_compare(tmp_path / "run", tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as f:
        exported = json.load(f)
    assert exported["num_hidden_layers"] == 30 and exported["rope_theta"] == 100000.0
