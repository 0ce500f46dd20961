"""The optimizer state of a run, one interface for every memory tier (`optim.offload`):

    start(checkpointer, masters, resume) -> (params, record or None)
        the run's starting state: the newest usable checkpoint's (with `resume`; saved in any
        tier), else fresh from `masters`, the master weights; `params` are what the devices train.
    update(params, acc, num_loss_tokens, step) -> (params, metrics)
        the step's update from the gradient accumulator, which it reads and never copies (the loop
        then zeroes it in place for the next step: `TrainStep.clear_accumulator`).
    save(checkpointer, step, params, record, eval_loss)
        checkpoint `step`.
    masters(params) -> the master weights (float32 exports)
    device_params(masters) -> the params the devices hold for these master weights, as shapes
    planned(params, acc) -> Planned: what the memory plan counts for the state.

`OnDevice` (here, `none`): optax's state on the devices; the params are the master weights.
`jaxsft.train.offload.Offloaded` (`host`, `disk`): master weights and moments in host memory or on
disk, streamed through the devices group by group; the devices hold a compute-dtype copy.
`jaxsft.train.build.build` makes the run's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxsft.sharding import bytes_per_device
from jaxsft.train.snapshot import restore_for_none


@dataclasses.dataclass
class Planned:
    """What the memory plan counts for the optimizer state, in bytes per device unless said."""
    resident: int  # on the devices between the step's calls, and not an argument of them
    # The update's programs: name -> (lowered, bytes on the devices beside its arguments, bytes held
    # twice where the devices' memory is the host's: arrays being copied between the two).
    updates: dict
    host: int  # in host memory, per host
    disk: int  # on disk, per host
    host_apart: int = 0  # of `host`, what is not also on the devices at the peak (one memory)


class OnDevice:
    """optim.offload='none': optax's state on the devices, beside the master weights, which are
    the params the devices train."""

    def __init__(self, tree, apply_update):
        """tree: optax's state (arrays, or ShapeDtypeStructs with shardings for a plan);
        apply_update: `TrainStep.apply_update`."""
        self.tree = tree
        self.apply_update = apply_update

    def start(self, checkpointer, masters, resume: bool):
        # The newest checkpoint, saved with optim.offload='none' or by an offloaded run.
        restored = restore_for_none(checkpointer, masters, self.tree) if resume else None
        if restored is None:
            return masters, None
        params, self.tree, record = restored
        return params, record

    def update(self, params, acc, num_loss_tokens, step):
        params, self.tree, metrics = self.apply_update(params, self.tree, acc, num_loss_tokens, step)
        return params, metrics

    def save(self, checkpointer, step: int, params, record: dict, eval_loss: float | None = None) -> None:
        checkpointer.save(step, params, self.tree, record, eval_loss=eval_loss)

    def masters(self, params):
        return params

    def device_params(self, masters):
        return masters

    def planned(self, params, acc) -> Planned:
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        update = self.apply_update.lower(params, self.tree, acc, scalar, scalar)
        return Planned(resident=bytes_per_device(self.tree), updates={"update": (update, 0, 0)}, host=0, disk=0)
