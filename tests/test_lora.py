"""LoRA against Hugging Face PEFT: import, export, merge and gradients agree with PEFT + torch."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model

import jaxsft
from jaxsft.models import lora, peft_io
from tests.hf_models import FAMILIES, make_hf_model

FAMILY_NAMES = [f for f in FAMILIES if f != "llama_tied_mqa"] + ["llama_tied_mqa"]
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
    model = jaxsft.load_model(base_dir, dtype=jnp.float32, compute_dtype=jnp.float32, remat="none")
    return model if adapter_dir is None else peft_io.load_adapter(model, adapter_dir)


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
