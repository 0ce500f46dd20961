"""Memory tiers of the optimizer: float32 master weights and Adam moments in pinned host memory
(`optim.offload='host'`) or in a TensorStore zarr3 store on local disk (`'disk'`).

The devices hold only the compute-dtype parameters and the float32 gradient accumulator. The
update runs in two parts:
1. `prepare`, one jitted call on the devices: the step's loss and the global norm of the
   accumulated gradients divided by the step's loss-token count.
2. Per group (a slice of the stacked `layers` axis, and one group of the other parameters): the
   group's master weights and moments come to the devices, its gradients are divided and clipped
   by that norm, `adamw` (the elementwise part of the optimizer) updates them, the new weights are
   cast into the device params and the new state goes back. The accumulator is read, never copied;
   `TrainStep.update` then zeroes it in place for the next step. Group i+1 is read while group i updates and group i-1 is written back, so no more than
   three groups of state are in flight, and in `disk` mode host memory never holds the whole state.

The elementwise part gives the same bits on any subset of the parameters as on all of them, so
`none`, `host` and `disk` train bitwise alike (tests/test_offload.py).

Checkpoints (`save` / `restore`): a snapshot directory with one zarr3 array per master weight and
moment, in the full (layers, ...) shape whatever the group size, and `meta.json` (the step and the
optimizer's counters) written last: a snapshot without it is incomplete. Both tiers write and read
the same format, so a `host` run resumes in `disk` mode and back; a checkpoint of a run with
optim.offload='none' resumes in either (`Offloaded.resume_or_init`), and theirs with 'none'
(`restore_for_none`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorstore as ts
from etils import epath
from jax.experimental import multihost_utils

from jaxsft.checkpoint import flatten, unflatten
from jaxsft.sharding import index_key, optimizer_shardings
from jaxsft.train.optimizer import adamw, make_optimizer

META = "meta.json"


@dataclasses.dataclass(frozen=True)
class Group:
    names: tuple[str, ...]  # flat parameter names ("layers.q", "embed")
    start: int | None  # first layer of a layer group; None for the other parameters
    size: int  # layers in a layer group


def make_groups(names, num_layers: int, group_layers: int) -> list[Group]:
    layered = tuple(n for n in names if n.startswith("layers."))
    rest = tuple(n for n in names if not n.startswith("layers."))
    groups = [Group(layered, s, group_layers) for s in range(0, num_layers, group_layers)]
    return groups + ([Group(rest, None, 0)] if rest else [])


def group_layers_that_fit(num_layers: int, layer_state_bytes: float, budget_bytes: float) -> int:
    """The largest divisor of num_layers whose group state, three groups in flight, fits the budget."""
    fitting = [d for d in range(1, num_layers + 1)
               if num_layers % d == 0 and 3 * d * layer_state_bytes <= budget_bytes]
    return max(fitting, default=1)


def _kvstore(path: str):
    return path if "://" in path else {"driver": "file", "path": os.path.abspath(path)}


_copy = jax.jit(jnp.copy)


class HostStore:
    """Group state as arrays in pinned host memory, with the device arrays' layouts."""

    def __init__(self):
        self.groups: dict[int, dict[str, jax.Array]] = {}

    def write(self, i: int, arrays: dict, group: Group):
        stored = self.groups[i] = {k: jax.device_put(v, v.sharding.with_memory_kind("pinned_host"))
                                   for k, v in arrays.items()}
        return _Waiter(lambda: jax.block_until_ready(stored))

    def read(self, i: int, group: Group, shardings: dict):
        arrays = {k: jax.device_put(v, shardings[k]) for k, v in self.groups[i].items()}
        return lambda: arrays

    def close(self):
        self.groups.clear()


class _Waiter:
    def __init__(self, wait):
        self.wait = wait

    def result(self):
        return self.wait()


