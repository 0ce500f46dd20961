"""python -m jaxsft.export --checkpoint PATH [--out HF_DIR] [--dtype bfloat16] [--adapter-out DIR] [--base MODEL]
       [--gguf FILE.gguf --gguf-type f32|f16|bf16|q8_0] [--gguf-adapter FILE.gguf]

Writes a Hugging Face model folder (safetensors, config.json, tokenizer) from any jaxsft
checkpoint: a converted model (`python -m jaxsft.convert`), a training run's checkpoint step
(`RUN/checkpoints/8`), its checkpoint directory (the newest step) or the run directory itself;
local or gs://, and so is the output. A training checkpoint describes itself (the model's config
and generation config in its record, which also names the run's copy of the tokenizer,
`RUN/tokenizer`), so the model it was trained from is not needed.

A LoRA run's checkpoint holds only the adapters: its base model is read from the run's
`model.path` (named by the record), or from `--base` where it has moved, and checked against the
base fingerprint recorded there. Then
`--out` gets the merged model (W + scale A B in float32, then cast to `--dtype`), as the run's
`hf/` export, and `--adapter-out` (default `HF_DIR/adapter`) the PEFT adapter folder, as the run's
`adapter/`.

`--gguf` writes the model (a LoRA run's merged model) as one GGUF file that llama.cpp and Ollama
run as it is, `--gguf-adapter` a LoRA run's adapters as a llama.cpp LoRA adapter
(`jaxsft/models/gguf_export.py`). A family, tokenizer or type llama.cpp does not run is refused
before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from jaxsft import rundir
from jaxsft.checkpoint import CheckpointMismatch, abstract, base_fingerprint, unflatten
from jaxsft.model_card import model_card
from jaxsft.models import ModelConfig, load_tokenizer, peft_io
from jaxsft.models.converted import MARKER, converted_config, join, restore_params
from jaxsft.models import gguf_export
from jaxsft.models.hf_io import save_hf
from jaxsft.sharding import make_mesh
from jaxsft.train.snapshot import read_masters, saved_offloaded


def find_params(path: str) -> tuple[str, dict | None]:
    """Where the params of `path` are, and the training record if it is a training checkpoint.
    `path`: a converted model, a step directory (`.../checkpoints/8`), a checkpoint directory
    (its newest step) or a run directory (its `checkpoints/`)."""
    p = epath.Path(path)
    if (p / MARKER).exists():
        return join(path, "params"), None
    if (p / "checkpoints").exists() and not (p / "params").exists():
        return find_params(join(path, "checkpoints"))
    if (p / "params").exists() and (p / "record").exists():
        step_dir = str(path)
    else:
        steps = sorted(int(d.name) for d in p.iterdir() if d.name.isdigit() and (d / "record").exists()) \
            if p.exists() else []
        if not steps:
            raise FileNotFoundError(
                f"{path}: not a converted model ({MARKER}), a training checkpoint step, or a directory of them")
        step_dir = join(path, str(steps[-1]))
    record_file = epath.Path(join(step_dir, "record")) / "metadata"
    return join(step_dir, "params"), json.loads(record_file.read_text()) if record_file.exists() else None


def training_checkpoint_model(params_dir: str, record: dict) -> tuple[ModelConfig, str]:
    """The model config and tokenizer folder of a training checkpoint, from the checkpoint itself."""
    if "model_config" not in record:
        raise ValueError(f"{params_dir}: this checkpoint predates self-describing checkpoints (no model "
                         "config in its record); export it with the jaxsft version that wrote it")
    config = ModelConfig.from_hf(record["model_config"], source=f"{params_dir}/../record")
    config = config.replace(hf_generation_config=record.get("generation_config") or {})
    return config, record["tokenizer_dir"]


def lora_checkpoint_model(params_dir: str, record: dict, mesh, base: str | None = None):
    """A LoRA checkpoint's model: the run's base model (`base`, default `model.path` in the record's
    config; refused unless it has the recorded fingerprint) with the checkpoint's adapters, and the
    base model's path. The base is built and given adapters exactly as the run's setup does."""
    from jaxsft.train.build import run_model, split

    run_config = ml_collections.ConfigDict(record["config"])
    m = run_config.model
    if base:
        m.path = base
    run_config.lora.base_quant = run_config.lora.get("base_quant", "")  # absent from older checkpoints
    # The checkpoint's adapters replace fresh ones: no LoftQ SVDs (its one iteration leaves the base as is).
    run_config.lora.init = "default"
    graphdef, adapters, frozen = split(run_model(run_config, mesh), lora_run=True)
    if base_fingerprint(frozen) != record["base_model"]:
        raise CheckpointMismatch(
            f"{params_dir}: the base model at model.path={m.path!r} (init={m.init!r}) is not the one these "
            "adapters were trained on (its weights' fingerprint differs from the checkpoint's)")
    with ocp.StandardCheckpointer() as ckptr:
        trained = unflatten(adapters, ckptr.restore(params_dir, abstract(adapters)))
    # Merged in float32 whatever the run's base dtype (NF4 bytes dequantize to it); cast to --dtype while writing.
    frozen = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
    return nnx.merge(graphdef, trained, frozen), m.path


def export(checkpoint: str, out: str | None = None, dtype: str = "bfloat16", adapter_out: str | None = None,
           base: str | None = None, gguf: str | None = None, gguf_type: str = "bf16",
           gguf_adapter: str | None = None) -> None:
    params_dir, record = find_params(checkpoint)
    is_lora = record is not None and "base_model" in record
    if (adapter_out or base or gguf_adapter) and not is_lora:
        raise ValueError(f"{checkpoint}: --adapter-out, --gguf-adapter and --base are for LoRA checkpoints; "
                         "this one holds a whole model")
    if adapter_out and not out:
        raise ValueError("--adapter-out goes with --out")
    if record is None:  # a converted model: config.json and tokenizer beside the params
        config, tokenizer_dir = converted_config(checkpoint), checkpoint
    else:
        config, tokenizer_dir = training_checkpoint_model(params_dir, record)
    if gguf or gguf_adapter:  # refused before anything is written
        gguf_export.check_supported(config, gguf_type, load_tokenizer(tokenizer_dir) if gguf else None)
    mesh = make_mesh()  # sharded over all devices
    name = rundir.run_name(record["config"]["train"]["output_dir"]) if record is not None else None
    if is_lora:
        model, base_path = lora_checkpoint_model(params_dir, record, mesh, base)
        if out:
            peft_io.save_adapter(model, adapter_out or join(out, "adapter"), base_model_name_or_path=base_path)
        if gguf_adapter:
            gguf_export.save_gguf_adapter(model, gguf_adapter, name=name)
        model = peft_io.merged(model)
    else:  # read in float32 and cast per tensor while writing
        model = restore_params(params_dir, config, jnp.float32, jnp.float32, mesh=mesh)
        checkpoint_dir = str(epath.Path(params_dir).parent.parent)
        if record is not None and jnp.dtype(dtype) == jnp.float32 and saved_offloaded(checkpoint_dir, record["step"]):
            # An offloaded run's checkpoint holds its compute copy; its float32 masters are in the snapshot.
            graphdef, params = nnx.split(model, nnx.Param)
            model = nnx.merge(graphdef, read_masters(checkpoint_dir, record["step"], params))
    tokenizer = load_tokenizer(tokenizer_dir)
    if out:
        card = {}
        if record is not None:  # named after the run, with its model card
            card = dict(name=name, model_card=model_card(record["config"], name, {"steps": record["step"]}))
        save_hf(model, out, tokenizer=tokenizer, dtype=jnp.dtype(dtype), **card)
    if gguf:
        gguf_export.save_gguf(model, gguf, tokenizer, gguf_type, name=name)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m jaxsft.export", description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True, help="converted model, checkpoint step, checkpoint or run directory")
    p.add_argument("--out", help="Hugging Face folder to write, local or gs://")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--adapter-out", help="LoRA checkpoints: the PEFT adapter folder to write (default: OUT/adapter)")
    p.add_argument("--base", help="LoRA checkpoints: the base model (default: the run's model.path), e.g. "
                   "where it lives now; it must be the one the adapters were trained on")
    p.add_argument("--gguf", help="GGUF file to write (llama.cpp, Ollama), local or gs://; a LoRA run's merged model")
    p.add_argument("--gguf-type", default="bf16", help=f"GGUF tensor type: {', '.join(gguf_export.TYPES)}")
    p.add_argument("--gguf-adapter", help="LoRA checkpoints: the adapters as a llama.cpp LoRA GGUF file")
    a = p.parse_args(argv)
    if not (a.out or a.gguf or a.gguf_adapter):
        p.error("give --out, --gguf or --gguf-adapter")
    try:
        export(a.checkpoint, a.out, a.dtype, a.adapter_out, a.base, a.gguf, a.gguf_type, a.gguf_adapter)
    except gguf_export.UnsupportedForGGUF as e:  # a usage mistake: exit status 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {', '.join(p for p in (a.out, a.gguf, a.gguf_adapter) if p)}")


if __name__ == "__main__":
    main()
