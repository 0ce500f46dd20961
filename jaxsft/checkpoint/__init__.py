"""Orbax checkpoints of a training run: params, optimizer state, and a JSON record (step, data
iterator state, config). Saves are asynchronous; every process writes its own shards.

Trees are stored as flat dicts keyed by readable paths ("layers.q", "1.0.mu.layers.q"), so a
mismatch between a checkpoint and the run restoring it can be reported by name and shape.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from jaxsft.sharding import path_name


def flatten(tree) -> dict[str, jax.Array]:
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(like, flat: dict):
    keys = list(flatten(like))
    return jax.tree.unflatten(jax.tree.structure(like), [flat[k] for k in keys])


def abstract(tree):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in flatten(tree).items()}


class CheckpointMismatch(ValueError):
    """A checkpoint whose arrays do not fit the run's model or optimizer."""


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, record: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(flatten(params)),
            opt_state=ocp.args.StandardSave(flatten(opt_state)),
            record=ocp.args.JsonSave(record)), force=True)

    def restore(self, step: int, params, opt_state):
        """Restores onto the shardings of `params` / `opt_state` (any mesh)."""
        _check_shapes(self.manager, step, "params", params)
        _check_shapes(self.manager, step, "opt_state", opt_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params)),
            opt_state=ocp.args.StandardRestore(abstract(opt_state)),
            record=ocp.args.JsonRestore()))
        return (unflatten(params, restored["params"]), unflatten(opt_state, restored["opt_state"]),
                restored["record"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _check_shapes(manager, step, item, like):
    stored = manager.item_metadata(step)[item]
    if stored is None:
        return
    stored = {k: tuple(v.shape) for k, v in stored.items()}
    wanted = {k: tuple(v.shape) for k, v in flatten(like).items()}
    problems = [f"missing in checkpoint: {k}" for k in wanted if k not in stored]
    problems += [f"not in this run: {k}" for k in stored if k not in wanted]
    problems += [f"{k}: checkpoint {stored[k]}, run {wanted[k]}"
                 for k in wanted if k in stored and stored[k] != wanted[k]]
    if problems:
        raise CheckpointMismatch(
            f"checkpoint step {step} ({item}) does not fit this run:\n  " + "\n  ".join(problems[:20]))


