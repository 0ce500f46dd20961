"""The memory plan compiled by XLA's TPU compiler on a machine without a TPU (libtpu's compile-only
client, from the `jax[tpu]` extra): the figures of the accelerator, not of XLA:CPU, which converts
every bf16 weight stack to float32 before its matmuls (CPU has no bf16 matmul)."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft import memory
from jaxsft.sharding import make_mesh
from tests.test_memory import REPO

GiB = 2**30


def write_llama_8b_config(path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                architectures=["LlamaForCausalLM"]).save_pretrained(path)


@pytest.mark.slow
def test_an_8b_lora_run_is_planned_under_40_gb_on_one_tpu_chip(tmp_path):
    write_llama_8b_config(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "jaxsft.memory", "--tpu", "v5p:1x1x1", "--device-gib", "40",
         "--config", "configs/llama3_1_8b.py", f"--config.model.path={tmp_path}", "--config.mesh.fsdp=1",
         "--config.data.micro_batch_rows=1", "--config.data.max_seq_len=4096", "--config.lora.r=16",
         "--config.model.param_dtype=bfloat16",
         "--config.model.remat=full"],  # the figures below are full remat's (the recipe's default is 'auto')
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "compiled for TPU v5p:1x1x1 (1 x TPU v5)" in out.stdout
    assert "device memory 40.0 GiB: fits" in out.stdout
    peak = float(re.search(r"peak per device ([\d.]+) GiB", out.stdout)[1])
    arguments = float(re.search(r"accumulate +peak +[\d.]+ GiB +\(arguments ([\d.]+)", out.stdout)[1])
    base = 2 * memory.parameter_count(memory.ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128))[0] / GiB  # bf16 base: 14.96 GiB
    # The arguments are the frozen bf16 base plus float32 adapters and their gradient accumulator
    # (r=16 on all 7 projections of 32 layers: 42M parameters, 0.31 GiB) and one 4096-token row.
    assert base < arguments < base + 0.4
    # Measured: 21.27 GiB (XLA:CPU's compile of the same program: 53.87 GiB).
    assert arguments < peak < 0.9 * 40


def test_a_program_larger_than_the_chip_is_reported_as_refused_with_its_size():
    mesh = make_mesh(fsdp=1, devices=memory.tpu_devices("v5e:1x1"))  # a 16 GiB chip
    x = jax.ShapeDtypeStruct((65536, 65536), jnp.float32, sharding=NamedSharding(mesh, P()))
    lowered = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x)).lower(x)
    stats = memory._stats(lowered, resident=GiB)
    assert stats["refused"]
    # sin(x) and cos(x) are 16 GiB each, before the 16 GiB product.
    assert 32 * GiB <= stats["temp"] <= 48.1 * GiB
    assert stats["peak"] == stats["temp"] + GiB
