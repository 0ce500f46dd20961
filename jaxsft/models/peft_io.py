"""Hugging Face PEFT LoRA adapters in and out, and merged exports.

An adapter folder is `adapter_config.json` plus `adapter_model.safetensors` whose keys are
`base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), `<module>` being
the transformers module name (`model.layers.3.self_attn.q_proj`, from `hf_io.WEIGHT_MAP`). Import
reads what PEFT writes (regex or list targets, layers_to_transform, rank_pattern, alpha_pattern,
rsLoRA); export writes an explicit target list that `PeftModel.from_pretrained` loads with no
missing or unexpected keys.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxsft import rundir
from jaxsft.models import nf4
from jaxsft.models.decoder import Decoder, layer_shapes
from jaxsft.models.hf_io import CheckpointError, _gather, local_dir, save_hf
from jaxsft.models.lora import (INPUT_AXES, Adapters, LoraSpec, Target, adapter_shapes, attach, make_spec,
                                merged_layer_weights, module_name, peft_name, select_targets)
from jaxsft.sharding import param_shardings

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def spec_from_peft_config(cfg: dict, num_layers: int, source: str = CONFIG_FILE) -> LoraSpec:
    """The LoraSpec of a PEFT adapter_config.json; refuses, by name, the variants jaxsft does not run."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{source}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    refused = {"use_dora": cfg.get("use_dora"), "modules_to_save": cfg.get("modules_to_save"),
               "lora_bias": cfg.get("lora_bias"), "target_parameters": cfg.get("target_parameters"),
               "trainable_token_indices": cfg.get("trainable_token_indices")}
    if cfg.get("bias", "none") != "none":
        refused["bias"] = cfg["bias"]
    if cfg.get("fan_in_fan_out"):
        refused["fan_in_fan_out"] = True
    if cfg.get("layers_pattern") not in (None, "", "layers", ["layers"]):
        refused["layers_pattern"] = cfg["layers_pattern"]
    used = {k: v for k, v in refused.items() if v}
    if used:
        raise CheckpointError(f"{source}: unsupported PEFT LoRA options {used} (jaxsft runs plain LoRA "
                              "on the decoder layers' projections: no DoRA, biases, modules_to_save)")
    layers = cfg.get("layers_to_transform")
    layers = () if layers is None else ((layers,) if isinstance(layers, int) else tuple(layers))
    target_modules = cfg.get("target_modules")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        layers = ()  # PEFT ignores layers_to_transform for a regex target
    try:
        selected = select_targets(target_modules, num_layers, layers)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    r, alpha = cfg["r"], cfg["lora_alpha"]
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    targets = []
    for name in INPUT_AXES:
        chosen = set(selected.get(name, ()))
        if not chosen:
            continue
        ranks, alphas = [], []
        for i in range(num_layers):
            module = module_name(name, i)
            ranks.append(_pattern_value(rank_pattern, module, r) if i in chosen else 0)
            alphas.append(float(_pattern_value(alpha_pattern, module, alpha)))
        targets.append(Target(name, tuple(ranks), tuple(alphas)))
    return LoraSpec(tuple(targets), bool(cfg.get("use_rslora", False)), float(cfg.get("lora_dropout", 0.0)))


def _pattern_value(pattern: dict, module: str, default):
    # PEFT's get_pattern_key: the first key that matches the end of the module name.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json as a dict, {key: array}) of a PEFT adapter folder (local or gs://)."""
    folder = local_dir(path)
    config_path, weights_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    for p in (config_path, weights_path):
        if not os.path.exists(p):
            raise CheckpointError(f"{path}: no {os.path.basename(p)}; is this a PEFT adapter folder?")
    with open(config_path) as f:
        cfg = json.load(f)
    with safe_open(weights_path, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return cfg, tensors


def load_adapter(model, path, mesh=None, rules=None):
    """Attach the PEFT LoRA adapter in folder `path` to `model` (a Decoder of its base model);
    the adapters are placed by the sharding rules. Returns the model."""
    cfg, tensors = read_adapter(path)
    c = model.config
    spec = spec_from_peft_config(cfg, c.num_layers, os.path.join(str(path), CONFIG_FILE))
    expected = {}
    for t in spec.targets:
        shapes = adapter_shapes(spec, c)[t.name]
        for i, rank in enumerate(t.ranks):
            if rank:
                key = PREFIX + module_name(t.name, i)
                expected[key + ".lora_A.weight"] = (rank, int(np.prod(shapes["a"][0][1:-1])))
                expected[key + ".lora_B.weight"] = (int(np.prod(shapes["b"][0][2:])), rank)
    problems = [f"missing: {k}" for k in expected if k not in tensors]
    problems += [f"unexpected: {k}" for k in tensors if k not in expected]
    problems += [f"{k}: shape {tensors[k].shape}, the base model and adapter_config.json imply {s}"
                 for k, s in expected.items() if k in tensors and tensors[k].shape != s]
    if problems:
        raise CheckpointError(f"{path}: the adapter does not fit this base model ({c.architecture}):\n  "
                              + "\n  ".join(problems[:20]))
    arrays = {}
    for t in spec.targets:
        shapes = adapter_shapes(spec, c)[t.name]
        a = np.zeros(shapes["a"][0], np.float32)
        b = np.zeros(shapes["b"][0], np.float32)
        for i, rank in enumerate(t.ranks):
            if rank:
                key = PREFIX + module_name(t.name, i)
                a[i, ..., :rank] = tensors[key + ".lora_A.weight"].astype(np.float32).T.reshape(a.shape[1:-1] + (rank,))
                b[i, :rank] = tensors[key + ".lora_B.weight"].astype(np.float32).T.reshape((rank,) + b.shape[2:])
        arrays[t.name] = {"a": a, "b": b}
    adapters = nnx.eval_shape(lambda: Adapters(spec, c, nnx.Rngs(0)))
    graphdef, state = nnx.split(adapters)
    shardings = nnx.to_pure_dict(param_shardings(state, mesh, rules))
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.device_put, arrays, shardings))
    model.lora = nnx.merge(graphdef, state)
    return model


