"""LoRA adapters on the stacked decoder layers: which projections they target, their parameters
and their math.

An adapted projection computes y = x W + scale * dropout(x) A B. For each targeted projection the
adapters are stacked on the decoder's 'layers' axis like the base kernel: A is (layers, *in, r) and
B is (layers, r, *out), with the kernel's logical axes plus a replicated 'lora_rank' axis, so the
sharding rules of `jaxsft.sharding` apply unchanged. Layers without an adapter (`layers`, or a
PEFT `layers_to_transform`) and ranks below the stacked rank (a PEFT `rank_pattern`) hold zeros and
have scale 0: they add nothing, get zero gradients and stay zero.

Names and matching follow Hugging Face PEFT: a projection is targeted by its module name
(`model.layers.3.self_attn.q_proj`) exactly as PEFT's `target_modules` selects it.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsft.models.config import ModelConfig
from jaxsft.models.decoder import INPUT_AXES, layer_shapes
from jaxsft.models.hf_io import WEIGHT_MAP
from jaxsft.sharding import param_shardings, path_name

def module_name(name: str, layer: int) -> str:
    """The PEFT module name of a projection: `model.layers.{layer}.self_attn.q_proj`."""
    return WEIGHT_MAP[name][0].format(i=layer).removesuffix(".weight")


def peft_name(name: str) -> str:
    """The short PEFT target name: `q_proj`, `gate_proj`, ..."""
    return module_name(name, 0).rsplit(".", 1)[1]


VALID_TARGETS = ", ".join(peft_name(n) for n in INPUT_AXES)


class LoraParam(nnx.Param):
    """An adapter matrix: the only parameters a LoRA run trains."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted projection: its rank and alpha per layer (rank 0 = no adapter on that layer)."""
    name: str
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]

    @property
    def rank(self) -> int:
        """The stacked rank (the largest layer's)."""
        return max(self.ranks)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    targets: tuple[Target, ...]
    use_rslora: bool = False
    dropout: float = 0.0

    def scales(self, target: Target) -> np.ndarray:
        """Per-layer scale: alpha / r (alpha / sqrt(r) with rsLoRA), 0 where there is no adapter."""
        return np.array([0.0 if r == 0 else a / (math.sqrt(r) if self.use_rslora else r)
                         for r, a in zip(target.ranks, target.alphas)], np.float32)


def target_matches(target_modules, name: str, layers=None) -> bool:
    """PEFT's rule: a string is a regex the whole module name must match; a list entry matches the
    name or its last components; `layers` (PEFT's layers_to_transform) filters list targets."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if not any(name == t or name.endswith("." + t) for t in target_modules):
        return False
    return not layers or int(name.split(".")[2]) in layers


def select_targets(target_modules, num_layers: int, layers=()) -> dict[str, list[int]]:
    """jaxsft projection -> the layers whose module PEFT's `target_modules` selects.

    `all-linear` is every projection of the decoder layers (PEFT leaves out the output layer too).
    Raises ValueError when a target matches nothing, naming the valid module names.
    """
    if target_modules == "all-linear":
        target_modules = [peft_name(n) for n in INPUT_AXES]
    if isinstance(target_modules, str) and layers:
        raise ValueError("lora.layers works with a list of target modules, not a regex (as in PEFT): "
                         "put the layers into the regex instead")
    bad_layers = [i for i in layers if not 0 <= i < num_layers]
    if bad_layers:
        raise ValueError(f"lora.layers {bad_layers}: this model has layers 0..{num_layers - 1}")
    names = {(n, i): module_name(n, i) for n in INPUT_AXES for i in range(num_layers)}
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unmatched = [t for t in wanted if not any(target_matches(
        t if isinstance(target_modules, str) else [t], m, layers) for m in names.values())]
    if unmatched or not wanted:
        raise ValueError(
            f"lora target_modules {unmatched or wanted} match no module; valid names: {VALID_TARGETS}, "
            f"'all-linear', or a regex over module names such as {names['q', 0]!r}")
    selected = {}
    for (n, i), m in names.items():
        if target_matches(target_modules, m, layers):
            selected.setdefault(n, []).append(i)
    return selected


def make_spec(lora_config, model_config: ModelConfig) -> LoraSpec:
    """The adapters a run's `lora` config section asks for."""
    selected = select_targets(_plain(lora_config.target_modules), model_config.num_layers,
                              tuple(lora_config.layers))
    targets = []
    for name in INPUT_AXES:
        chosen = set(selected.get(name, ()))
        if chosen:
            targets.append(Target(name, tuple(lora_config.r if i in chosen else 0
                                              for i in range(model_config.num_layers)),
                                  tuple(float(lora_config.alpha) for _ in range(model_config.num_layers))))
    return LoraSpec(tuple(targets), bool(lora_config.use_rslora), float(lora_config.dropout))


def _plain(target_modules):
    # ml_collections hands lists over as tuples or lists; a string stays a string.
    return target_modules if isinstance(target_modules, str) else list(target_modules)


def adapter_shapes(spec: LoraSpec, c: ModelConfig) -> dict[str, dict[str, tuple]]:
    """name -> {'a': (shape, logical axes), 'b': (shape, logical axes)}, stacked on layers."""
    base = layer_shapes(c)
    out = {}
    for t in spec.targets:
        shape, axes = base[t.name]
        k = INPUT_AXES[t.name]
        out[t.name] = {
            "a": ((c.num_layers, *shape[:k], t.rank), ("layers", *axes[:k], "lora_rank")),
            "b": ((c.num_layers, t.rank, *shape[k:]), ("layers", "lora_rank", *axes[k:])),
        }
    return out


