"""Memory tiers of the optimizer: float32 master weights and Adam moments in pinned host memory
(`optim.offload='host'`) or in a TensorStore zarr3 store on local disk (`'disk'`), kept group by
group by `jaxsft.train.offload_store`. `Offloaded` is their optimizer state (the interface of
`jaxsft.train.state`).

The devices hold only the compute-dtype parameters and the float32 gradient accumulator. The
update runs in two parts:
1. `prepare`, one jitted call on the devices: the step's loss and the global norm of the
   accumulated gradients divided by the step's loss-token count.
2. Per group (a slice of the stacked `layers` axis, and one group of the other parameters): the
   group's master weights and moments come to the devices, its gradients are divided and clipped
   by that norm, `adamw` (the elementwise part of the optimizer) updates them, the new weights are
   cast into the device params and the new state goes back. The accumulator is read, never
   copied; the loop then zeroes it in place for the next step. Group i+1 is read while group i
   updates and group i-1 is written back, so no more than three groups of state are in flight,
   and in `disk` mode host memory never holds the whole state.

The elementwise part gives the same bits on any subset of the parameters as on all of them, so
`none`, `host` and `disk` train bitwise alike (tests/test_offload.py).

Checkpoints write the state to a snapshot (`jaxsft.train.snapshot`), which both tiers read, as
does a run with optim.offload='none'; a checkpoint of such a run resumes in either (`start`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsft.checkpoint import flatten, unflatten
from jaxsft.sharding import bytes_per_device, optimizer_shardings
from jaxsft.train.offload_store import DiskStore, HostStore, chunk_shape, make_groups
from jaxsft.train.optimizer import adamw, make_optimizer
from jaxsft.train.snapshot import open_snapshot, saved_offloaded, write_snapshot
from jaxsft.train.state import Planned


class Offloaded:
    """The master weights and optimizer state of a run in the `host` or `disk` tier, and the
    streamed update. The `params` of its methods are the devices' compute-dtype params."""

    def __init__(self, tier: str, directory: str, masters, param_sharding, optim, schedule,
                 compute_dtype, num_layers: int, group_layers: int, abstract: bool = False):
        """masters: a tree of arrays or ShapeDtypeStructs (the master weights: dtype, shape,
        sharding); param_sharding: the device shardings of that tree; directory: the `disk`
        tier's live store; `abstract`: for a plan, with no store."""
        if tier not in ("host", "disk"):
            raise ValueError(f"optim.offload={tier!r}: Offloaded holds the 'host' or 'disk' tier")
        self.tier, self.schedule = tier, schedule
        self.optim, self.clip_norm, self.adamw = optim, optim.clip_norm, adamw(optim, schedule)
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
                    full_specs[key] = (full, x.dtype, chunk_shape(shard if group.start is None else (1, *shard[1:]),
                                                                  x.dtype.itemsize))
        self.full_specs = full_specs
        if not abstract:
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

    def update(self, params, acc, num_loss_tokens, step):
        """The step's update: returns (params, metrics)."""
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
        return params, metrics

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

    def abstract_tree(self, i: int):
        """Group i's {"master", "state"} tree as ShapeDtypeStructs with their device shardings."""
        return unflatten(self.like[i], {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.shardings[i][k])
                                        for k, x in flatten(self.like[i]).items()})

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

    def masters(self, params=None):
        """The master weights as one tree of device arrays (exports of float32), placed group by
        group into one tree: a group is the only state on the devices beside it. (`params`, the
        devices' compute copy, is not needed.)"""
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

    def start(self, checkpointer, masters, resume: bool):
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

    def device_params(self, masters):
        """The compute-dtype params the devices hold for `masters`, as shapes with their shardings."""
        shardings = flatten(self.compute_sharding)
        return unflatten(masters, {k: jax.ShapeDtypeStruct(x.shape, self.compute_dtype, sharding=shardings[k])
                                   for k, x in flatten(masters).items()})

    def abstract_params(self):
        """The compute params' shapes, dtypes and shardings (a restore target)."""
        return self.device_params(self.masters_like)

    def save(self, checkpointer, step: int, params, record: dict, eval_loss: float | None = None) -> None:
        """Checkpoint `step`: the snapshot of the state first, then the Orbax step with the compute
        params and the optimizer's counters."""
        write_snapshot(checkpointer, step, self.full_specs, self.groups, lambda i: self._read(i)())
        checkpointer.save(step, params, self.counters(), record, eval_loss=eval_loss)

    def restore(self, checkpoint_dir: str, step: int, counters: dict):
        """Loads the snapshot of checkpoint `step` (written by either tier, with any group size,
        on any mesh) and the checkpoint's `counters`; returns the compute params."""
        snapshot = open_snapshot(checkpoint_dir, step, self.full_specs)
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

    # --- the memory plan ---

    def planned(self, params, acc) -> Planned:
        """One update program per kind of group (layer groups share shapes). Beside its arguments
        on the devices: the accumulator's gradients of the other groups (alive, but left out of
        its arguments, which hold only what it reads) and the groups in flight: beside a layer
        group, the previous one (being written back) and the next one (read ahead; the other
        parameters' group follows the last); beside that group, the last layer group. Host: the
        whole state (`host`), or the two groups in flight (`disk`: read ahead and written back, the
        largest such pair); disk: the whole state.

        Where the devices' memory is the host's (XLA:CPU), the `host` tier's state is there besides
        the devices' arrays, while the `disk` tier's groups in flight are the ones the devices'
        figure counts, moving between the store and the devices one array at a time: the array
        being copied is there twice (the largest of each group in flight)."""
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        scale = {"denominator": jax.ShapeDtypeStruct((), jnp.float32),
                 "grad_norm": jax.ShapeDtypeStruct((), jnp.float32)}
        first = {group.start is not None: i for i, group in reversed(list(enumerate(self.groups)))}
        sizes = {kind: bytes_per_device(self.abstract_tree(i)) for kind, i in first.items()}
        largest = {kind: max(bytes_per_device(x) for x in jax.tree.leaves(self.abstract_tree(i)))
                   for kind, i in first.items()}
        grads = flatten(acc["grads"])
        updates = {}
        # The group written back: on an accelerator its copy to the host overlaps the next update;
        # XLA:CPU has copied it into the host memory space before then (measured: it is not among
        # jax.live_arrays() when the next update starts).
        written_back = self.tier != "host" or self.mesh.devices.flat[0].platform != "cpu"
        for kind, i in first.items():
            lowered = self._update[kind].lower(params, acc, self.abstract_tree(i), scale, scalar, self.groups[i].size)
            unread = sum(bytes_per_device(g) for k, g in grads.items() if k not in self.groups[i].names)
            if kind:  # beside: the previous layer group and the next group
                beside = sizes[True] * written_back + max(sizes.values())
                in_transit = largest[True] + max(largest.values())
            else:  # beside: the last layer group
                beside, in_transit = sizes[True] * written_back, largest[True]
            updates["update_layers" if kind else "update_rest"] = (lowered, unread + beside, in_transit)
        shards = self.mesh.shape["fsdp"] * self.mesh.shape["tensor"]
        local = min(shards, jax.local_device_count())  # devices of this host holding distinct shards
        state = sum(bytes_per_device(self.abstract_tree(i)) for i in range(len(self.groups))) * local
        in_flight = (sizes[True] + max(sizes.values())) * local
        if self.tier == "host":
            return Planned(resident=0, updates={k: (lowered, beside, 0) for k, (lowered, beside, _) in updates.items()},
                           host=state, disk=0, host_apart=state)
        return Planned(resident=0, updates=updates, host=in_flight, disk=state)

    def close(self):
        self.store.close()

