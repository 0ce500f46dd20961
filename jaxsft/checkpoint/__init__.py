"""Orbax checkpoints of a training run.

A training checkpoint (`Checkpointer`) holds params, optimizer state and a JSON record (step,
data iterator state, RNG seeds, config, and a fingerprint of every array). Saves are
asynchronous: `save` returns once the arrays are copied off the device and the files are
written in the background; every process writes only its own shards, so no host ever holds the
whole model. Orbax writes each step into a temporary directory and renames it when complete, so
a kill at any moment leaves the previous steps intact; a step that is nevertheless unreadable or
whose arrays do not match their fingerprints is set aside with a warning and the one before it
is used.

A LoRA run's checkpoint holds the adapters as its params (and their optimizer state) plus, in
the record, a fingerprint of the frozen base weights (`base_fingerprint`): resuming onto another
base model is refused.

Trees are stored as flat dicts keyed by readable paths ("layers.q", "1.0.mu.layers.q"), so a
mismatch between a checkpoint and the run restoring it can be reported by name and shape.

The converted-model format (`python -m jaxsft.convert`) lives in `jaxsft.models.converted`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from jaxsft.sharding import path_name

log = logging.getLogger("jaxsft.checkpoint")

def flatten(tree) -> dict[str, jax.Array]:
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(like, flat: dict):
    keys = list(flatten(like))
    return jax.tree.unflatten(jax.tree.structure(like), [flat[k] for k in keys])


def abstract(tree):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in flatten(tree).items()}


START_AFRESH = ("To start this run afresh, point checkpoint.dir elsewhere, or set checkpoint.resume=False "
                "with checkpoint.overwrite=True (moves the steps aside).")


class CheckpointMismatch(ValueError):
    """A checkpoint whose arrays do not fit the run's model or optimizer."""


class CheckpointCorrupt(ValueError):
    """A checkpoint whose files are unreadable or whose arrays differ from what was saved."""


def _bits(x):
    # An order-free checksum (wrapping uint32 sum of the raw bits): the same on any mesh, computed
    # on the devices where the shards live, so only one number per array reaches the host.
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        u = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    return jnp.sum(u, dtype=jnp.uint32)


_bits_jit = jax.jit(_bits)


def fingerprints(flat: dict) -> dict[str, int]:
    """Checksums of the arrays in device memory (host-offloaded ones are skipped: computing on
    them would pull them back to the device)."""
    on_device = {k: v for k, v in flat.items()
                 if getattr(v.sharding, "memory_kind", None) in (None, "device")}
    # One call per array: arrays may live on different device sets (a scalar on one device).
    return {k: int(v) for k, v in jax.device_get({k: _bits_jit(v) for k, v in on_device.items()}).items()}


def base_fingerprint(frozen) -> str:
    """A digest of a LoRA run's frozen base weights: every array's name, shape, dtype and checksum."""
    flat = flatten(frozen)
    sums = fingerprints(flat)
    described = {k: [list(v.shape), str(v.dtype), sums.get(k)] for k, v in flat.items()}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