class DiskStore:
    """Group state in zarr3 arrays of the full (layers, ...) shape, chunked one layer by one
    device shard, so that any group size reads and writes whole chunks and every process writes
    only its own shards. Reads are TensorStore futures; writes run on one background thread."""

    def __init__(self, directory: str, specs: dict[str, tuple], create: bool, shared: bool = False):
        """specs: {key: (full shape, dtype, chunk shape)}. A `shared` directory (a checkpoint's)
        is created by process 0 for all; otherwise each process has its own (local disk)."""
        self.directory = str(directory)
        self.shared = shared
        context = ts.Context({"file_io_concurrency": {"limit": 64}})
        if create and shared and jax.process_count() > 1:
            if jax.process_index() == 0:
                DiskStore(directory, specs, create=True).close()
            multihost_utils.sync_global_devices(f"offload store {directory}")
            create = False
        opened = {}
        for key, (shape, dtype, chunk) in specs.items():
            spec = {"driver": "zarr3", "kvstore": _kvstore(os.path.join(self.directory, key))}
            if create:
                spec["metadata"] = {"shape": list(shape), "data_type": jnp.dtype(dtype).name,
                                    "chunk_grid": {"name": "regular",
                                                   "configuration": {"chunk_shape": list(chunk)}}}
                opened[key] = ts.open(spec, create=True, delete_existing=True, context=context)
            else:
                opened[key] = ts.open(spec, open=True, context=context)
        self.arrays = {k: f.result() for k, f in opened.items()}
        self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="offload-write")

    def _region(self, key, index, group: Group):
        if group.start is None:
            return self.arrays[key][index]
        first = index[0]
        rows = slice(group.start + (first.start or 0),
                     group.start + (group.size if first.stop is None else first.stop))
        return self.arrays[key][(rows, *index[1:])]

    def read(self, i: int, group: Group, shardings: dict):
        pending = {}
        for key, sharding in shardings.items():
            shape = self.group_shape(key, group)
            for index in sharding.addressable_devices_indices_map(shape).values():
                if index_key(index) not in pending.setdefault(key, {}):
                    pending[key][index_key(index)] = self._region(key, index, group).read()

        def arrays():
            out = {}
            for key, sharding in shardings.items():
                # On CPU an array put from numpy keeps its numpy source alive as long as itself
                # (measured): a copy, made before the next array is read in, lets each source go,
                # so a group read is not held twice (the devices' memory is host memory there).
                data = {k: f.result() for k, f in pending.pop(key).items()}
                out[key] = _copy(jax.make_array_from_callback(
                    self.group_shape(key, group), sharding, lambda index, data=data: data[index_key(index)]))
                out[key].block_until_ready()
            return out
        return arrays

    def group_shape(self, key, group: Group) -> tuple:
        shape = tuple(self.arrays[key].shape)
        return shape if group.start is None else (group.size, *shape[1:])

    def write(self, i: int, arrays: dict, group: Group):
        """Writes `arrays` (which it takes: the dict is emptied) on the background thread."""
        def write_all():
            commits = []
            while arrays:
                commits += self._write_array(*arrays.popitem(), group)
            for f in commits:
                f.result()
        return self.writer.submit(write_all)

    def _write_array(self, key, value, group: Group) -> list:
        """Starts writing one array's shards; returns when TensorStore has copied them, so the
        array can go before the next is copied (a group being written is not held twice)."""
        commits = []
        for shard in value.addressable_shards:
            if shard.replica_id == 0:
                written = self._region(key, shard.index, group).write(np.asarray(shard.data))
                written.copy.result()
                commits.append(written.commit)
        return commits

    def close(self):
        self.writer.shutdown(wait=True)


def snapshot_dir(checkpoint_dir: str, step: int) -> str:
    """Where the offloaded state of checkpoint `step` is kept: beside the checkpoint directory,
    not in it (on GCS, Orbax deletes any folder there without its commit marker as unfinished)."""
    return f"{str(checkpoint_dir).rstrip('/')}-offload/{step}"


def saved_offloaded(checkpoint_dir: str, step: int) -> bool:
    """Whether checkpoint `step` was saved by an offloaded run (it has a complete snapshot) rather
    than by one with optim.offload='none' (params = master weights, opt_state = optax's state)."""
    return (epath.Path(snapshot_dir(checkpoint_dir, step)) / META).exists()


def none_name(key: str) -> str:
    """The flat name in an `optim.offload='none'` run of a stored array: "master.layers.q" is its
    params' "layers.q", "state.0.mu.layers.q" its opt_state's "1.0.mu.layers.q" (`none` chains
    clipping, which keeps no state, before adamw)."""
    kind, name = key.split(".", 1)
    return name if kind == "master" else "1." + name


