"""The one builder of a run's arrays and programs: `build(config, model, mesh, ...)`.

`setup` builds a run from its loaded model, `jaxsft.memory.plan` from the same model's abstract
shapes (`abstract_model`), before any weight is read; so the plan compiles exactly the programs the
loop runs, with their shardings and donation. `jaxsft.export` and the tests split a LoRA model
with `split`, as the run does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsft.checkpoint import flatten, unflatten
from jaxsft.models import Decoder, ModelConfig, loftq, lora, peft_io
from jaxsft.models.loading import load_model_config, model_for_run
from jaxsft.sharding import optimizer_shardings, param_shardings
from jaxsft.train.offload import Offloaded
from jaxsft.train.optimizer import make_optimizer
from jaxsft.train.state import OnDevice
from jaxsft.train.step import BATCH_KEYS, TrainStep, make_train_step


@dataclasses.dataclass
class Built:
    """A run's trees (arrays, or ShapeDtypeStructs with shardings when built abstract) and programs."""
    graphdef: Any
    params: Any  # the master weights of what trains (the model's params, a LoRA run's adapters)
    frozen: Any  # a LoRA run's base weights, else None
    state: OnDevice | Offloaded  # the optimizer state (`jaxsft.train.state`), not yet started
    tx: optax.GradientTransformation
    schedule: Any
    param_sharding: Any
    frozen_sharding: Any
    opt_sharding: Any
    batch_sharding: NamedSharding
    fns: TrainStep


def is_lora(config) -> bool:
    return bool(config.lora.r or config.lora.adapter_path)


def run_model(config, mesh):
    """The model a run starts from, on `mesh`: its weights (or random ones) and, for LoRA, its
    adapters (`lora.adapter_path`'s, or fresh ones). `jaxsft.export` rebuilds a LoRA run's with it."""
    m, residuals = config.model, None
    if config.lora.init == "loftq":  # the adapters come from the weights the loader quantizes
        model_config = load_model_config(m.path, attention=m.attention, base_quant=config.lora.base_quant)
        residuals = loftq.Residuals(lora.make_spec(config.lora, model_config))
    model = model_for_run(m, mesh, seed=config.train.seed, base_quant=config.lora.base_quant, on_quantize=residuals)
    if residuals is not None:
        return lora.attach(model, residuals.spec, mesh=mesh, initial=residuals.adapters(model.config))
    if is_lora(config):
        model = peft_io.add_adapters(model, config.lora, config.train.seed, mesh)
    return model


def split(model, lora_run: bool):
    """(graphdef, params, frozen): a LoRA run trains the adapters, the base is frozen (None otherwise)."""
    if lora_run:
        return nnx.split(model, lora.LoraParam, nnx.Param)
    return (*nnx.split(model, nnx.Param), None)


def abstract_model(config, model_config: ModelConfig, lora_spec=None):
    """The run's model (with its adapters, given their `lora_spec`) as shapes: nothing allocated."""
    m = config.model

    def create():
        model = Decoder(model_config, param_dtype=jnp.dtype(m.param_dtype), compute_dtype=jnp.dtype(m.compute_dtype))
        if lora_spec is not None:
            model.lora = lora.Adapters(lora_spec, model_config, nnx.Rngs(0))
        return model
    return nnx.eval_shape(create)


def with_shardings(tree, shardings):
    """`tree`'s leaves as ShapeDtypeStructs carrying the matching leaves of `shardings`."""
    flat = flatten(shardings)
    return unflatten(tree, {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=flat[k])
                            for k, x in flatten(tree).items()})


def build(config, model, mesh, total_steps: int, group_layers: int, abstract: bool = False) -> Built:
    """The run's trees and step functions for `model` (a loaded model, or `abstract_model`'s shapes
    with `abstract=True`). The optimizer state is still to be started (`setup`: `state.start`, from a
    checkpoint or the master weights); built abstract, an offloaded one never touches a store."""
    graphdef, params, frozen = split(model, is_lora(config))
    tx, schedule = make_optimizer(config.optim, total_steps)
    tx = lora.lora_plus(tx, config.lora.lr_ratio)
    param_sharding = param_shardings(params, mesh)
    frozen_sharding = None if frozen is None else param_shardings(frozen, mesh)
    opt_sharding = optimizer_shardings(tx, params, param_sharding, mesh)
    if abstract:
        params = with_shardings(params, param_sharding)
        frozen = None if frozen is None else with_shardings(frozen, frozen_sharding)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    dropout = is_lora(config) and config.lora.dropout
    fns = make_train_step(graphdef, tx, schedule, param_sharding, opt_sharding, batch_sharding, frozen=frozen,
                          frozen_sharding=frozen_sharding, dropout_seed=config.train.seed if dropout else None)
    tier = config.optim.offload
    if tier == "none":
        init = jax.jit(tx.init, out_shardings=opt_sharding)
        state = OnDevice(with_shardings(jax.eval_shape(tx.init, params), opt_sharding) if abstract else init(params),
                         fns.apply_update)
    else:  # master weights and moments in host memory or on disk; the devices keep compute params
        directory = config.optim.offload_dir or os.path.join(config.train.output_dir, "offload")
        state = Offloaded(tier, directory, params, param_sharding, config.optim, schedule, config.model.compute_dtype,
                          model.config.num_layers, group_layers, abstract=abstract)
    return Built(graphdef, params, frozen, state, tx, schedule, param_sharding, frozen_sharding, opt_sharding,
                 batch_sharding, fns)


def abstract_batch(config, mesh, batch_sharding) -> dict:
    """One micro-batch of the run as shapes (every process's rows)."""
    rows = config.data.micro_batch_rows * mesh.shape["data"] * mesh.shape["fsdp"]
    return {k: jax.ShapeDtypeStruct((rows, config.data.max_seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=batch_sharding) for k in BATCH_KEYS}