class Checkpointer:
    """Saves every step it is given, keeps the newest `keep` (plus, with `keep_best`, the
    `keep_best` with the lowest eval loss), and restores the newest usable one. `base_model`:
    the `base_fingerprint` of a LoRA run's base weights, recorded and checked on restore."""

    def __init__(self, directory: str, keep: int = 2, keep_best: int = 0, base_model: str | None = None,
                 config: dict | None = None):
        """config: the run's config as a dict, to name what changed when a checkpoint does not fit."""
        self.directory = str(directory)
        self.base_model = base_model
        self.config = config
        self.policies = [LatestN(keep)]
        if keep_best:
            self.policies.append(BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=keep_best,
                                       keep_checkpoints_without_metrics=False))
        self.manager = self._new_manager()

    def _new_manager(self):
        return ocp.CheckpointManager(
            self.directory,
            item_handlers={"params": ocp.StandardCheckpointHandler(),
                           "opt_state": ocp.StandardCheckpointHandler(),
                           "record": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                preservation_policy=AnyPreservationPolicy(self.policies),
                # Temporary directories of saves cut short by a kill are removed at start-up.
                cleanup_tmp_directories=True,
                enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, record: dict, eval_loss: float | None = None) -> None:
        flat_params, flat_opt = flatten(params), flatten(opt_state)
        record = {**record, "fingerprints": {"params": fingerprints(flat_params),
                                             "opt_state": fingerprints(flat_opt)}}
        if self.base_model is not None:
            record["base_model"] = self.base_model
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(flat_params),
            opt_state=ocp.args.StandardSave(flat_opt),
            record=ocp.args.JsonSave(record)),
            metrics=None if eval_loss is None else {"eval_loss": float(eval_loss)}, force=True)

    def restore(self, step: int, params, opt_state):
        """Restores step `step` onto the shardings of `params` / `opt_state` (any mesh).
        Raises CheckpointMismatch (wrong model/optimizer) or CheckpointCorrupt."""
        try:
            metadata = self.manager.item_metadata(step)
        except Exception as e:  # an unreadable metadata file
            raise CheckpointCorrupt(f"{type(e).__name__}: {e}") from e
        try:
            _check_shapes(metadata, step, "params", params)
            _check_shapes(metadata, step, "opt_state", opt_state)
        except CheckpointMismatch as e:
            raise CheckpointMismatch(str(e).replace("{changed}", self._changed_since(step))) from None
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract(params)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state)),
                record=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointCorrupt(f"{type(e).__name__}: {e}") from e
        record = restored["record"]
        if not isinstance(record, dict) or "step" not in record:
            raise CheckpointCorrupt("the record (step, data state, config) is missing or unreadable")
        if record.get("base_model") != self.base_model:
            raise CheckpointMismatch(
                f"checkpoint step {step} was trained on another base model (fingerprint "
                f"{record.get('base_model')}, this run's base: {self.base_model}); LoRA adapters only fit "
                f"the weights they were trained on. {START_AFRESH}")
        for item in ("params", "opt_state"):
            saved = record.get("fingerprints", {}).get(item, {})
            now = fingerprints(restored[item])
            bad = [k for k in saved if k in now and now[k] != saved[k]]
            if bad:
                raise CheckpointCorrupt(f"{item} arrays differ from what was saved: {', '.join(bad[:8])}")
        return unflatten(params, restored["params"]), unflatten(opt_state, restored["opt_state"]), record

    def _changed_since(self, step: int) -> str:
        """'changed since it was saved: FIELD old -> new; ' from the step's recorded config."""
        if self.config is None:
            return ""
        try:
            record = self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
        except Exception:  # noqa: BLE001  (only a hint: the mismatch itself is reported)
            return ""
        fields = changed_fields(record.get("config", {}), self.config)
        return f"changed since it was saved: {', '.join(fields)}. " if fields else ""

    def restore_latest(self, params, opt_state):
        """The newest usable step, as `restore` gives it, or None when there is none. Unusable
        steps are renamed `STEP.corrupt-TIME` (kept for inspection, out of Orbax's way)."""
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                return self.restore(step, params, opt_state)
            except CheckpointCorrupt as e:
                log.warning("checkpoint %s/%d is unusable, falling back to the previous one: %s",
                            self.directory, step, str(e)[:500])
                # Every process judged the same step (the checks use global arrays); the others
                # wait until process 0 has moved it before listing the steps again.
                multihost_utils.sync_global_devices(f"jaxsft checkpoint {step} unusable")
                if jax.process_index() == 0:
                    path = epath.Path(self.directory) / str(step)
                    path.rename(path.parent / f"{step}.corrupt-{int(time.time())}")
                multihost_utils.sync_global_devices(f"jaxsft checkpoint {step} set aside")
                self.manager.reload()
        if steps:
            raise CheckpointCorrupt(
                f"no usable checkpoint in {self.directory} (steps {steps} were all unreadable and were "
                f"renamed *.corrupt-*). {START_AFRESH}")
        return None

    def set_aside_or_refuse(self, overwrite: bool) -> None:
        """For a run that starts afresh (checkpoint.resume=False): refuses (ConfigError) when the
        directory holds steps, unless `overwrite`, which moves the directory to
        `DIR.overwritten-TIME` (process 0; the others wait) and starts with an empty one."""
        from jaxsft.models.config import ConfigError

        steps = self.all_steps()
        if not steps:
            return
        if not overwrite:
            raise ConfigError(
                f"checkpoint.resume=False but {self.directory} holds steps {steps}: saving there would "
                "collide with them (or a later resume would pick them). Set checkpoint.overwrite=True to "
                "move them aside, or point checkpoint.dir elsewhere.")
        self.manager.close()
        aside = f"{self.directory.rstrip('/')}.overwritten-{int(time.time())}"
        multihost_utils.sync_global_devices("jaxsft checkpoints set aside: start")
        if jax.process_index() == 0:
            epath.Path(self.directory).rename(aside)
            log.warning("checkpoint.overwrite: moved steps %s of %s to %s", steps, self.directory, aside)
        multihost_utils.sync_global_devices("jaxsft checkpoints set aside: done")
        self.manager = self._new_manager()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _check_shapes(metadata, step, item, like):
    """Raises CheckpointMismatch (one line) when `like`'s keys, shapes or dtypes differ from the
    saved ones. Checked before restoring: Orbax would cast a changed dtype, and the cast arrays'
    checksums would then make a good step look corrupt."""
    stored = metadata[item]
    if stored is None:
        return
    stored = {k: (tuple(v.shape), str(v.dtype)) for k, v in stored.items()}
    wanted = {k: (tuple(v.shape), str(v.dtype)) for k, v in flatten(like).items()}
    problems = [f"{k} is missing in the checkpoint" for k in wanted if k not in stored]
    problems += [f"{k} is not in this run" for k in stored if k not in wanted]
    problems += [f"{k}: checkpoint {_describe(stored[k])}, run {_describe(wanted[k])}"
                 for k in wanted if k in stored and stored[k] != wanted[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointMismatch(
            f"checkpoint step {step} ({item}) does not fit this run: " + "; ".join(problems[:3]) + more
            + f"; {{changed}}{START_AFRESH}")


def _describe(shape_dtype):
    shape, dtype = shape_dtype
    return f"{dtype}{list(shape)}"


def changed_fields(saved: dict, config: dict, sections=("model", "optim", "lora")) -> list[str]:
    """`section.key saved -> now` for the fields of `sections` that differ between a checkpoint's
    recorded config and this run's (what shapes and dtypes of the saved state follow from)."""
    out = []
    for section in sections:
        before, now = saved.get(section, {}), config.get(section, {})
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                out.append(f"{section}.{key} {before.get(key)!r} -> {now.get(key)!r}")
    return out
