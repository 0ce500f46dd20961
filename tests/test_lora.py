"""LoRA against Hugging Face PEFT: import, export, merge and gradients agree with PEFT + torch."""

import json
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

import jaxsft
from jaxsft.checkpoint import Checkpointer, CheckpointMismatch, base_fingerprint, flatten
from jaxsft.models import Decoder, ModelConfig, lora, peft_io
from jaxsft.sharding import make_mesh, optimizer_shardings, param_shardings
from jaxsft.train import default_config
from jaxsft.train.optimizer import make_optimizer
from jaxsft.train.step import make_train_step
from tests.hf_models import FAMILIES, make_hf_model

FAMILY_NAMES = list(FAMILIES)
IDS = np.random.RandomState(0).randint(1, 160, (2, 12))


def hf_base(tmp_path, family):
    model = make_hf_model(family)
    model.save_pretrained(tmp_path / "base")
    return model


def randomize_b(peft_model, seed=1):
    # PEFT initialises B to zero; a random B makes the adapter change the logits.
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


def torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def jax_model(base_dir, adapter_dir=None):
    return jaxsft.load_model(base_dir, dtype=jnp.float32, compute_dtype=jnp.float32, remat="none",
                             lora_adapter=adapter_dir)


def jax_logits(model, ids=IDS):
    return np.asarray(model(jnp.asarray(ids)))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_peft_adapter_gives_peft_logits(tmp_path, family):
    """An adapter made by PEFT (random B, rsLoRA, a regex target, rank and alpha patterns) loaded
    into jaxsft gives PEFT's logits."""
    base = hf_base(tmp_path, family)
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, task_type="CAUSAL_LM",
        target_modules=r".*\.(q_proj|v_proj|o_proj|down_proj)",
        rank_pattern={"o_proj": 2, r"model\.layers\.1\.mlp\.down_proj": 6},
        alpha_pattern={"v_proj": 3})
    peft_model = get_peft_model(base, config)
    randomize_b(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert isinstance(saved["target_modules"], str)  # the regex travelled as a regex

    model = jax_model(tmp_path / "base", tmp_path / "adapter")
    ranks = {t.name: t.ranks for t in model.lora.spec.targets}
    assert ranks == {"q": (4, 4), "v": (4, 4), "o": (2, 2), "down": (4, 6)}
    expected = torch_logits(peft_model)
    with peft_model.disable_adapter():
        assert np.abs(expected - torch_logits(peft_model)).max() > 0.01  # 50x the tolerance
    np.testing.assert_allclose(jax_logits(model), expected, rtol=2e-4, atol=2e-4)

    # Written back out (patterns as escaped module names), PEFT reads the same adapter.
    peft_io.save_adapter(model, tmp_path / "again")
    again = PeftModel.from_pretrained(make_hf_model(family), tmp_path / "again")
    np.testing.assert_allclose(torch_logits(again), expected, rtol=1e-5, atol=1e-5)


def lora_config(**changes):
    c = default_config().lora
    c.update(r=4, alpha=8.0, **changes)
    return c


def lora_setup(model, mesh, lr_ratio=1.0, learning_rate=1e-2, dropout_seed=None):
    """A LoRA train step on `model` (which has adapters): params are the adapters alone."""
    graphdef, params, frozen = nnx.split(model, lora.LoraParam, nnx.Param)
    shardings, frozen_sharding = param_shardings(params, mesh), param_shardings(frozen, mesh)
    params, frozen = jax.device_put(params, shardings), jax.device_put(frozen, frozen_sharding)
    optim = default_config().optim
    optim.learning_rate = learning_rate
    tx, schedule = make_optimizer(optim, total_steps=10)
    tx = lora.lora_plus(tx, lr_ratio)
    opt_sharding = optimizer_shardings(tx, params, shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    fns = make_train_step(graphdef, tx, schedule, shardings, opt_sharding, batch_sharding,
                          frozen=frozen, frozen_sharding=frozen_sharding, dropout_seed=dropout_seed)
    return fns, graphdef, params, frozen, opt_state, batch_sharding


def lm_batch(ids=IDS, vocab=160):
    rows, seq = ids.shape
    mask = np.ones((rows, seq), np.float32)
    mask[:, :3] = 0  # a "prompt" without loss
    mask[:, -1] = 0
    return {"input_ids": ids.astype(np.int32), "targets": np.roll(ids, -1, axis=1).astype(np.int32) % vocab,
            "loss_mask": mask, "segment_ids": np.ones((rows, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()}


def train(fns, params, opt_state, batch, sharding, steps):
    losses = []
    for step in range(steps):
        acc = fns.zero_accumulator(params, jnp.int32(step))
        acc = fns.accumulate(acc, params, jax.device_put(batch, sharding))
        params, opt_state, _, metrics = fns.update(params, opt_state, acc, jnp.int32(batch["loss_mask"].sum()),
                                                jnp.int32(step))
        losses.append(float(metrics["loss"]))
    return params, opt_state, losses


def trained_adapter(tmp_path, family, steps=3, **changes):
    """A jaxsft model of the family with adapters trained for a few steps (B no longer zero)."""
    hf_base(tmp_path, family)
    model = jax_model(tmp_path / "base")
    lora.attach(model, lora.make_spec(lora_config(**changes), model.config), seed=0)
    mesh = make_mesh(devices=jax.devices()[:1])
    fns, graphdef, params, frozen, opt_state, sharding = lora_setup(model, mesh)
    params, _, losses = train(fns, params, opt_state, lm_batch(), sharding, steps)
    assert losses[-1] < losses[0]
    return nnx.merge(graphdef, params, frozen)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_jaxsft_adapter_loads_in_peft_with_the_same_logits(tmp_path, family):
    model = trained_adapter(tmp_path, family, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                            layers=[1], use_rslora=True)
    peft_io.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["q_proj", "o_proj", "up_proj", "down_proj"]
    assert saved["layers_to_transform"] == [1] and saved["use_rslora"] is True

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    result = peft_model.load_adapter(tmp_path / "adapter", adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert sum("lora_A.default" in n for n, _ in peft_model.named_parameters()) == 4  # layer 1 only
    expected = torch_logits(peft_model)
    with peft_model.disable_adapter():
        assert np.abs(expected - torch_logits(peft_model)).max() > 0.01
    np.testing.assert_allclose(jax_logits(model), expected, rtol=2e-4, atol=2e-4)


def test_merged_export_equals_peft_merge_and_unload(tmp_path):
    model = trained_adapter(tmp_path, "qwen3", target_modules="all-linear")
    peft_io.save_adapter(model, tmp_path / "adapter")
    peft_io.save_merged(model, tmp_path / "merged", dtype=jnp.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(torch_logits(ours), torch_logits(peft_merged), rtol=1e-5, atol=1e-5)
    assert model.lora is not None  # merging made a copy


def test_adapter_gradients_equal_peft(tmp_path):
    """One step's adapter gradients (the mean token loss) equal PEFT + torch's, rtol 1e-4."""
    base = hf_base(tmp_path, "mistral")
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "v_proj", "o_proj", "gate_proj"],
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    randomize_b(peft_model)  # with B = 0 the gradient of A would be zero
    peft_model.save_pretrained(tmp_path / "adapter")
    batch = lm_batch()
    logits = peft_model(torch.tensor(IDS)).logits
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, 160), torch.tensor(batch["targets"]).long().reshape(-1),
                                               reduction="none")
    mask = torch.tensor(batch["loss_mask"]).reshape(-1)
    ((losses * mask).sum() / mask.sum()).backward()
    expected = {n.replace(".default", ""): p.grad.numpy() for n, p in peft_model.named_parameters() if "lora_" in n}

    model = jax_model(tmp_path / "base", tmp_path / "adapter")
    mesh = make_mesh(devices=jax.devices()[:1])
    fns, graphdef, params, frozen, opt_state, sharding = lora_setup(model, mesh)
    acc = fns.accumulate(fns.zero_accumulator(params), params, jax.device_put(batch, sharding))
    grads = jax.tree.map(lambda g: g / batch["loss_mask"].sum(), acc["grads"])
    graded = nnx.merge(graphdef, grads, frozen)
    peft_io.save_adapter(graded, tmp_path / "grads")
    with safe_open(str(tmp_path / "grads" / "adapter_model.safetensors"), framework="numpy") as f:
        ours = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(ours) == sorted(expected)
    for k in expected:
        np.testing.assert_allclose(ours[k], expected[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_sharded_lora_training_equals_one_device_and_base_never_changes():
    """8 simulated devices (fsdp 4 x tensor 2) give one device's losses; base weights stay bit-identical."""
    c = ModelConfig(architecture="LlamaForCausalLM", vocab_size=160, hidden_size=64, intermediate_size=96,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, remat="full", attention="xla")
    ids = np.random.RandomState(1).randint(1, 160, (4, 12))
    results = {}
    for name, mesh in (("one", make_mesh(devices=jax.devices()[:1])), ("eight", make_mesh(fsdp=4, tensor=2))):
        model = Decoder(c, param_dtype=jnp.bfloat16, compute_dtype=jnp.float32, rngs=nnx.Rngs(0))
        lora.attach(model, lora.make_spec(lora_config(dropout=0.1), c), seed=0, mesh=mesh)
        fns, graphdef, params, frozen, opt_state, sharding = lora_setup(model, mesh, lr_ratio=4.0, dropout_seed=0)
        before = jax.tree.map(np.asarray, frozen)
        with jax.set_mesh(mesh):
            _, opt_state, results[name] = train(fns, params, opt_state, lm_batch(ids), sharding, steps=3)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), before)
        assert all("lora." in k or "count" in k for k in flatten(opt_state))  # adapters only
    np.testing.assert_allclose(results["eight"], results["one"], rtol=2e-5)
    assert results["one"][-1] < results["one"][0]


def test_targets_follow_peft_matching_and_errors_name_the_valid_modules():
    c = ModelConfig(architecture="LlamaForCausalLM", vocab_size=16, hidden_size=8, intermediate_size=16,
                    num_layers=3, num_heads=2, num_kv_heads=1, head_dim=4)
    names = lambda **kw: {t.name: t.ranks for t in lora.make_spec(lora_config(**kw), c).targets}  # noqa: E731
    assert set(names(target_modules="all-linear")) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert names(target_modules=["v_proj"], layers=[0, 2]) == {"v": (4, 0, 4)}
    assert names(target_modules=r"model\.layers\.[12]\.mlp\.(up|down)_proj") == {"up": (0, 4, 4), "down": (0, 4, 4)}
    with pytest.raises(ValueError, match="q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"):
        names(target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(ValueError, match="match no module"):
        names(target_modules=r".*attn\.c_attn")
    # A LoRA model has r * (in + out) trained parameters per adapted layer.
    assert lora.lora_param_count(c, lora_config(target_modules=["q_proj"], layers=[1])) == 4 * (8 + 8)


def test_unsupported_peft_variants_are_refused_by_name(tmp_path):
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    for extra, name in (({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias"),
                        ({"modules_to_save": ["lm_head"]}, "modules_to_save")):
        with pytest.raises(jaxsft.CheckpointError, match=name):
            peft_io.spec_from_peft_config({**cfg, **extra}, num_layers=2)
    with pytest.raises(jaxsft.CheckpointError, match="match no module"):
        peft_io.spec_from_peft_config({**cfg, "target_modules": ["lm_head"]}, num_layers=2)


@pytest.mark.slow
def test_lora_run_resumes_exactly(tmp_path):
    """Through the CLI (one device): checkpoints hold adapters only, a run SIGKILLed after a
    checkpoint and started again repeats the uninterrupted run's losses and final adapters exactly
    (dropout and LoRA+ on), and the run writes a PEFT adapter folder and a merged Hugging Face export."""
    from jaxsft.cli import DIVERGED
    from tests.test_checkpoint import ASSETS, ENV, REPO, cli, metrics, sigkill_after_checkpoint

    lora_flags = ("--config.lora.r=4", "--config.lora.alpha=8", "--config.lora.dropout=0.1",
                  "--config.lora.lr_ratio=4", "--config.optim.learning_rate=1e-2")

    def train(out, *extra):
        r = subprocess.run(cli(tmp_path, out, *lora_flags, *extra), cwd=REPO, env=ENV, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-3000:]

    whole, parted = tmp_path / "whole", tmp_path / "parted"
    # GSM8K eval before and after, as in a full fine-tuning run (generation from the adapted model).
    train(whole, "--config.train.export_hf=True", f"--config.gsm8k.file={os.path.join(ASSETS, 'gsm8k', 'test.jsonl')}",
          "--config.gsm8k.subset=2", "--config.gsm8k.max_new_tokens=4", "--config.gsm8k.batch_size=2",
          "--config.train.eval_at_start=True")
    config = json.loads((whole / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (whole / "hf" / "model.safetensors").exists()
    gsm8k = [json.loads(line) for line in open(whole / "eval.jsonl") if "gsm8k_accuracy" in line]
    assert [g["step"] for g in gsm8k] == [0, 4]
    for step in (0, 4):
        assert len(json.loads((whole / "eval" / f"gsm8k_step{step}.json").read_text())["records"]) == 2

    # SIGKILLed once its checkpoint 2 is complete, then the same command again.
    sigkill_after_checkpoint(cli(tmp_path, parted, *lora_flags), parted)
    with ocp.StandardCheckpointer() as ckpt:
        saved = ckpt.metadata(str(parted / "checkpoints" / "2" / "params"))
        saved = getattr(saved, "item_metadata", saved)
    assert sorted(saved) and all(k.startswith("lora.") for k in saved), sorted(saved)
    train(parted)
    assert [m["loss"] for m in metrics(parted)] == [m["loss"] for m in metrics(whole)]
    with safe_open(str(whole / "adapter" / "adapter_model.safetensors"), framework="numpy") as a, \
            safe_open(str(parted / "adapter" / "adapter_model.safetensors"), framework="numpy") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            np.testing.assert_array_equal(a.get_tensor(k), b.get_tensor(k), err_msg=k)  # bitwise

    # The health checks stop a LoRA run that diverges, as they stop a full fine-tuning one.
    r = subprocess.run(cli(tmp_path, tmp_path / "diverged", *lora_flags, "--config.optim.learning_rate=1e30",
                           "--config.checkpoint.every_steps=0"),
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == DIVERGED and r.stderr.strip().splitlines()[-1].startswith("training diverged: step "), \
        r.stderr[-3000:]


def test_checkpoint_of_another_base_model_is_refused(tmp_path):
    c = ModelConfig(architecture="LlamaForCausalLM", vocab_size=16, hidden_size=8, intermediate_size=16,
                    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4)
    mesh = make_mesh(devices=jax.devices()[:1])
    bases = {}
    for seed in (0, 1):
        model = lora.attach(Decoder(c, rngs=nnx.Rngs(seed)), lora.make_spec(lora_config(), c), mesh=mesh)
        _, params, bases[seed] = nnx.split(model, lora.LoraParam, nnx.Param)
    opt_state = optax.adam(1e-3).init(params)
    ckpt = Checkpointer(str(tmp_path), base_model=base_fingerprint(bases[0]))
    ckpt.save(1, params, opt_state, {"step": 1, "data": {}})
    ckpt.close()
    same = Checkpointer(str(tmp_path), base_model=base_fingerprint(bases[0]))
    assert same.restore(1, params, opt_state)[2]["step"] == 1
    assert base_fingerprint(bases[1]) != base_fingerprint(bases[0])
    with pytest.raises(CheckpointMismatch, match="another base model"):
        Checkpointer(str(tmp_path), base_model=base_fingerprint(bases[1])).restore(1, params, opt_state)


def small_qwen2_with_tokenizer(folder, seed=0):
    """A Hugging Face Qwen2 folder small enough for CLI runs, with the demo's tokenizer (so the
    152k vocabulary), random weights from `seed`."""
    import shutil

    from tests.test_checkpoint import ASSETS

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(f"{ASSETS}/tiny-qwen2/{f}", f"{folder}/{f}")
    return folder


@pytest.mark.slow
def test_export_of_a_lora_checkpoint_loads_in_peft_and_transformers(tmp_path):
    """`python -m jaxsft.export` on a LoRA run's (adapters-only) checkpoint writes the PEFT adapter
    and the merged model: PEFT and transformers give the checkpoint's logits; the adapter equals the
    one the run wrote itself; a base model with other weights is refused."""
    from jaxsft.export import find_params, lora_checkpoint_model, main as export_main
    from tests.test_checkpoint import ENV, REPO, cli

    base = small_qwen2_with_tokenizer(tmp_path / "base")
    run = tmp_path / "run"
    # float32 compute: the judges (PEFT, transformers) compute in float32.
    r = subprocess.run(cli(tmp_path, run, f"--config.model.path={base}", "--config.model.init=pretrained",
                           "--config.model.compute_dtype=float32",
                           "--config.train.num_steps=2", "--config.lora.r=4", "--config.lora.alpha=8",
                           r"--config.lora.target_modules=.*\.(q_proj|v_proj|down_proj)",
                           "--config.optim.learning_rate=2e-2"),
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    export_main(["--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--dtype", "float32"])
    adapter = tmp_path / "hf" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)

    def tensors(folder):
        with safe_open(str(folder / "adapter_model.safetensors"), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    ours, runs = tensors(adapter), tensors(run / "adapter")  # the run's own adapter/, written from memory
    assert sorted(ours) == sorted(runs) and len(ours) == 3 * 2 * 2
    for k in runs:
        np.testing.assert_array_equal(ours[k], runs[k], err_msg=k)

    params_dir, record = find_params(str(run))
    model, _ = lora_checkpoint_model(params_dir, record, make_mesh(devices=jax.devices()[:1]))
    ids = np.random.RandomState(0).randint(1, 151000, (2, 12))
    expected = jax_logits(model, ids)
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
    result = peft_model.load_adapter(adapter, adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    with peft_model.disable_adapter():
        assert np.abs(expected - torch_logits(peft_model, ids)).max() > 0.01  # the adapters changed the model
    np.testing.assert_allclose(torch_logits(peft_model, ids), expected, rtol=2e-4, atol=2e-4)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    np.testing.assert_allclose(torch_logits(merged, ids), expected, rtol=2e-4, atol=2e-4)

    shutil.copytree(base, tmp_path / "moved")
    small_qwen2_with_tokenizer(base, seed=1)  # the base model's folder now holds other weights
    with pytest.raises(SystemExit, match="not the one these adapters were trained on"):
        export_main(["--checkpoint", str(run), "--out", str(tmp_path / "again")])
    # --base names where the base model lives now.
    export_main(["--checkpoint", str(run), "--out", str(tmp_path / "again"), "--base", str(tmp_path / "moved")])
    assert json.loads((tmp_path / "again" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(tmp_path / "moved")
    moved = tensors(tmp_path / "again" / "adapter")
    for k in runs:
        np.testing.assert_array_equal(moved[k], runs[k], err_msg=k)
