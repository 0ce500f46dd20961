"""The train step: exact accumulation, sharding invariance, compile-once, schedules, CLI errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft.models import Decoder, ModelConfig
from jaxsft.sharding import make_mesh, optimizer_shardings, param_shardings
from jaxsft.train import default_config
from jaxsft.train.optimizer import decay_mask, make_optimizer, make_schedule
from jaxsft.train.step import compile_counts, make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=97, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, remat="full",
                     attention="xla")
SEQ = 32


def packed_rows(rows, rng):
    """Rows of 1-3 packed samples each, with some padding and loss masks."""
    batch = {k: np.zeros((rows, SEQ), np.int32) for k in ("input_ids", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = np.zeros((rows, SEQ), np.float32)
    for r in range(rows):
        start = 0
        for seg in range(1, rng.randint(1, 4) + 1):
            n = rng.randint(4, 11)
            if start + n > SEQ:
                break
            batch["input_ids"][r, start:start + n] = rng.randint(1, 97, n)
            batch["targets"][r, start:start + n] = rng.randint(1, 97, n)
            batch["segment_ids"][r, start:start + n] = seg
            batch["positions"][r, start:start + n] = np.arange(n)
            batch["loss_mask"][r, start + n // 2:start + n] = 1.0  # the "assistant" half
            start += n
    return batch


def optim_config(**changes):
    optim = default_config().optim
    optim.learning_rate = 1e-2
    optim.weight_decay = 0.1
    optim.update(changes)
    return optim


def setup(mesh, param_dtype=jnp.float32):
    model = Decoder(CONFIG, param_dtype=param_dtype, compute_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = param_shardings(params, mesh)
    params = jax.device_put(params, shardings)
    tx, schedule = make_optimizer(optim_config(), total_steps=10)
    opt_sharding = optimizer_shardings(tx, params, shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    fns = make_train_step(graphdef, tx, schedule, shardings, opt_sharding, batch_sharding)
    return fns, params, opt_state, batch_sharding


def train_step(fns, params, opt_state, microbatches, sharding, step=0):
    acc = fns.zero_accumulator(params)
    for mb in microbatches:
        acc = fns.accumulate(acc, params, jax.device_put(mb, sharding))
    loss_tokens = int(sum(mb["loss_mask"].sum() for mb in microbatches))
    params, opt_state, _, metrics = fns.update(params, opt_state, acc, jnp.int32(loss_tokens), jnp.int32(step))
    return params, opt_state, metrics


def split_rows(batch, k):
    return [{key: v[i::k] for key, v in batch.items()} for i in range(k)]


def test_accumulated_microbatches_equal_one_big_batch():
    mesh = make_mesh(devices=jax.devices()[:1])
    batch = packed_rows(8, np.random.RandomState(0))
    results = []
    for k in (1, 2, 8):
        fns, params, opt_state, sharding = setup(mesh)
        acc = fns.zero_accumulator(params)
        for mb in split_rows(batch, k):
            acc = fns.accumulate(acc, params, jax.device_put(mb, sharding))
        grads = jax.device_get(acc["grads"])
        params, _, _, metrics = fns.update(params, opt_state, acc, jnp.int32(batch["loss_mask"].sum()), 0)
        results.append((grads, jax.device_get(nnx.to_pure_dict(params)), jax.device_get(metrics)))
    (ref_grads, ref_params, ref_metrics), others = results[0], results[1:]
    for grads, params, metrics in others:
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
        np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        # Adam divides by |g|: where g is ~1e-8 rounding shows, so compare to 1e-3 of lr (1e-2).
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_loss_is_per_token_mean_over_the_whole_step():
    """Micro-batches with very different loss-token counts: the step loss is total/total, not a
    mean of micro-batch means."""
    mesh = make_mesh(devices=jax.devices()[:1])
    rng = np.random.RandomState(1)
    a, b = packed_rows(2, rng), packed_rows(2, rng)
    b["loss_mask"][:, :] = 0
    b["loss_mask"][0, 0] = 1  # one loss token
    fns, params, opt_state, sharding = setup(mesh)
    sums = [float(fns.eval_loss(params, jax.device_put(mb, sharding))[0]) for mb in (a, b)]
    _, _, metrics = train_step(fns, params, opt_state, [a, b], sharding)
    expected = sum(sums) / (a["loss_mask"].sum() + 1)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-6)


def test_8_devices_fsdp_and_tensor_give_the_same_losses_as_one():
    batches = [packed_rows(8, np.random.RandomState(s)) for s in range(3)]
    losses = {}
    for name, mesh in (("one", make_mesh(devices=jax.devices()[:1])),
                       ("eight", make_mesh(data=2, fsdp=2, tensor=2))):
        fns, params, opt_state, sharding = setup(mesh)
        if name == "eight":
            assert params["layers"]["q"][...].sharding.spec == P(None, "fsdp", "tensor", None)
            assert opt_state[1][0].mu["layers"]["q"][...].sharding.spec == P(None, "fsdp", "tensor", None)
        out = []
        with jax.set_mesh(mesh):
            for step, batch in enumerate(batches):
                params, opt_state, m = train_step(fns, params, opt_state, split_rows(batch, 2), sharding, step)
                out.append(float(m["loss"]))
        losses[name] = out
    # fp32 on CPU; reductions are ordered differently across shards.
    np.testing.assert_allclose(losses["eight"], losses["one"], rtol=2e-5)
    assert losses["one"][-1] < losses["one"][0]


def test_step_compiles_once_with_varying_microbatch_counts():
    mesh = make_mesh(devices=jax.devices()[:2], fsdp=2)
    fns, params, opt_state, sharding = setup(mesh)
    rng = np.random.RandomState(3)
    with jax.set_mesh(mesh):
        for step, k in enumerate((1, 3, 2, 5)):
            params, opt_state, _ = train_step(
                fns, params, opt_state, [packed_rows(2, rng) for _ in range(k)], sharding, step)
    assert compile_counts(fns) == {"zero_accumulator": 1, "accumulate": 1, "apply_update": 1,
                                   "clear_accumulator": 1, "eval_loss": 0}


def test_schedules():
    total = 100
    const = make_schedule(optim_config(learning_rate=2e-5), total)
    assert float(const(0)) == float(const(99)) == pytest.approx(2e-5)
    lin = make_schedule(optim_config(schedule="warmup_linear", warmup_fraction=0.1), total)
    assert float(lin(0)) == pytest.approx(1e-3)  # first of 10 warmup steps: lr / 10
    assert float(lin(9)) == pytest.approx(1e-2)
    assert float(lin(10)) == pytest.approx(1e-2)
    assert float(lin(55)) == pytest.approx(5e-3)
    assert float(lin(100)) == pytest.approx(0.0, abs=1e-9)
    cos = make_schedule(optim_config(schedule="warmup_cosine", warmup_steps=10, final_lr_fraction=0.1), total)
    assert float(cos(55)) == pytest.approx(0.55e-2, rel=1e-3)
    assert float(cos(100)) == pytest.approx(1e-3)
    wc = make_schedule(optim_config(schedule="warmup_constant", warmup_steps=4), total)
    assert [round(float(wc(i)), 6) for i in range(6)] == [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01]


def test_weight_decay_skips_norms_and_biases():
    model = Decoder(CONFIG.replace(qkv_bias=True, qk_norm=True), rngs=nnx.Rngs(0))
    mask = nnx.to_pure_dict(decay_mask(nnx.state(model, nnx.Param)))
    assert mask["embed"] and mask["lm_head"] and mask["layers"]["q"] and mask["layers"]["down"]
    assert not any(mask["layers"][k] for k in ("attn_norm", "mlp_norm", "q_norm", "k_norm", "q_bias", "v_bias"))
    assert not mask["final_norm"]


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "jaxsft.train", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "XLA_FLAGS": ""})


def test_cli_unknown_key_names_the_closest():
    r = run_cli("--config", "configs/demo.py", "--config.optim.learning_rat=1e-4")
    assert r.returncode != 0
    assert "unknown config key --config.optim.learning_rat; did you mean --config.optim.learning_rate" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bad_value_is_a_short_error():
    r = run_cli("--config", "configs/demo.py", "--config.optim.schedule=linear")
    assert r.returncode != 0 and "optim.schedule='linear': choose one of constant" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("--config", "configs/demo.py", "--config.train.num_steps=abc")
    assert r.returncode != 0 and "--config.train.num_steps=abc" in r.stderr and "Traceback" not in r.stderr


def test_every_config_field_is_documented():
    import jaxsft.train.config as module

    doc = module.__doc__
    c = default_config()
    for section in ("model", "optim", "train", "mesh", "checkpoint", "gsm8k", "lm_eval"):
        for key in c[section]:
            assert f"`{key}`" in doc, f"{section}.{key} is not documented in jaxsft/train/config.py"
    from jaxsft.data import config as data_config
    for key in c.data:
        assert f"`{key}`" in data_config.__doc__, f"data.{key} is not documented"


@pytest.mark.parametrize("name", ["llama3_2_3b", "llama3_1_8b", "mistral_7b", "qwen2_5_7b", "granite3_8b"])
def test_recipe_configs(name):
    from jaxsft.cli import load_config_file
    from jaxsft.train import validate

    paper = load_config_file(f"{REPO}/configs/{name}.py")
    tulu = load_config_file(f"{REPO}/configs/{name}.py:tulu")
    validate(paper)
    validate(tulu)
    assert paper.data.global_batch_size == 3840 and paper.optim.schedule == "constant"
    assert paper.optim.warmup_steps == 0 and paper.optim.warmup_fraction == 0 and paper.data.mode == "stacked"
    assert paper.optim.learning_rate == (1e-6 if name == "mistral_7b" else 2e-5)
    assert tulu.data.global_batch_size == 128 and tulu.optim.schedule == "warmup_linear"
    assert tulu.optim.warmup_fraction > 0