def read_snapshot(checkpoint_dir: str, step: int, like: dict) -> dict:
    """Arrays of checkpoint `step`'s snapshot, straight onto their shardings: `like` maps stored
    names ("master.layers.q", "state.0.mu.embed") to ShapeDtypeStructs with shardings."""
    directory = snapshot_dir(checkpoint_dir, step)
    snapshot = DiskStore(directory, {k: (x.shape, x.dtype, x.shape) for k, x in like.items()}, create=False, shared=True)
    arrays = {k: jax.make_array_from_callback(x.shape, x.sharding,
                                              lambda index, key=k: snapshot.arrays[key][index].read().result())
              for k, x in like.items()}
    snapshot.close()
    return arrays


def restore_for_none(checkpointer, params, opt_state):
    """`checkpointer.restore_latest(params, opt_state)` for a run with optim.offload='none' (params:
    the master weights, opt_state: optax's state, arrays or ShapeDtypeStructs with shardings),
    whichever tier saved the newest checkpoint: an offloaded run's masters and moments come from
    its snapshot, its step counters and record from the Orbax step."""
    step = checkpointer.latest_step()
    if step is None or not saved_offloaded(checkpointer.directory, step):
        return checkpointer.restore_latest(params, opt_state)
    stored = checkpointer.manager.item_metadata(step)["params"]
    flat_params, flat_opt = flatten(params), flatten(opt_state)
    # The Orbax step holds the compute-dtype params (restored as saved, so their checksums match)
    # and the counters; the masters and moments are read from the snapshot.
    compute = {k: jax.ShapeDtypeStruct(x.shape, stored[k].dtype, sharding=x.sharding) for k, x in flat_params.items()}
    counters = {"state." + k.removeprefix("1."): x for k, x in flat_opt.items() if not x.ndim}
    _, counters, record = checkpointer.restore(step, compute, counters)
    like = {**{"master." + k: x for k, x in flat_params.items()},
            **{"state." + k.removeprefix("1."): x for k, x in flat_opt.items() if x.ndim}}
    arrays = {none_name(k): v for k, v in read_snapshot(checkpointer.directory, step, like).items()}
    arrays.update({none_name(k): v for k, v in counters.items()})
    return (unflatten(params, {k: arrays[k] for k in flat_params}),
            unflatten(opt_state, {k: arrays[k] for k in flat_opt}), record)


def read_masters(checkpoint_dir: str, step: int, params):
    """The float32 master weights of an offloaded run's checkpoint `step`, as the tree `params`
    (arrays or ShapeDtypeStructs with shardings) describes them (for exports)."""
    flat = {k: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding) for k, x in flatten(params).items()}
    arrays = read_snapshot(checkpoint_dir, step, {"master." + k: x for k, x in flat.items()})
    return unflatten(params, {k: arrays["master." + k] for k in flat})