def lora_param_count(model_config: ModelConfig, lora_config) -> int:
    """Trained parameters of a LoRA run: only the adapted layers count (the memory estimator's input)."""
    spec = make_spec(lora_config, model_config)
    total = 0
    for t in spec.targets:
        shape, _ = layer_shapes(model_config)[t.name]
        k = INPUT_AXES[t.name]
        total += sum(r * (math.prod(shape[:k]) + math.prod(shape[k:])) for r in t.ranks)
    return total


class Adapter(nnx.Module):
    """A and B of one projection, stacked on layers."""

    def __init__(self, a: jax.Array, b: jax.Array, a_axes, b_axes):
        self.a = LoraParam(a, logical_axes=a_axes)
        self.b = LoraParam(b, logical_axes=b_axes)


class Adapters(nnx.Module):
    """The adapters of one model (`Decoder.lora`); `spec` is static (part of the graph)."""

    def __init__(self, spec: LoraSpec, c: ModelConfig, rngs: nnx.Rngs):
        self.spec = spec
        for t in spec.targets:
            (a_shape, a_axes), (b_shape, b_axes) = adapter_shapes(spec, c)[t.name].values()
            # PEFT: kaiming_uniform(a=sqrt(5)) of nn.Linear, i.e. U(-1/sqrt(in), 1/sqrt(in)) over the
            # per-layer input features (not the stacked layers axis); B = 0.
            bound = 1 / math.sqrt(math.prod(a_shape[1:-1]))
            a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
            a = a * _rank_mask(t, a.ndim, rank_axis=-1)
            setattr(self, t.name, Adapter(a, jnp.zeros(b_shape, jnp.float32), a_axes, b_axes))
        # Set by the train step on its own copy of the model; None = no dropout (evaluation).
        self.dropout_key = nnx.data(None)

    def layer_inputs(self):
        """Per-layer inputs of the decoder's scan: {name: (A, B, scale)} stacked on layers, and the
        per-layer dropout keys (None when not training)."""
        arrays = {t.name: (getattr(self, t.name).a[...], getattr(self, t.name).b[...],
                           jnp.asarray(self.spec.scales(t))) for t in self.spec.targets}
        keys = None
        if self.dropout_key is not None and self.spec.dropout > 0:
            keys = jax.random.split(self.dropout_key, len(self.spec.targets[0].ranks))
        return arrays, keys

    def adapt(self, layer_inputs, compute_dtype):
        """The decoder's hook for one layer: `adapt(name, x, y)` returns y plus the adapter's
        contribution when `name` is adapted, else y."""
        arrays, key = layer_inputs

        def adapt(name, x, y):
            if name not in arrays:
                return y
            a, b, scale = arrays[name]
            dropout_key = None if key is None else jax.random.fold_in(key, list(INPUT_AXES).index(name))
            return y + lora_delta(x, a.astype(compute_dtype), b.astype(compute_dtype), scale,
                                  self.spec.dropout, dropout_key).astype(y.dtype)
        return adapt


def lora_delta(x, a, b, scale, dropout: float = 0.0, key=None):
    """scale * dropout(x) A B for one layer: x (..., *in), a (*in, r), b (r, *out)."""
    if key is not None:
        keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    z = jnp.tensordot(x, a, axes=a.ndim - 1)
    return jnp.tensordot(z, b, axes=1) * scale.astype(z.dtype)


def _rank_mask(t: Target, ndim: int, rank_axis: int) -> np.ndarray:
    # 1 where (layer, rank index) is inside that layer's rank, shaped to broadcast over A or B.
    mask = np.arange(t.rank)[None, :] < np.array(t.ranks)[:, None]  # (layers, rank)
    shape = [1] * ndim
    shape[0], shape[rank_axis] = mask.shape
    return mask.reshape(shape).astype(np.float32)


def attach(model, spec: LoraSpec, seed: int = 0, mesh=None, rules=None, initial=None):
    """Give `model` (a Decoder without adapters) freshly initialised adapters (PEFT's initialisation,
    or `initial`: name -> (A, B) stacked as `Adapters` holds them, LoftQ's), placed by the sharding
    rules; returns the model."""
    adapters = Adapters(spec, model.config, nnx.Rngs(seed))
    for name, (a, b) in (initial or {}).items():
        getattr(adapters, name).a[...], getattr(adapters, name).b[...] = jnp.asarray(a), jnp.asarray(b)
    graphdef, state = nnx.split(adapters)
    state = jax.device_put(state, param_shardings(state, mesh, rules))
    model.lora = nnx.merge(graphdef, state)
    return model


def merged_layer_weights(model) -> dict[str, jax.Array]:
    """The adapted base kernels W + scale * A B of every target, computed in float32 and returned
    in the base weights' dtype (PEFT's merge)."""
    out = {}
    for t in model.lora.spec.targets:
        w = getattr(model.layers, t.name)
        adapter = getattr(model.lora, t.name)
        a, b = adapter.a[...], adapter.b[...]
        scale = model.lora.spec.scales(t).reshape((-1,) + (1,) * (w.ndim - 1))
        out[t.name] = (w[...].astype(jnp.float32) + scale * _stacked_product(a, b)).astype(w.dtype)
    return out


def _stacked_product(a, b):
    # (L, *in, r) x (L, r, *out) -> (L, *in, *out)
    return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a.astype(jnp.float32), b.astype(jnp.float32))


def lora_plus(tx: optax.GradientTransformation, lr_ratio: float) -> optax.GradientTransformation:
    """LoRA+: B's updates (its learning rate, and with it its decoupled weight decay) scaled by
    `lr_ratio` relative to A's."""
    if lr_ratio == 1.0:
        return tx

    def is_b(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: path_name(path).split(".")[-1] == "b", params)
    return optax.chain(tx, optax.masked(optax.scale(lr_ratio), is_b))
