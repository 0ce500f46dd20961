"""Logical axis names -> mesh axes.

Models name their axes (vocab, embed, heads, ...); this module alone decides where they go on the
(data, fsdp, tensor) mesh. A rule is (logical name, mesh axis or tuple of axes or None); the first
rule for a name wins. A dimension that a mesh axis does not divide stays replicated on that axis.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP shards the embed dimension of every weight; tensor parallelism splits heads and mlp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = devices if devices is not None else jax.devices()
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices, "
            f"but {len(devices)} are present")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes, shape, mesh, rules=DEFAULT_RULES) -> P:
    table = dict(reversed(rules))  # first rule wins
    used = set()
    spec = []
    for name, dim in zip(axes, shape):
        target = table.get(name)
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return P(*spec)


def param_shardings(state, mesh=None, rules=None):
    """The state's structure with each Variable replaced by its sharding: a prefix tree for
    `jax.jit` shardings (use `nnx.to_pure_dict` on it for plain nested dicts)."""
    rules = rules or DEFAULT_RULES

    def one(variable):
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        axes = variable.get_metadata().get("logical_axes", (None,) * len(variable.shape))
        return NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def path_name(path) -> str:
    """A readable dotted name for a pytree path ("layers.q", "1.0.mu.layers.q")."""
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return ".".join(k for k in keys if k != "value")


def optimizer_shardings(tx, params, param_sharding, mesh):
    """Shardings for `tx.init(params)`: every leaf shaped like a parameter (Adam's moments) is
    sharded like that parameter; counters and other scalars are replicated."""
    by_name = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(param_sharding)
    for (path, leaf), sharding in zip(flat_params, flat_shardings):
        by_name[path_name(path)] = (leaf.shape, sharding)

    def one(path, leaf):
        name = path_name(path)
        for param_name, (shape, sharding) in by_name.items():
            if (name == param_name or name.endswith("." + param_name)) and leaf.shape == shape:
                return sharding
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, params))


def index_key(index: tuple[slice, ...]) -> tuple:
    """A hashable form of a shard's index (`Sharding.addressable_devices_indices_map`'s slices)."""
    return tuple((s.start, s.stop, s.step) for s in index)


def bytes_per_device(tree) -> int:
    """Bytes per device of a tree of ShapeDtypeStructs / arrays with shardings (the largest shard
    set any one device holds; a leaf without a sharding is whole on every device)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.shape if getattr(x, "sharding", None) is None else x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * x.dtype.itemsize  # a PRNG key dtype too (LoRA dropout)
    return total
