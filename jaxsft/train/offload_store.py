"""Where an offloaded run's state lives between updates, group by group (`jaxsft.train.offload`):
`HostStore` keeps each group's arrays in pinned host memory (`optim.offload='host'`), `DiskStore`
in zarr3 arrays of TensorStore (`'disk'`; also the format of the checkpoints' snapshots,
`jaxsft.train.snapshot`). Both `read(i, group, shardings)` a group, returning a function that
gives its device arrays, and `write(i, arrays, group)` one, returning a future-like object.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from jax.experimental import multihost_utils

from jaxsft.sharding import index_key


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


# While reading a chunk TensorStore holds its bytes beside the decoded array, and while writing it
# holds a copy: whole-shard chunks held a 583 MB group read ahead as 963 MB (3 chunks of 194 MB,
# read at once; measured), chunks of at most this size as 598 MB.
CHUNK_BYTES = 16 * 2**20


def chunk_shape(shard: tuple, itemsize: int) -> tuple:
    """The zarr3 chunk of an array whose device shard is `shard`: its first axis longer than 1 cut
    to the largest divisor whose chunk holds at most CHUNK_BYTES (so that a shard is whole chunks
    and every process writes only its own), or left whole when no divisor gives a chunk of at
    least a sixteenth of that (tiny chunks make a file each)."""
    axis = next((i for i, n in enumerate(shard) if n > 1), 0)
    row = math.prod(shard[axis + 1:]) * itemsize
    fitting = [d for d in range(1, shard[axis] + 1) if shard[axis] % d == 0 and d * row <= CHUNK_BYTES]
    rows = max(fitting, default=shard[axis])
    if rows * row < CHUNK_BYTES / 16:
        rows = shard[axis]
    return (*shard[:axis], rows, *shard[axis + 1:])


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
    """Group state in zarr3 arrays of the full (layers, ...) shape, in chunks of at most one layer
    of one device shard (`chunk_shape`), so that any group size reads and writes whole chunks and
    every process writes only its own shards. Reads are TensorStore futures; writes run on one background thread."""

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

