"""The README's first command, end to end (shortened): real GSM8K data, a tiny model on CPU."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_trains_evaluates_checkpoints_and_exports(tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    with open(os.path.join(REPO, "configs/assets/gsm8k/test.jsonl")) as f:
        eval_file.write_text("".join(f.readlines()[:40]))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxsft.train", "--config", "configs/demo.py",
           "--config.train.num_steps=8", "--config.data.global_batch_size=8",
           "--config.train.eval_every=4", f"--config.train.output_dir={out}",
           f"--config.data.eval_sources=[{{'path': '{eval_file}', 'format': 'gsm8k'}}]",
           f"--config.data.cache_dir={tmp_path / 'cache'}",
           f"--config.gsm8k.file={eval_file}", "--config.gsm8k.subset=2", "--config.gsm8k.max_new_tokens=8",
           "--config.gsm8k.every=4"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    # Nothing a user cannot act on: no libtpu probe on this TPU-less machine, no transformers advisory.
    assert "TPU" not in r.stderr and "PyTorch was not found" not in r.stderr, r.stderr[-3000:]

    config = json.loads((out / "config.json").read_text())
    assert config["train"]["num_steps"] == 8 and config["data"]["global_batch_size"] == 8
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    for x in lines:
        assert x["samples"] == 8 and x["loss_tokens"] > 0 and x["tokens"] >= x["loss_tokens"]
        for key in ("loss", "grad_norm", "learning_rate", "step_time_s", "tokens_per_s"):
            assert np.isfinite(x[key]), key
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert all(0 <= e["gsm8k_accuracy"] <= 1 for e in evals)
    for step in (0, 4, 8):
        result = json.loads((out / "eval" / f"gsm8k_step{step}.json").read_text())
        assert result["total"] == 2 and len(result["records"]) == 2 and result["step"] == step
        assert {"prompt", "output", "extracted", "expected", "correct"} <= set(result["records"][0])
    assert r.stdout.count("Q: ") == 2 and "step     0" in r.stdout and "step     8" in r.stdout
    # From a random start (ln 151936 = 11.93) a clear drop in 8 steps: at least 1 nat.
    assert evals[0]["eval_loss"] > 11.5
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0, evals
    assert (f"done: 8 steps; training loss {lines[-1]['loss']:.4g}; held-out loss {evals[0]['eval_loss']:.4g} (step 0)"
            f" -> {evals[-1]['eval_loss']:.4g} (step 8); GSM8K accuracy (flexible-extract) {evals[0]['gsm8k_accuracy']:.4g}"
            f" (step 0)") in r.stdout and "; strict-match " in r.stdout
    assert any((out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "8").exists()

    # The export loads in transformers and gives jaxsft's logits.
    import jax.numpy as jnp
    import torch
    import transformers as tf

    import jaxsft

    hf = tf.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(out / "hf")
    ids = np.array([tok("Natalia sold clips to 48 of her friends in April.")["input_ids"]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jaxsft.load_model(out / "hf", compute_dtype=jnp.float32)(jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.slow
def test_eval_cli_on_an_exported_model(tmp_path):
    """python -m jaxsft.eval: GSM8K accuracy of any model folder, written as JSON."""
    from tests.hf_models import make_hf_model

    make_hf_model("qwen2").save_pretrained(tmp_path / "model")
    eval_file = tmp_path / "test.jsonl"
    with open(os.path.join(REPO, "configs/assets/gsm8k/test.jsonl")) as f:
        eval_file.write_text("".join(f.readlines()[:3]))
    cmd = [sys.executable, "-m", "jaxsft.eval", "--config", "configs/demo.py",
           f"--config.model.path={tmp_path / 'model'}", "--config.model.init=pretrained",
           f"--config.data.tokenizer={REPO}/configs/assets/tiny-qwen2",
           f"--config.gsm8k.file={eval_file}", "--config.gsm8k.max_new_tokens=4",
           f"--config.train.output_dir={tmp_path / 'out'}"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "eval" / "gsm8k_step0.json").read_text())
    assert result["total"] == 3 and "GSM8K accuracy" in r.stdout
    # Four new tokens of a random model: whatever they are, they were generated and scored.
    assert all(r_["expected"] is not None for r_ in result["records"])
