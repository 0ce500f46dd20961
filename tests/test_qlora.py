"""QLoRA: NF4 base weights bit for bit as bitsandbytes, checkpoints saved 4-bit by transformers +
bitsandbytes, and a QLoRA run whose adapter PEFT loads on the bitsandbytes-quantized base."""

import json
import os
import shutil
import subprocess

import bitsandbytes as bnb
import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from jax.sharding import PartitionSpec as P
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.loftq_utils import replace_lora_weights_loftq
from safetensors import safe_open

import jaxsft
from jaxsft.data import DataPipeline
from jaxsft.models import CheckpointError, ConfigError, Decoder, ModelConfig, load_tokenizer, lora, nf4
from jaxsft.models.loading import quantized
from jaxsft.models.peft_io import save_adapter
from jaxsft.sharding import make_mesh
from jaxsft.train import default_config, validate
from jaxsft.train.build import run_model
from jaxsft.train.setup import setup
from tests.test_checkpoint import ASSETS, ENV, REPO, cli, metrics, sigkill_after_checkpoint

IDS = np.random.RandomState(0).randint(1, 5000, (2, 12))
BNB_NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
               bnb_4bit_compute_dtype=torch.float32)


@pytest.mark.parametrize("shape", [(64, 64), (96, 192), (1536, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_is_bitsandbytes_bit_for_bit(shape, dtype):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 0.02).to(dtype)
    w[0, 0] = 0.5  # an outlier block
    for double_quant in (False, True):
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        ours = nf4.quantize(w.float().numpy(), double_quant)  # stored transposed: (in // 2, out), (in // 64, out)
        np.testing.assert_array_equal(ours["packed"].T.reshape(-1), packed.numpy().reshape(-1))
        np.testing.assert_array_equal(ours["absmax"].T.reshape(-1), state.absmax.numpy())
        if double_quant:
            np.testing.assert_array_equal(ours["nested_absmax"], state.state2.absmax.numpy())
            np.testing.assert_array_equal(ours["offset"], state.offset.numpy())
            np.testing.assert_array_equal(ours["nested_code"], state.state2.code.numpy())
        expected = F.dequantize_4bit(packed, state).float().numpy()
        jax_dtype = jnp.float32 if dtype == torch.float32 else jnp.bfloat16
        got = nf4.dequantize({k: jnp.asarray(v) for k, v in ours.items()}, jax_dtype)  # the (in, out) kernel
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), expected.T)


def without_cpu_repacking(model):
    # bitsandbytes' CPU inference path repacks the weights into bf16 on machines with AVX512-BF16;
    # the reference is its dequantize-then-matmul path (what GPUs run), so switch the repacking off.
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def reference_logits(model, ids=IDS):
    with torch.no_grad():
        return without_cpu_repacking(model)(torch.tensor(ids)).logits.float().numpy()


