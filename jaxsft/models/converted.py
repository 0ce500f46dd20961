"""The converted-model format: a model made once by `python -m jaxsft.convert`, that later runs
read shard by shard straight onto their devices (no safetensors parsing or re-layout).

A converted model is a folder (local or gs://) with the params as an Orbax checkpoint in
`params/`, the model's config.json, generation_config.json and tokenizer files beside it, and the
marker file `jaxsft_checkpoint.json`, written last (it means: complete).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from jaxsft import rundir
from jaxsft.checkpoint import CheckpointCorrupt, CheckpointMismatch, flatten, unflatten
from jaxsft.models.config import ModelConfig
from jaxsft.models.decoder import Decoder
from jaxsft.models.hf_io import hf_config_dict, local_dir
from jaxsft.sharding import param_shardings

MARKER = "jaxsft_checkpoint.json"


def join(path, name) -> str:
    """`path/name` for a local or gs:// path (local paths made absolute, as Orbax wants them)."""
    path = str(path)
    return rundir.join(rundir.absolute(path), name)


def is_converted(path) -> bool:
    path = str(path)
    try:
        return bool(path) and (epath.Path(path) / MARKER).exists()
    except Exception:
        return False


def save_converted(model, tokenizer_dir: str | None, out: str, extra_files=()) -> None:
    """Write `model`'s params (an Orbax checkpoint in `out/params`), its config.json and the
    tokenizer files of `tokenizer_dir`, then the marker file last."""
    out_path = epath.Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    params = flatten(nnx.state(model, nnx.Param))
    dtype = next(iter(params.values())).dtype
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out_path / "params", params, force=True)
    if jax.process_index() != 0:
        return
    c = model.config
    (out_path / "config.json").write_text(json.dumps(hf_config_dict(c, dtype), indent=2))
    if c.hf_generation_config:
        (out_path / "generation_config.json").write_text(json.dumps(dict(c.hf_generation_config), indent=2))
    for f in extra_files:
        (out_path / os.path.basename(f)).write_bytes(epath.Path(f).read_bytes())
    (out_path / MARKER).write_text(json.dumps({"format": 1, "dtype": jnp.dtype(dtype).name}))


def restore_params(item_dir: str, config: ModelConfig, dtype, compute_dtype, mesh=None, rules=None) -> Decoder:
    """A Decoder for `config` whose params are read from an Orbax params item (a converted
    model's `params/` or a training checkpoint's `STEP/params`), each shard straight onto its
    device (any mesh), cast to `dtype`."""
    abstract_model = nnx.eval_shape(lambda: Decoder(config, param_dtype=dtype, compute_dtype=compute_dtype))
    graphdef, state = nnx.split(abstract_model)
    shardings = param_shardings(state, mesh, rules)
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)
              for (k, v), s in zip(flatten(state).items(), flatten(shardings).values())}
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(item_dir)
            stored = getattr(stored, "item_metadata", stored)
        except Exception as e:
            raise CheckpointCorrupt(f"{item_dir}: not a readable params checkpoint ({e})") from e
        problems = [f"missing: {k} {tuple(v.shape)}" for k, v in target.items() if k not in stored]
        problems += [f"{k}: checkpoint {tuple(stored[k].shape)}, config.json {tuple(v.shape)}"
                     for k, v in target.items() if k in stored and tuple(stored[k].shape) != v.shape]
        if problems:
            raise CheckpointMismatch(f"{item_dir} does not match its model config:\n  " + "\n  ".join(problems[:20]))
        # Orbax casts to the target dtype while reading.
        flat = ckptr.restore(item_dir, {k: target[k] for k in stored if k in target})
    return nnx.merge(graphdef, unflatten(state, flat))


def converted_config(path: str, **run_options) -> ModelConfig:
    """The ModelConfig of a converted model (config.json and generation_config.json)."""
    folder = local_dir(path)  # config.json and tokenizer files only; params are read in place
    config = ModelConfig.from_json_file(os.path.join(folder, "config.json"), **run_options)
    gen_path = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            config = config.replace(hf_generation_config=json.load(f))
    return config


def load_converted(path: str, dtype=jnp.float32, compute_dtype=jnp.bfloat16, mesh=None, rules=None,
                   **run_options) -> Decoder:
    """A converted model folder (local or gs://) -> a sharded Decoder."""
    return restore_params(join(path, "params"), converted_config(path, **run_options), dtype, compute_dtype,
                          mesh, rules)
