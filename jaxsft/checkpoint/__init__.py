"""Orbax checkpoints of a training run, and converted models that later runs start from.

A training checkpoint (`Checkpointer`) holds params, optimizer state and a JSON record (step,
data iterator state, RNG seeds, config, and a fingerprint of every array). Saves are
asynchronous: `save` returns once the arrays are copied off the device and the files are
written in the background; every process writes only its own shards, so no host ever holds the
whole model. Orbax writes each step into a temporary directory and renames it when complete, so
a kill at any moment leaves the previous steps intact; a step that is nevertheless unreadable or
whose arrays do not match their fingerprints is set aside with a warning and the one before it
is used.

Trees are stored as flat dicts keyed by readable paths ("layers.q", "1.0.mu.layers.q"), so a
mismatch between a checkpoint and the run restoring it can be reported by name and shape.

A converted model (`save_converted` / `load_converted`, made by `python -m jaxsft.convert`) is a
folder with the params as an Orbax checkpoint in `params/`, the model's config.json and tokenizer
files beside it, and the marker file `jaxsft_checkpoint.json`.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from jaxsft.sharding import path_name

log = logging.getLogger("jaxsft.checkpoint")

MARKER = "jaxsft_checkpoint.json"


def flatten(tree) -> dict[str, jax.Array]:
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(like, flat: dict):
    keys = list(flatten(like))
    return jax.tree.unflatten(jax.tree.structure(like), [flat[k] for k in keys])


def abstract(tree):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in flatten(tree).items()}


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


class Checkpointer:
    """Saves every step it is given, keeps the newest `keep` (plus, with `keep_best`, the
    `keep_best` with the lowest eval loss), and restores the newest usable one."""

    def __init__(self, directory: str, keep: int = 2, keep_best: int = 0):
        self.directory = str(directory)
        policies = [LatestN(keep)]
        if keep_best:
            policies.append(BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=keep_best,
                                  keep_checkpoints_without_metrics=False))
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"params": ocp.StandardCheckpointHandler(),
                           "opt_state": ocp.StandardCheckpointHandler(),
                           "record": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                preservation_policy=AnyPreservationPolicy(policies),
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
        _check_shapes(metadata, step, "params", params)
        _check_shapes(metadata, step, "opt_state", opt_state)
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
        for item in ("params", "opt_state"):
            saved = record.get("fingerprints", {}).get(item, {})
            now = fingerprints(restored[item])
            bad = [k for k in saved if k in now and now[k] != saved[k]]
            if bad:
                raise CheckpointCorrupt(f"{item} arrays differ from what was saved: {', '.join(bad[:8])}")
        return unflatten(params, restored["params"]), unflatten(opt_state, restored["opt_state"]), record

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
                if jax.process_index() == 0:
                    path = epath.Path(self.directory) / str(step)
                    path.rename(path.parent / f"{step}.corrupt-{int(time.time())}")
                self.manager.reload()
        if steps:
            raise CheckpointCorrupt(
                f"no usable checkpoint in {self.directory} (steps {steps} were all unreadable and were "
                "renamed *.corrupt-*); delete them, or set checkpoint.dir elsewhere, to start afresh")
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _check_shapes(metadata, step, item, like):
    stored = metadata[item]
    if stored is None:
        return
    stored = {k: tuple(v.shape) for k, v in stored.items()}
    wanted = {k: tuple(v.shape) for k, v in flatten(like).items()}
    problems = [f"missing in checkpoint: {k} {wanted[k]}" for k in wanted if k not in stored]
    problems += [f"not in this run: {k} {stored[k]}" for k in stored if k not in wanted]
    problems += [f"{k}: checkpoint {stored[k]}, run {wanted[k]}"
                 for k in wanted if k in stored and stored[k] != wanted[k]]
    if problems:
        raise CheckpointMismatch(
            f"checkpoint step {step} ({item}) was saved by another model or optimizer and does not "
            "fit this run:\n  " + "\n  ".join(problems[:20]) + "\nPoint checkpoint.dir elsewhere, "
            "or set checkpoint.resume=False, to start this run afresh.")


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop lines of a metrics file logged after `last_step`, so that a resumed run continues the
    file without duplicating the steps it repeats."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError):  # a line cut short by the kill
            pass
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


# --- converted models and reading params for export ---

def is_converted(path) -> bool:
    path = str(path)
    try:
        return bool(path) and (epath.Path(path) / MARKER).exists()
    except Exception:
        return False


def save_converted(model, tokenizer_dir: str | None, out: str, extra_files=()) -> None:
    """Write `model`'s params (an Orbax checkpoint in `out/params`), its config.json and the
    tokenizer files of `tokenizer_dir`, then the marker file last (it means: complete)."""
    from jaxsft.models.hf_io import hf_config_dict
    from flax import nnx

    out_path = epath.Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    params = flatten(nnx.state(model, nnx.Param))
    dtype = next(iter(params.values())).dtype
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out_path / "params", params, force=True)
    if jax.process_index() != 0:
        return
    c = model.config
    (out_path / "config.json").write_text(json.dumps(hf_config_dict(c, dtype), indent=2))
    if c.hf_generation_config:
        (out_path / "generation_config.json").write_text(json.dumps(dict(c.hf_generation_config), indent=2))
    for f in extra_files:
        (out_path / os.path.basename(f)).write_bytes(epath.Path(f).read_bytes())
    (out_path / MARKER).write_text(json.dumps({"format": 1, "dtype": jnp.dtype(dtype).name}))


def restore_params(item_dir: str, config, dtype, compute_dtype, mesh=None, rules=None):
    """A Decoder for `config` whose params are read from an Orbax params item (a converted
    model's `params/` or a training checkpoint's `STEP/params`), each shard straight onto its
    device (any mesh), cast to `dtype`."""
    from flax import nnx

    from jaxsft.models import Decoder
    from jaxsft.sharding import param_shardings

    abstract_model = nnx.eval_shape(lambda: Decoder(config, param_dtype=dtype, compute_dtype=compute_dtype))
    graphdef, state = nnx.split(abstract_model)
    shardings = param_shardings(state, mesh, rules)
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)
              for (k, v), s in zip(flatten(state).items(), flatten(shardings).values())}
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(item_dir)
            stored = getattr(stored, "item_metadata", stored)
        except Exception as e:
            raise CheckpointCorrupt(f"{item_dir}: not a readable params checkpoint ({e})") from e
        problems = [f"missing: {k} {tuple(v.shape)}" for k, v in target.items() if k not in stored]
        problems += [f"{k}: checkpoint {tuple(stored[k].shape)}, config.json {tuple(v.shape)}"
                     for k, v in target.items() if k in stored and tuple(stored[k].shape) != v.shape]
        if problems:
            raise CheckpointMismatch(f"{item_dir} does not match its model config:\n  " + "\n  ".join(problems[:20]))
        # Orbax casts to the target dtype while reading.
        flat = ckptr.restore(item_dir, {k: target[k] for k in stored if k in target})
    return nnx.merge(graphdef, unflatten(state, flat))


def load_converted(path: str, dtype=jnp.float32, compute_dtype=jnp.bfloat16, mesh=None, rules=None,
                   **run_options):
    """A converted model folder (local or gs://) -> a sharded Decoder; the same signature as
    `jaxsft.models.load_model`."""
    from jaxsft.models import ModelConfig
    from jaxsft.models.hf_io import local_dir

    folder = local_dir(path)  # config.json and tokenizer files only; params are read in place
    config = ModelConfig.from_json_file(os.path.join(folder, "config.json"), **run_options)
    gen_path = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            config = config.replace(hf_generation_config=json.load(f))
    return restore_params(_join(path, "params"), config, dtype, compute_dtype, mesh, rules)


def _join(path, name):
    return str(path).rstrip("/") + "/" + name if str(path).startswith("gs://") else os.path.join(os.path.abspath(path), name)


def find_params(path: str) -> tuple[str, dict | None]:
    """Where the params of `path` are, and the training record if it is a training checkpoint.
    `path`: a converted model, a step directory (`.../checkpoints/8`), a checkpoint directory
    (its newest step) or a run directory (its `checkpoints/`)."""
    p = epath.Path(path)
    if (p / MARKER).exists():
        return _join(path, "params"), None
    if (p / "checkpoints").exists() and not (p / "params").exists():
        return find_params(_join(path, "checkpoints"))
    if (p / "params").exists() and (p / "record").exists():
        step_dir = str(path)
    else:
        steps = sorted(int(d.name) for d in p.iterdir() if d.name.isdigit() and (d / "record").exists()) \
            if p.exists() else []
        if not steps:
            raise FileNotFoundError(
                f"{path}: not a converted model ({MARKER}), a training checkpoint step, or a directory of them")
        step_dir = _join(path, str(steps[-1]))
    record = json.loads(epath.Path(_join(step_dir, "record")).joinpath("metadata").read_text()) \
        if (epath.Path(step_dir) / "record" / "metadata").exists() else None
    return _join(step_dir, "params"), record
