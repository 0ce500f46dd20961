"""Every model source, one dispatcher: a model and the tokenizer that goes with it.

A source (`model.path`, `--checkpoint`, `--from`) is one of:
- a Hugging Face model folder, local or gs:// (`jaxsft.models.hf_io`);
- a `.gguf` file, or a folder holding one and no config.json (`jaxsft.models.gguf`);
- a converted jaxsft checkpoint made by `python -m jaxsft.convert` (`jaxsft.models.converted`);
- a Hugging Face Hub id (`owner/name`), downloaded once into the HF cache (`jaxsft.hub`).
Train, eval, the data preview, export, convert and generate all load through here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.hub import resolve_model_path
from jaxsft.models import converted, gguf, hf_io, peft_io
from jaxsft.models.config import ModelConfig
from jaxsft.models.decoder import Decoder
from jaxsft.sharding import param_shardings


def load_model(path, dtype=jnp.float32, compute_dtype=jnp.bfloat16, mesh=None, rules=None,
               lora_adapter=None, on_quantize=None, **run_options) -> Decoder:
    """The model at `path` as a sharded Decoder (params straight onto their devices).

    dtype: parameter dtype; compute_dtype: matmul dtype; mesh/rules: where the parameters go
    (default: the first device); lora_adapter: a Hugging Face PEFT LoRA adapter folder to attach;
    on_quantize: called with each weight quantized to NF4 (`hf_io.build_model`'s); run_options: ModelConfig run-time fields (remat, attention, base_quant='nf4': the linear
    projections quantized to NF4 as they are read; a bitsandbytes 4-bit folder is NF4 already).
    """
    path = resolve_model_path(str(path))
    if converted.is_converted(path):
        base_quant = run_options.pop("base_quant", "")
        model = converted.load_converted(path, dtype, compute_dtype, mesh, rules, **run_options)
        model = quantized(model, mesh, rules, on_quantize) if base_quant else model
    elif (gguf_file := gguf.find_gguf(path)) is not None:
        model = gguf.load_gguf(gguf_file, dtype, compute_dtype, mesh, rules, on_quantize, **run_options)
    else:
        model = hf_io.load_hf(path, dtype, compute_dtype, mesh, rules, on_quantize, **run_options)
    return model if lora_adapter is None else peft_io.load_adapter(model, lora_adapter, mesh, rules)


def load_model_config(path, **run_options) -> ModelConfig:
    """The ModelConfig of the model at `path`, without reading or downloading its weights (a gs://
    folder's config is read in the bucket, a Hub model's json files alone are downloaded): the
    memory plan comes first."""
    path = resolve_model_path(str(path), config_only=True)
    if converted.is_converted(path):
        return converted.converted_config(path, **run_options)
    gguf_file = gguf.find_gguf(path)
    if gguf_file is not None:
        return gguf.gguf_model_config(gguf_file, **run_options)
    return hf_io.hf_model_config(path, **run_options)


def load_tokenizer(path):
    """The tokenizer stored with the model at `path` (any source above, or a tokenizer folder)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(str(path))
    gguf_file = None if converted.is_converted(path) else gguf.find_gguf(path)
    if gguf_file is not None:
        return gguf.load_gguf_tokenizer(gguf_file)
    return AutoTokenizer.from_pretrained(hf_io.local_dir(path))


def random_model(config: ModelConfig, dtype, compute_dtype, mesh=None, seed: int = 0, on_quantize=None) -> Decoder:
    """A Decoder with random weights, created already sharded (never whole on one device); with
    `config.base_quant` the random projections are then quantized."""
    def create():
        return Decoder(config.replace(base_quant=""), param_dtype=dtype, compute_dtype=compute_dtype,
                       rngs=nnx.Rngs(seed))

    graphdef, state = nnx.split(nnx.eval_shape(create))
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=param_shardings(state, mesh))()
    model = nnx.merge(graphdef, state)
    return quantized(model, mesh, on_quantize=on_quantize) if config.base_quant else model


def quantized(model: Decoder, mesh=None, rules=None, on_quantize=None) -> Decoder:
    """`model` with its linear projections quantized to NF4 (double quantization), one weight of one
    layer at a time on the host."""
    c = model.config
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    paths, tensors = hf_io.model_param_paths(c), hf_io.hf_tensors(c)

    def read(hf_name):
        name, layer, _, _ = tensors[hf_name]
        value = hf_io._get(params, paths[name])
        value = value if layer is None else value[layer]
        return hf_io.to_hf(np.asarray(hf_io._gather(value)), hf_io.WEIGHT_MAP[name][1])
    return hf_io.build_model(c.replace(base_quant="nf4", base_double_quant=True), read, model.embed.dtype,
                             model.compute_dtype, mesh, rules, on_quantize=on_quantize)


def model_for_run(model_section, mesh=None, seed: int = 0, base_quant: str = "", on_quantize=None) -> Decoder:
    """The model a run's `model` config section describes: pretrained weights from `path`, or
    (init='random') `path`'s architecture with random weights; `base_quant` is `lora.base_quant`,
    `on_quantize` `load_model`'s."""
    m = model_section
    dtypes = dict(dtype=jnp.dtype(m.param_dtype), compute_dtype=jnp.dtype(m.compute_dtype))
    # A run's remat='auto' is resolved by its memory plan before training; a run's model rebuilt
    # for evaluation or export takes no gradient, so recomputes nothing.
    remat = "none" if m.remat == "auto" else m.remat
    run_options = dict(remat=remat, attention=m.attention, base_quant=base_quant)
    if m.init == "pretrained":
        return load_model(m.path, mesh=mesh, on_quantize=on_quantize, **dtypes, **run_options)
    return random_model(load_model_config(m.path, **run_options), mesh=mesh, seed=seed, on_quantize=on_quantize,
                        **dtypes)