class Offloaded:
    """The master weights and optimizer state of a run in the `host` or `disk` tier, and the
    streamed update. `params` passed to `update` are the devices' compute-dtype params."""

    def __init__(self, tier: str, directory: str, masters, param_sharding, optim, schedule,
                 compute_dtype, num_layers: int, group_layers: int):
        """masters: a tree of arrays or ShapeDtypeStructs (the master weights: dtype, shape,
        sharding); param_sharding: the device shardings of that tree; directory: the `disk`
        tier's live store."""
        if tier not in ("host", "disk"):
            raise ValueError(f"optim.offload={tier!r}: Offloaded holds the 'host' or 'disk' tier")
        self.tier, self.schedule = tier, schedule
        self.optim, self.clip_norm, self.adamw = optim, optim.clip_norm, adamw(optim, schedule)
        self.structure = jax.tree.map(lambda x: 0, masters)
        self.masters_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), masters)
        master_flat = flatten(masters)
        shardings = flatten(param_sharding)
        self.mesh = mesh = next(iter(shardings.values())).mesh
        while num_layers % group_layers:
            group_layers -= 1
        self.group_layers = group_layers
        self.groups = make_groups(list(master_flat), num_layers, group_layers)
        self.compute_sharding = param_sharding
        self.compute_dtype = jnp.dtype(compute_dtype)
        # One abstract group tree per kind of group (layer groups share shapes): {"master", "state"}.
        self.like, self.shardings = [], []
        full_specs = {}
        for group in self.groups:
            def piece(name):
                x = master_flat[name]
                shape = x.shape if group.start is None else (group.size, *x.shape[1:])
                return jax.ShapeDtypeStruct(shape, x.dtype, sharding=shardings[name])
            master = {n: piece(n) for n in group.names}
            master_shardings = {n: shardings[n] for n in group.names}
            state = jax.eval_shape(self.adamw.init, master)
            state_shardings = optimizer_shardings(self.adamw, master, master_shardings, mesh)
            like = {"master": master, "state": state}
            self.like.append(like)
            self.shardings.append(flatten({"master": master_shardings, "state": state_shardings}))
            for key, x in flatten(like).items():
                if x.ndim:
                    full = x.shape if group.start is None else (num_layers, *x.shape[1:])
                    shard = self.shardings[-1][key].shard_shape(x.shape)
                    chunk = shard if group.start is None else (1, *shard[1:])
                    full_specs[key] = (full, x.dtype, chunk)
        self.full_specs = full_specs
        self.store = HostStore() if tier == "host" else DiskStore(directory, full_specs, create=True)
        self.small: list[dict] = [{} for _ in self.groups]  # the optimizer's counters, per group

        acc_sharding = {"grads": param_sharding, "loss_sum": None}
        self._prepare = jax.jit(self._prepare_fn, in_shardings=(acc_sharding, None, None))
        self._update = {}
        for i, group in enumerate(self.groups):
            kind = group.start is not None
            if kind not in self._update:
                tree_sharding = self.tree_shardings(i)
                self._update[kind] = jax.jit(
                    self._group_fn, static_argnums=5,
                    in_shardings=(param_sharding, acc_sharding, tree_sharding, None, None),
                    out_shardings=(param_sharding, tree_sharding, None), donate_argnums=(0, 2))
        self._place = {layered: jax.jit(functools.partial(self._place_fn, layered=layered),
                                        out_shardings=param_sharding, donate_argnums=0)
                       for layered in (False, True)}
        self._zeros = {kind: jax.jit(lambda dtype=dtype: jax.tree.map(lambda x: jnp.zeros(x.shape, dtype or x.dtype),
                                                                      self.masters_like), out_shardings=param_sharding)
                       for kind, dtype in (("compute", self.compute_dtype), ("master", None))}
        self._cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(self.compute_dtype), p),
                             out_shardings=param_sharding)

    # --- the math ---

    def _prepare_fn(self, acc, num_loss_tokens, step):
        denominator = jnp.maximum(num_loss_tokens, 1).astype(jnp.float32)
        grad_norm = optax.global_norm(jax.tree.map(lambda g: g / denominator, acc["grads"]))
        return {"denominator": denominator, "grad_norm": grad_norm}, {
            "loss": acc["loss_sum"] / denominator, "grad_norm": grad_norm, "learning_rate": self.schedule(step)}

    def _group_fn(self, params, acc, tree, scale, start, size):
        layered = size > 0
        grads, master = flatten(acc["grads"]), tree["master"]

        def gradient(x):
            # The same operations, in the same order, as `none`'s update: divide, then clip as
            # optax.clip_by_global_norm does (XLA then compiles the same arithmetic for them).
            g = (jax.lax.dynamic_slice_in_dim(x, start, size) if layered else x) / scale["denominator"]
            if not self.clip_norm:
                return g
            norm = scale["grad_norm"]
            return jax.lax.select(jnp.squeeze(norm < self.clip_norm), g, (g / norm.astype(g.dtype)) * self.clip_norm)
        updates, state = self.adamw.update({k: gradient(grads[k]) for k in master}, tree["state"], master)
        master = {k: (p + updates[k]).astype(p.dtype) for k, p in master.items()}
        squares = jnp.stack([sum(jnp.sum(jnp.square(u.astype(jnp.float32))) for u in updates.values()),
                             sum(jnp.sum(jnp.square(p.astype(jnp.float32))) for p in master.values())])
        return self._place_fn(params, master, start, layered), {"master": master, "state": state}, squares

    def _place_fn(self, params, master, start, layered):
        flat = flatten(params)
        for k, p in master.items():
            new = p.astype(flat[k].dtype)
            flat[k] = jax.lax.dynamic_update_slice_in_dim(flat[k], new, start, 0) if layered else new
        return unflatten(params, flat)

    # --- the streamed update ---

    def update(self, params, opt_state, acc, num_loss_tokens, step):
        """TrainStep.update for offloaded state: returns (params, self, metrics)."""
        scale, metrics = self._prepare(acc, num_loss_tokens, step)
        squares = []
        next_read = self._read(0)
        writes = []
        for i in range(len(self.groups)):
            arrays = next_read()
            if i + 1 < len(self.groups):
                next_read = self._read(i + 1)
            params, sq, written = self._update_group(i, params, acc, arrays, scale)
            squares.append(sq)
            writes.append(written)
            if len(writes) > 1:
                writes.pop(0).result()  # group i-1 is written back before group i+2 is read
        for w in writes:
            w.result()
        total = sum(squares)
        metrics = {**metrics, "update_norm": jnp.sqrt(total[0]), "param_norm": jnp.sqrt(total[1])}
        return params, self, metrics

    def _update_group(self, i: int, params, acc, arrays: dict, scale):
        """Group i's update; its new state goes to the writer, and nothing else holds it (the
        writer lets each array go once TensorStore has copied it)."""
        group = self.groups[i]
        tree = unflatten(self.like[i], {**arrays, **self.small[i]})
        params, tree, squares = self._update[group.start is not None](
            params, acc, tree, scale, jnp.int32(group.start or 0), group.size)
        return params, squares, self._write(i, tree)

    def tree_shardings(self, i: int):
        """The device shardings of group i's {"master", "state"} tree."""
        return unflatten(self.like[i], self.shardings[i])

    def _read(self, i: int):
        group = self.groups[i]
        big = {k: s for k, s in self.shardings[i].items() if k not in self.small[i]}
        return self.store.read(i, group, big)

    def _write(self, i: int, tree):
        flat = flatten(tree)
        self.small[i] = {k: v for k, v in flat.items() if v.ndim == 0}
        return self.store.write(i, {k: v for k, v in flat.items() if v.ndim}, self.groups[i])

    # --- state in and out ---

    def init(self, masters):
        """Store `masters` (device arrays) and fresh optimizer state; returns the compute params."""
        flat = flatten(masters)
        for i, group in enumerate(self.groups):
            master = {n: flat[n] if group.start is None else flat[n][group.start:group.start + group.size]
                      for n in group.names}
            state_sharding = unflatten(self.like[i]["state"], {
                k.removeprefix("state."): s for k, s in self.shardings[i].items() if k.startswith("state.")})
            state = jax.jit(self.adamw.init, out_shardings=state_sharding)(master)
            self._write(i, {"master": master, "state": state}).result()
        return self._cast(masters)

    def masters(self):
        """The master weights as one tree of device arrays (exports of float32), placed group by
        group into one tree: a group is the only state on the devices beside it."""
        masters = self._zeros["master"]()
        for i, group in enumerate(self.groups):
            arrays = self._read(i)()
            masters = self._place[group.start is not None](
                masters, {n: arrays["master." + n] for n in group.names}, jnp.int32(group.start or 0))
        return masters

    def state_arrays(self) -> dict:
        """Every stored array (masters and moments), full-shaped, on the host (for tests)."""
        parts = {}
        for i in range(len(self.groups)):
            arrays = self._read(i)()
            for k, v in {**arrays, **self.small[i]}.items():
                parts.setdefault(k, []).append(np.asarray(jax.device_get(v)))
        return {k: v[0] if v[0].ndim == 0 else np.concatenate(v) for k, v in parts.items()}

    def resume_or_init(self, checkpointer, masters, resume: bool):
        """The run's starting state: the newest usable checkpoint's (with `resume`), saved by an
        offloaded run or by one with optim.offload='none', or `masters` (device arrays, then
        dropped). Returns (compute params, the checkpoint's record or None)."""
        step = checkpointer.latest_step() if resume else None
        if step is not None and not saved_offloaded(checkpointer.directory, step):
            # A `none` checkpoint: its master weights and optax state come to the devices once (as
            # much memory as that run's state), then go to the store group by group.
            restored = checkpointer.restore_latest(masters, self._none_state_like(masters))
            return self.load(*restored[:2]), restored[2]
        restored = checkpointer.restore_latest(self.abstract_params(), self.abstract_counters()) if resume else None
        if restored is None:
            return self.init(masters), None
        _, counters, record = restored
        return self.restore(checkpointer.directory, record["step"], counters), record

    def _none_state_like(self, masters):
        """The optax state of `masters` as a run with optim.offload='none' keeps it (shapes,
        dtypes, device shardings)."""
        tx = make_optimizer(self.optim, 1)[0]  # the state's structure does not depend on the schedule
        shardings = flatten(optimizer_shardings(tx, masters, self.compute_sharding, self.mesh))
        like = jax.eval_shape(tx.init, masters)
        return unflatten(like, {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[k])
                                for k, x in flatten(like).items()})

    def load(self, masters, opt_state):
        """Stores the master weights and optax state of a run with optim.offload='none' (device
        arrays); returns the compute params."""
        flat = {**{"master." + k: v for k, v in flatten(masters).items()},
                **{"state." + k.removeprefix("1."): v for k, v in flatten(opt_state).items()}}
        for i, group in enumerate(self.groups):
            arrays = {}
            for key, like in flatten(self.like[i]).items():
                x = flat[key]
                if like.ndim and group.start is not None:
                    x = x[group.start:group.start + group.size]
                # Each group gets its own counters: a group's update donates them.
                arrays[key] = jax.device_put(jnp.copy(x), self.shardings[i][key])
            self._write(i, unflatten(self.like[i], arrays)).result()
        return self._cast(masters)

    def counters(self) -> dict:
        """The optimizer's step counters (the same in every group): what the Orbax checkpoint
        stores as `opt_state` in an offloaded run."""
        return dict(self.small[0])

    def abstract_counters(self) -> dict:
        like = flatten(self.like[0])
        return {k: jax.ShapeDtypeStruct((), like[k].dtype, sharding=self.shardings[0][k])
                for k in like if not like[k].ndim}

    def abstract_params(self):
        """The compute params' shapes, dtypes and shardings (a restore target)."""
        shardings = flatten(self.compute_sharding)
        return unflatten(self.structure, {k: jax.ShapeDtypeStruct(x.shape, self.compute_dtype, sharding=shardings[k])
                                          for k, x in flatten(self.masters_like).items()})

    def save(self, checkpointer, step: int) -> dict:
        """Snapshot the state for checkpoint `step` of `checkpointer` (before the checkpoint
        itself is saved: a checkpoint that exists has its snapshot) and remove the snapshots of
        steps the checkpointer no longer keeps. Returns `counters()` for the checkpoint."""
        directory = snapshot_dir(checkpointer.directory, step)
        snapshot = DiskStore(directory, self.full_specs, create=True, shared=True)
        for i, group in enumerate(self.groups):
            snapshot.write(i, self._read(i)(), group).result()
        snapshot.close()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"offload snapshot {step}")
        if jax.process_index() == 0:
            (epath.Path(directory) / META).write_text(json.dumps({"step": step}))
            root = epath.Path(snapshot_dir(checkpointer.directory, 0)).parent
            kept = set(checkpointer.all_steps()) | {step}
            for old in root.iterdir():
                if not (old.name.isdigit() and int(old.name) in kept):
                    old.rmtree()
        return self.counters()

    def restore(self, checkpoint_dir: str, step: int, counters: dict):
        """Loads the snapshot of checkpoint `step` (written by either tier, with any group size,
        on any mesh) and the checkpoint's `counters`; returns the compute params."""
        directory = snapshot_dir(checkpoint_dir, step)
        meta_path = epath.Path(directory) / META
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory}: the offloaded state of checkpoint {step} is missing or "
                                    f"incomplete ({META} missing); was the checkpoint saved with optim.offload='none'?")
        snapshot = DiskStore(directory, self.full_specs, create=False, shared=True)
        params = self._zeros["compute"]()
        for i, group in enumerate(self.groups):
            self.small[i] = {k: jnp.copy(v) for k, v in counters.items()}  # each group's are donated
            big = {k: s for k, s in self.shardings[i].items() if k not in self.small[i]}
            arrays = snapshot.read(i, group, big)()
            masters = {n: arrays["master." + n] for n in group.names}
            self.store.write(i, arrays, group).result()
            params = self._place[group.start is not None](params, masters, jnp.int32(group.start or 0))
        snapshot.close()
        return params

    def close(self):
        self.store.close()
