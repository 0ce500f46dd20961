"""python -m jaxsft.export --checkpoint PATH --out HF_DIR [--dtype bfloat16]

Writes a Hugging Face model folder (safetensors, config.json, tokenizer) from any jaxsft
checkpoint: a converted model (`python -m jaxsft.convert`), a training run's checkpoint step
(`RUN/checkpoints/8`), its checkpoint directory (the newest step) or the run directory itself.
The model's config.json and tokenizer come from the checkpoint's own folder (converted) or from
the run's `model.path` / `data.tokenizer` (training checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import jax.numpy as jnp

from jaxsft.checkpoint import find_params, restore_params
from jaxsft.models import ModelConfig
from jaxsft.models.hf_io import local_dir, save_hf
from jaxsft.sharding import make_mesh


def export(checkpoint: str, out: str, dtype: str = "bfloat16") -> None:
    from transformers import AutoTokenizer

    params_dir, record = find_params(checkpoint)
    if record is None:  # a converted model: config.json and tokenizer beside the params
        model_dir = tokenizer_dir = checkpoint
    else:
        model = record.get("config", {}).get("model", {})
        model_dir = model.get("path")
        tokenizer_dir = record["config"].get("data", {}).get("tokenizer") or model_dir
        if not model_dir or model_dir.endswith(".gguf"):
            raise ValueError(f"{checkpoint}: its run's model.path ({model_dir!r}) has no config.json to "
                             "describe the model; export needs the folder it was trained from")
    folder = local_dir(model_dir)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: the checkpoint's model folder is needed for its config")
    config = ModelConfig.from_json_file(config_path)
    gen_path = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            config = config.replace(hf_generation_config=json.load(f))
    # Read in float32 and cast per tensor while writing; sharded over all devices.
    model = restore_params(params_dir, config, jnp.float32, jnp.float32, mesh=make_mesh())
    save_hf(model, out, tokenizer=AutoTokenizer.from_pretrained(local_dir(tokenizer_dir)), dtype=jnp.dtype(dtype))


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m jaxsft.export", description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="converted model, checkpoint step, checkpoint or run directory")
    p.add_argument("--out", required=True, help="Hugging Face folder to write, local or gs://")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    a = p.parse_args(argv)
    try:
        export(a.checkpoint, a.out, a.dtype)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
