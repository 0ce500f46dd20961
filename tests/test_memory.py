"""The memory estimator's arithmetic, and the optimizer-offload code path on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft import memory
from jaxsft.models import ModelConfig
from jaxsft.sharding import make_mesh
from jaxsft.train import default_config
from tests.test_train import packed_rows, setup, train_step

LLAMA_8B = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
LLAMA_1B = LLAMA_8B.replace(hidden_size=2048, intermediate_size=8192, num_layers=16, head_dim=64,
                            tie_word_embeddings=True)
GiB = 2**30


def test_parameter_counts_match_the_published_models():
    assert memory.parameter_count(LLAMA_8B)[0] == 8_030_261_248
    assert memory.parameter_count(LLAMA_1B)[0] == 1_235_814_400


def run_config(**optim):
    c = default_config()  # mesh.fsdp = -1: every device shards the state
    c.data.max_seq_len = 4096
    c.data.micro_batch_rows = 1
    c.optim.update(optim)
    return c


def test_8b_on_one_80gb_gpu_needs_offload_and_says_so():
    n = 8_030_261_248
    est = memory.estimate(run_config(), LLAMA_8B, num_devices=1, devices_per_host=1)
    assert est.device["params"] == n * 4 and est.device["grads"] == n * 4
    assert est.device["optimizer"] == n * 8
    assert est.device["activations"] == 32 * 4096 * 4096 * 2  # full remat keeps each layer's input
    assert est.device["logits"] == 512 * 128256 * 4 * 3  # 512 positions keep a chunk under 256 MiB
    fits, text = memory.report(est, 80 * GiB, 128 * GiB)
    assert not fits and "largest part: optimizer" in text and "optim.offload_state=True" in text

    offloaded = memory.estimate(run_config(offload_state=True), LLAMA_8B, 1, 1)
    assert offloaded.host["optimizer"] == n * 8
    assert offloaded.device["optimizer"] == n * 4  # one moment streamed through at a time
    assert offloaded.device_total < est.device_total - n * 3.9


def test_fsdp_divides_the_state():
    one = memory.estimate(run_config(), LLAMA_8B, 1, 1)
    eight = memory.estimate(run_config(), LLAMA_8B, 8, 8)
    for part in ("params", "grads", "optimizer"):
        assert eight.device[part] == one.device[part] / 8


def test_offloaded_optimizer_state_lives_on_host_and_trains_the_same():
    mesh = make_mesh(devices=jax.devices()[:1])
    batch = [packed_rows(4, np.random.RandomState(0))]
    results = {}
    for offload in (False, True):
        fns, params, opt_state, sharding = setup(mesh, offload=offload)
        if offload:
            kinds = {x.sharding.memory_kind for x in jax.tree.leaves(opt_state) if x.ndim > 0}
            assert kinds == {"pinned_host"}
        params, opt_state, metrics = train_step(fns, params, opt_state, batch, sharding)
        if offload:
            kinds = {x.sharding.memory_kind for x in jax.tree.leaves(opt_state) if x.ndim > 0}
            assert kinds == {"pinned_host"}
        results[offload] = (jax.device_get(nnx.to_pure_dict(params)), float(metrics["loss"]))
    assert results[True][1] == results[False][1]
    for a, b in zip(jax.tree.leaves(results[True][0]), jax.tree.leaves(results[False][0])):
        np.testing.assert_array_equal(a, b)


def test_memory_cli_says_what_to_change(tmp_path):
    import os
    import subprocess
    import sys

    import transformers as tf

    tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8,
                   architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "jaxsft.memory", "--config", f"{repo}/configs/llama3_1_8b.py",
           f"--config.model.path={tmp_path}", "--config.mesh.fsdp=1", "--device-gib", "80",
           "--host-gib", "128"]
    env = {**os.environ, "XLA_FLAGS": ""}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 1, r.stderr
    assert "does NOT fit" in r.stdout and "optim.offload_state=True" in r.stdout
    r = subprocess.run(cmd + ["--config.optim.offload_state=true", "--config.model.param_dtype=bfloat16"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fits" in r.stdout and "offloaded" in r.stdout


def test_loss_chunks_keep_logits_under_256mib_per_device():
    from jaxsft.train.loss import loss_chunk

    assert loss_chunk(1, 4096, 128256, devices=1) == 512  # 512 x 128256 x 4 B = 251 MiB
    assert loss_chunk(16, 512, 151936, devices=8) == 128  # 8 simulated CPU devices, demo shapes
    assert loss_chunk(2, 64, 160, devices=1) == 64  # small logits: one chunk
    assert loss_chunk(64, 37, 128256, devices=1) == 5  # odd lengths: 37 -> 19 -> 10 -> 5, padded to 40