def add_adapters(model, lora_section, seed: int = 0, mesh=None):
    """A run's adapters on `model`: read from `lora.adapter_path` (a PEFT folder), else fresh ones as
    the `lora` config section describes them. Returns the model."""
    if lora_section.adapter_path:
        return load_adapter(model, lora_section.adapter_path, mesh)
    return attach(model, make_spec(lora_section, model.config), seed, mesh)


def adapter_config(spec: LoraSpec, num_layers: int, base_model_name_or_path: str = "") -> dict:
    """PEFT's adapter_config.json for `spec`: the most common rank and alpha as `r` / `lora_alpha`,
    per-module exceptions in rank_pattern / alpha_pattern, the adapted layers in layers_to_transform."""
    adapted = {i for t in spec.targets for i, r in enumerate(t.ranks) if r}
    for t in spec.targets:
        if {i for i, r in enumerate(t.ranks) if r} != adapted:
            raise ValueError(f"{t.name}: PEFT's layers_to_transform needs the same layers for every target")
    pairs = [(t.ranks[i], t.alphas[i]) for t in spec.targets for i in sorted(adapted)]
    r, alpha = max(set(pairs), key=pairs.count)
    rank_pattern, alpha_pattern = {}, {}
    for t in spec.targets:
        for i in sorted(adapted):
            # An escaped full module name: PEFT matches pattern keys as regexes against its end.
            key = re.escape(module_name(t.name, i))
            if t.ranks[i] != r:
                rank_pattern[key] = t.ranks[i]
            if t.alphas[i] != alpha:
                alpha_pattern[key] = t.alphas[i]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora,
        "target_modules": [peft_name(t.name) for t in spec.targets],
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False, "modules_to_save": None,
        "inference_mode": True,
    }
    if len(adapted) < num_layers:
        config["layers_to_transform"] = sorted(adapted)
    return config


def save_adapter(model, out_dir, base_model_name_or_path: str = "") -> None:
    """Write `model`'s adapters as a PEFT adapter folder. Every process must call it (gathering
    shards is collective); only process 0 writes."""
    spec, c = model.lora.spec, model.config
    tensors = {}
    for t in spec.targets:
        adapter = getattr(model.lora, t.name)
        a, b = np.asarray(_gather(adapter.a[...])), np.asarray(_gather(adapter.b[...]))
        for i, rank in enumerate(t.ranks):
            if rank:
                key = PREFIX + module_name(t.name, i)
                tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a[i, ..., :rank].reshape(-1, rank).T)
                tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b[i, :rank].reshape(rank, -1).T)
    if jax.process_index() != 0:
        return
    with tempfile.TemporaryDirectory() as local:  # then copied to out_dir, local or gs://
        save_file(tensors, os.path.join(local, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(local, CONFIG_FILE), "w") as f:
            json.dump(adapter_config(spec, c.num_layers, base_model_name_or_path), f, indent=2)
        rundir.copy_folder(local, str(out_dir))


def merged(model):
    """A Decoder without adapters whose adapted kernels are W + scale * A B (merged in float32,
    stored in the base weights' dtype), as PEFT's merge_and_unload. An NF4 base is dequantized
    (to the embedding's dtype) first: the merged model is a full-precision one."""
    graphdef, state = nnx.split(model)
    # New Variables holding the same arrays: merging into `state` itself would write W + scale A B
    # into `model`'s base weights, and a second merge (a run's hf/ then GGUF export, or its GSM8K
    # evals) would add the adapters again.
    merged_model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    if model.config.base_quant:
        merged_model = dequantized(merged_model)
    for name, value in merged_layer_weights(merged_model).items():
        getattr(merged_model.layers, name)[...] = value
    merged_model.lora = None
    return merged_model


def dequantized(model):
    """A copy of a model with an NF4 base whose projections are full-precision Params in the
    embedding's dtype, sharded as a full-precision model's (its adapters are kept)."""
    c = model.config.replace(base_quant="")
    dtype = model.embed[...].dtype
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: Decoder(c, param_dtype=dtype, compute_dtype=model.compute_dtype)))
    placed = model.embed[...].sharding
    shardings = nnx.to_pure_dict(param_shardings(abstract, placed.mesh if isinstance(placed, NamedSharding) else None))
    old, new = nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(abstract)
    shapes = layer_shapes(c)
    for key in new:
        new[key] = old[key] if key != "layers" else {
            name: _stacked_kernel(old["layers"][name], shapes[name][0], dtype, shardings["layers"][name])
            if isinstance(old["layers"][name], dict) else old["layers"][name] for name in new["layers"]}
    nnx.replace_by_pure_dict(abstract, new)
    out = nnx.merge(graphdef, abstract)
    out.lora = model.lora
    return out


def _stacked_kernel(q, shape, dtype, sharding):
    def kernel(q):  # (layers, in, out) -> (layers, *in, *out)
        return nf4.dequantize(q, dtype).reshape(-1, *shape)
    return jax.jit(kernel, out_shardings=sharding)(q)


def save_merged(model, out_dir, tokenizer=None, dtype=jnp.bfloat16) -> None:
    """A Hugging Face model folder of the merged model (`save_hf` of `merged(model)`)."""
    save_hf(merged(model), out_dir, tokenizer=tokenizer, dtype=dtype)
