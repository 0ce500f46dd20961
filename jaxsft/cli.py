"""Config files and command-line overrides shared by every `python -m jaxsft.*` entry point.

`--config configs/NAME.py[:ARG]` loads `get_config(ARG)` from that file; `--config.a.b=value`
overrides a field. A mistyped key or a value of the wrong type is a one-line error naming the key
and the closest valid ones, not a traceback. `exit_statuses` gives the errors a user acts on one
line and a status each (2 usage, 3 checkpoint, 4 divergence, 75 preempted).
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import os
import sys

import ml_collections


class UsageError(SystemExit):
    """A usage mistake: `error: MESSAGE` on stderr, no traceback (status 2 inside `exit_statuses`)."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


# Exit statuses of the errors a user acts on; 1 is a bug or a failing environment, with its traceback.
# PREEMPTED (EX_TEMPFAIL of sysexits.h, "try again later"): the run saved its step on a preemption
# notice; the same command resumes it (launch/ relaunches on it).
USAGE, CHECKPOINT, DIVERGED, PREEMPTED = 2, 3, 4, 75


def status_of(e: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) for an error a user acts on; None for anything else."""
    from jaxsft.checkpoint import CheckpointCorrupt, CheckpointMismatch
    from jaxsft.data import DataError
    from jaxsft.metrics.health import TrainingDiverged
    from jaxsft.models import CheckpointError, ConfigError
    from jaxsft.train.preemption import Preempted
    from jaxsft.writer_lock import RunDirInUse

    if isinstance(e, UsageError):
        return USAGE, e.code
    if isinstance(e, (ConfigError, DataError, RunDirInUse)):
        return USAGE, f"error: {e}"
    if isinstance(e, (CheckpointCorrupt, CheckpointMismatch, CheckpointError)):
        return CHECKPOINT, f"checkpoint error: {e}"
    if isinstance(e, TrainingDiverged):
        return DIVERGED, f"training diverged: {e}"
    if isinstance(e, Preempted):
        return PREEMPTED, f"preempted: {e}"
    return None


@contextlib.contextmanager
def exit_statuses():
    """Ends the process with one line on stderr and a status of its own for the errors a user acts
    on: USAGE for config and usage mistakes and unusable data, CHECKPOINT for a corrupt checkpoint,
    one that does not match the run, or a model folder that cannot be loaded, DIVERGED for a run
    stopped by a health check, PREEMPTED for a run that saved and stopped on a preemption notice.
    Anything else (a JAX shape error, a bug) raises on: a traceback, status 1."""
    try:
        yield
    except (Exception, UsageError) as e:
        known = status_of(e)
        if known is None:
            raise
        _exit(*known)


def _exit(status: int, message: str):
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    raise SystemExit(status) from None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise UsageError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"jaxsft_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UsageError(f"{path} has no get_config() function")
    config = module.get_config(arg) if arg else module.get_config()
    return config


def all_keys(config, prefix="") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(all_keys(v, prefix + k + "."))
    return keys


def set_field(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            _unknown(config, key)
        node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        _unknown(config, key)
    old = node[leaf]
    value = parse_value(raw, old)
    try:
        with node.ignore_type() if old is None else contextlib.nullcontext():
            node[leaf] = value
    except TypeError as e:
        raise UsageError(f"--config.{key}={raw}: {e}") from None


def parse_value(raw: str, old):
    if isinstance(old, str):  # a list of names where a field also takes one (lora.target_modules)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else raw
    if isinstance(old, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise UsageError(f"expected true or false, got {raw!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)):
        value = type(old)(value)
    return value


def _unknown(config, key):
    close = difflib.get_close_matches(key, all_keys(config), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join('--config.' + c for c in close)}?" if close else ""
    raise UsageError(f"unknown config key --config.{key}{hint}")


def parse_args(argv: list[str] | None = None, extra_flags: tuple[str, ...] = ()):
    """Returns (config, {extra flag: value}). Accepts `--flag=value` and `--flag value`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pairs = []
    while argv:
        arg = argv.pop(0)
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if not argv:
                raise UsageError(f"--{name} needs a value")
            value = argv.pop(0)
        pairs.append((name, value))
    specs = [v for n, v in pairs if n == "config"]
    if len(specs) != 1:
        raise UsageError("give exactly one --config configs/NAME.py")
    config = load_config_file(specs[0])
    extras = {}
    for name, value in pairs:
        if name == "config":
            continue
        if name.startswith("config."):
            set_field(config, name.removeprefix("config."), value)
        elif name in extra_flags:
            extras[name] = value
        else:
            known = ["--config", "--config.KEY"] + [f"--{f}" for f in extra_flags]
            raise UsageError(f"unknown flag --{name}; known flags: {', '.join(known)}")
    return config, extras
