"""The offloaded state of a checkpoint: a snapshot directory beside the Orbax checkpoints, with one
zarr3 array per master weight and moment in the full (layers, ...) shape whatever the group size,
and `meta.json` (the step) written last: a snapshot without it is incomplete. The Orbax step of an
offloaded run holds the compute-dtype params, the optimizer's step counters and the record.

Both offloaded tiers write and read this format, so a `host` run resumes in `disk` mode and back;
a run with optim.offload='none' resumes from it (`restore_for_none`), and `jaxsft.export` reads
its float32 master weights (`read_masters`).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from etils import epath
from jax.experimental import multihost_utils

from jaxsft.checkpoint import flatten, unflatten
from jaxsft.train.offload_store import DiskStore

META = "meta.json"


def snapshot_dir(checkpoint_dir: str, step: int) -> str:
    """Where the offloaded state of checkpoint `step` is kept: beside the checkpoint directory,
    not in it (on GCS, Orbax deletes any folder there without its commit marker as unfinished)."""
    return f"{str(checkpoint_dir).rstrip('/')}-offload/{step}"


def saved_offloaded(checkpoint_dir: str, step: int) -> bool:
    """Whether checkpoint `step` was saved by an offloaded run (it has a complete snapshot) rather
    than by one with optim.offload='none' (params = master weights, opt_state = optax's state)."""
    return (epath.Path(snapshot_dir(checkpoint_dir, step)) / META).exists()


def write_snapshot(checkpointer, step: int, specs: dict, groups: list, read_group) -> None:
    """Writes checkpoint `step`'s snapshot (`specs`: DiskStore's, of the full arrays) group by group,
    `read_group(i)` giving group i's arrays, then `meta.json`; removes the snapshots of the steps
    `checkpointer` no longer keeps. Called before the checkpoint itself is saved: a checkpoint
    that exists has its snapshot."""
    directory = snapshot_dir(checkpointer.directory, step)
    snapshot = DiskStore(directory, specs, create=True, shared=True)
    for i, group in enumerate(groups):
        snapshot.write(i, read_group(i), group).result()
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


def open_snapshot(checkpoint_dir: str, step: int, specs: dict) -> DiskStore:
    """Checkpoint `step`'s snapshot, to read (written by either tier, with any group size, on any mesh)."""
    directory = snapshot_dir(checkpoint_dir, step)
    if not (epath.Path(directory) / META).exists():
        raise FileNotFoundError(f"{directory}: the offloaded state of checkpoint {step} is missing or "
                                f"incomplete ({META} missing); was the checkpoint saved with optim.offload='none'?")
    return DiskStore(directory, specs, create=False, shared=True)


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