def jax_logits(path, ids=IDS, **options):
    model = jaxsft.load_model(path, dtype=jnp.float32, compute_dtype=jnp.float32, remat="none", **options)
    return model, np.asarray(model(jnp.asarray(ids)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny random Qwen2 (the demo's shape and tokenizer) in full precision, and the same model
    saved 4-bit NF4 (double quantization) by transformers + bitsandbytes."""
    root = tmp_path_factory.mktemp("qlora")
    config = tf.AutoConfig.from_pretrained(os.path.join(ASSETS, "tiny-qwen2"))
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    for f in ("merges.txt", "vocab.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ASSETS, "tiny-qwen2", f), root / "base")
    quantized = tf.AutoModelForCausalLM.from_pretrained(
        root / "base", quantization_config=tf.BitsAndBytesConfig(**BNB_NF4), device_map="cpu")
    quantized.save_pretrained(root / "nf4")
    return root


def test_bnb_4bit_checkpoint_loads_as_nf4_with_transformers_logits(folders):
    expected = reference_logits(tf.AutoModelForCausalLM.from_pretrained(folders / "nf4", device_map="cpu"))
    model, got = jax_logits(folders / "nf4")
    assert isinstance(model.layers.q, nf4.NF4) and model.layers.q.packed[...].dtype == jnp.uint8
    np.testing.assert_allclose(got, expected, atol=2e-6)
    # Quantizing the full-precision folder at load gives the same bytes, so the same logits.
    quantized, got = jax_logits(folders / "base", base_quant="nf4")
    for key, value in model.layers.gate.arrays().items():
        np.testing.assert_array_equal(np.asarray(quantized.layers.gate.arrays()[key]), np.asarray(value), err_msg=key)
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert np.abs(got - jax_logits(folders / "base")[1]).max() > 1e-3  # NF4 moved them


@pytest.mark.parametrize("quantization,name", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "bitsandbytes 4-bit fp4"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes int8"),
    ({"quant_method": "gptq", "bits": 4}, "gptq"),
    ({"quant_method": "awq", "bits": 4}, "awq")])
def test_other_quantizations_are_refused_by_name(folders, tmp_path, quantization, name):
    shutil.copytree(folders / "nf4", tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    with pytest.raises(jaxsft.models.ConfigError, match=f"quantization {name}"):
        jaxsft.load_model(tmp_path / "q")


def rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


class OnCpu(torch.overrides.TorchFunctionMode):
    """PEFT's LoftQ moves its tensors to 'cuda' (or 'xpu'): keep them on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def cpu(x):
            return "cpu" if isinstance(x, str) and x in ("cuda", "xpu") else x
        return func(*map(cpu, args), **{k: cpu(v) for k, v in (kwargs or {}).items()})


@pytest.mark.slow
def test_loftq_init_is_peft_loftq_and_its_adapter_loads_in_peft(folders, tmp_path):
    """lora.init='loftq', on the model a run builds (`run_model`): scale * A B of every adapter is the
    rank-r SVD of the quantization residual that PEFT's replace_lora_weights_loftq puts on the
    bitsandbytes base (PEFT leaves the scale out: its B A is our scale * A B); the NF4 base plus the
    adapters is nearer the full-precision model than the NF4 base; their PEFT folder, on the
    bitsandbytes base, gives our logits. A 4-bit checkpoint or a base_quant='' run is refused."""
    config = default_config()
    config.model.update(path=str(folders / "base"), compute_dtype="float32", remat="none")
    config.lora.update(r=4, alpha=8.0, base_quant="nf4", init="loftq")
    model = run_model(config, make_mesh(devices=jax.devices()[:1]))

    peft = get_peft_model(without_cpu_repacking(tf.AutoModelForCausalLM.from_pretrained(
        folders / "base", quantization_config=tf.BitsAndBytesConfig(**BNB_NF4), device_map="cpu")),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with OnCpu():
        replace_lora_weights_loftq(peft, model_path=str(folders / "base"))
    worst = 0.0
    for t in model.lora.spec.targets:
        adapter, scale = getattr(model.lora, t.name), model.lora.spec.scales(t)
        for i in range(model.config.num_layers):
            module = peft.base_model.model.get_submodule(lora.module_name(t.name, i))
            expected = (module.lora_B["default"].weight @ module.lora_A["default"].weight).T.detach().numpy()
            a, b = np.asarray(adapter.a[i]), np.asarray(adapter.b[i])
            ours = scale[i] * a.reshape(-1, 4) @ b.reshape(4, -1)
            worst = max(worst, np.abs(ours - expected).max() / np.abs(expected).max())
    assert worst < 2e-4, worst  # torch's and LAPACK's float32 SVDs: 4.7e-5 of the largest entry when written

    ours = np.asarray(model(jnp.asarray(IDS)))
    full, nf4_only = jax_logits(folders / "base")[1], jax_logits(folders / "nf4")[1]
    # Rank 4 of this random model's 64-wide residuals: logits' RMS distance to full precision 0.0210,
    # the NF4 base's 0.0244 (when written).
    assert rms(ours - full) < 0.9 * rms(nf4_only - full), (rms(ours - full), rms(nf4_only - full))
    save_adapter(model, tmp_path / "adapter")
    bnb_base = tf.AutoModelForCausalLM.from_pretrained(
        folders / "base", quantization_config=tf.BitsAndBytesConfig(**BNB_NF4), device_map="cpu")
    np.testing.assert_allclose(reference_logits(PeftModel.from_pretrained(bnb_base, tmp_path / "adapter")), ours,
                               atol=2e-5)

    config.model.path = str(folders / "nf4")
    with pytest.raises(CheckpointError, match="LoftQ .* needs the full-precision weights"):
        run_model(config, make_mesh(devices=jax.devices()[:1]))
    config.lora.base_quant = ""
    with pytest.raises(ConfigError, match="lora.init='loftq'"):
        validate(config)


@pytest.mark.slow
def test_qlora_run_adapter_loads_in_peft_on_the_bnb_base(folders, tmp_path):
    """A QLoRA CLI run on the full-precision folder: its adapter, put by PEFT on the base quantized
    by transformers + bitsandbytes, gives jaxsft's logits; its merged export loads in transformers;
    llama.cpp applies its adapter.gguf on the base dequantized by bitsandbytes; a run SIGKILLed after a checkpoint resumes exactly. Full fine-tuning of a quantized base is refused."""
    flags = (f"--config.model.path={folders / 'base'}", "--config.model.init=pretrained",
             "--config.lora.r=4", "--config.lora.alpha=8", "--config.optim.learning_rate=2e-2")
    config = default_config()
    config.model.path, config.train.output_dir = str(folders / "nf4"), str(tmp_path / "refused")
    config.data.sources = [{"path": os.path.join(ASSETS, "gsm8k", "train.jsonl"), "format": "gsm8k"}]
    with pytest.raises(ConfigError, match="quantized to NF4"):  # exit status 2 in the CLI
        setup(config)
    config.model.path, config.lora.base_quant = str(folders / "base"), "nf4"
    with pytest.raises(ConfigError, match="lora.base_quant"):
        setup(config)

    run, killed = tmp_path / "run", tmp_path / "killed"
    r = subprocess.run(cli(tmp_path, run, *flags, "--config.lora.base_quant=nf4", "--config.train.export_hf=True",
                           "--config.train.export_dtype=float32", "--config.train.export_gguf=f32"),
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # SIGKILLed after checkpoint 2 and started again: the uninterrupted run's losses and adapter, bitwise.
    sigkill_after_checkpoint(cli(tmp_path, killed, *flags, "--config.lora.base_quant=nf4"), killed)
    r = subprocess.run(cli(tmp_path, killed, *flags, "--config.lora.base_quant=nf4"), cwd=REPO, env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["loss"] for m in metrics(killed)] == [m["loss"] for m in metrics(run)]
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), framework="numpy") as a, \
            safe_open(str(killed / "adapter" / "adapter_model.safetensors"), framework="numpy") as b:
        for k in a.keys():
            np.testing.assert_array_equal(a.get_tensor(k), b.get_tensor(k), err_msg=k)

    _, ours = jax_logits(folders / "base", base_quant="nf4", lora_adapter=run / "adapter")
    base = tf.AutoModelForCausalLM.from_pretrained(
        folders / "base", quantization_config=tf.BitsAndBytesConfig(**BNB_NF4), device_map="cpu")
    peft = PeftModel.from_pretrained(base, run / "adapter")
    np.testing.assert_allclose(reference_logits(peft), ours, atol=2e-5)
    assert np.abs(ours - jax_logits(folders / "nf4")[1]).max() > 1e-3  # the adapter moved them
    merged = tf.AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(IDS)).logits.numpy(), ours, atol=2e-5)

    # llama.cpp applies the run's adapter.gguf on the base dequantized by bitsandbytes: our logits
    # (<= 1e-4 relative) and PEFT's greedy tokens.
    from jaxsft.models.gguf_export import save_gguf
    from tests.test_export_consumers import llama, llama_greedy, llama_logits, rel_err, torch_run

    dequantized = tf.AutoModelForCausalLM.from_pretrained(folders / "base", dtype=torch.float32)
    with torch.no_grad():
        for name, module in tf.AutoModelForCausalLM.from_pretrained(folders / "nf4", device_map="cpu").named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
                dequantized.get_submodule(name).weight.copy_(weight)
    dequantized.save_pretrained(tmp_path / "dequantized")
    tokenizer = tf.AutoTokenizer.from_pretrained(folders / "base")
    save_gguf(jaxsft.load_model(tmp_path / "dequantized", dtype=jnp.float32), str(tmp_path / "base.gguf"),
              tokenizer, "f32")
    llm = llama(tmp_path / "base.gguf", lora_path=str(run / "adapter.gguf"))
    for row, expected in zip(IDS.tolist(), ours):
        assert rel_err(llama_logits(llm, row), expected) <= 1e-4
        assert llama_greedy(llm, row, 8) == torch_run(peft, row)[1]


def peft_loss_sum(model, microbatch):
    """PEFT's summed token loss over a packed jaxsft micro-batch: each packed sample is run alone."""
    total = 0.0
    for row in range(len(microbatch["input_ids"])):
        segments = microbatch["segment_ids"][row]
        for segment in np.unique(segments[segments > 0]):
            at = segments == segment
            np.testing.assert_array_equal(microbatch["positions"][row][at], np.arange(at.sum()))
            with torch.no_grad():
                logits = model(torch.tensor(microbatch["input_ids"][row][at][None])).logits[0].double()
            losses = torch.nn.functional.cross_entropy(
                logits, torch.tensor(microbatch["targets"][row][at]).long(), reduction="none")
            total += float((losses * torch.tensor(microbatch["loss_mask"][row][at]).double()).sum())
    return total


@pytest.mark.slow
def test_peft_qlora_adapter_continues_training_here(folders, tmp_path):
    """An adapter trained by PEFT QLoRA (torch, on the bitsandbytes 4-bit folder) continues training
    in a CLI run on the same folder, loaded as NF4: the first step's loss is PEFT's loss on that
    step's batch, and the next steps lower it."""
    peft = get_peft_model(without_cpu_repacking(tf.AutoModelForCausalLM.from_pretrained(folders / "nf4", device_map="cpu")),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    adam = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        peft(torch.tensor(IDS), labels=torch.tensor(IDS)).loss.backward()
        adam.step()
        adam.zero_grad()
    peft.save_pretrained(tmp_path / "adapter")
    peft.eval()

    with open(os.path.join(ASSETS, "gsm8k", "train.jsonl")) as f:  # 4 problems, 4 a step: the same every step
        (tmp_path / "train.jsonl").write_text("".join(f.readlines()[:4]))
    run = tmp_path / "run"
    r = subprocess.run(cli(tmp_path, run, f"--config.model.path={folders / 'nf4'}", "--config.model.init=pretrained",
                           f"--config.data.tokenizer={folders / 'base'}", f"--config.lora.adapter_path={tmp_path / 'adapter'}",
                           "--config.model.compute_dtype=float32", "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
                           "--config.optim.learning_rate=5e-3"), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # The run's first batch, from its recorded config (one device, as it ran).
    config = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
    first = next(DataPipeline(config.data, load_tokenizer(config.data.tokenizer)))
    expected = sum(peft_loss_sum(peft, mb) for mb in first.microbatches) / first.num_loss_tokens
    with peft.disable_adapter():
        base = sum(peft_loss_sum(peft, mb) for mb in first.microbatches) / first.num_loss_tokens
    losses = [m["loss"] for m in metrics(run)]
    # PEFT's training moved the loss by 5.7e-3 (11.9283 -> 11.9226), ~500x the tolerance below; the
    # first step repeated it to 2e-8 and the next three lowered it to 11.736 (when written).
    assert abs(expected - base) > 1e-3, (expected, base)
    np.testing.assert_allclose(losses[0], expected, rtol=1e-6)
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_sharded_qlora_training_equals_one_device_and_nf4_base_never_changes():
    """8 simulated devices (fsdp 4 x tensor 2: the packed bytes sharded like their matrices) give
    one device's losses; the NF4 base stays bit-identical."""
    from tests.test_lora import lm_batch, lora_config, lora_setup, train

    c = ModelConfig(architecture="LlamaForCausalLM", vocab_size=160, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, remat="full", attention="xla")
    ids = np.random.RandomState(1).randint(1, 160, (4, 12))
    results = {}
    for name, mesh in (("one", make_mesh(devices=jax.devices()[:1])), ("eight", make_mesh(fsdp=4, tensor=2))):
        model = quantized(Decoder(c, param_dtype=jnp.float32, compute_dtype=jnp.float32, rngs=nnx.Rngs(0)), mesh)
        assert model.layers.up.packed[...].dtype == jnp.uint8
        lora.attach(model, lora.make_spec(lora_config(), c), seed=0, mesh=mesh)
        fns, graphdef, params, frozen, opt_state, sharding = lora_setup(model, mesh)
        if name == "eight":
            assert model.layers.q.packed[...].sharding.spec == P(None, "fsdp", "tensor")
        before = jax.tree.map(np.asarray, frozen)
        with jax.set_mesh(mesh):
            _, _, results[name] = train(fns, params, opt_state, lm_batch(ids), sharding, steps=3)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), before)
    np.testing.assert_allclose(results["eight"], results["one"], rtol=2e-5)
    assert results["one"][-1] < results["one"][0]
