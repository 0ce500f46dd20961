"""Multi-process runs: joining the job (`jax.distributed.initialize`) and failing as a whole.

One process per host (TPU pods) or per node or GPU (Slurm) runs the same command. Each process
reads only its own rows of every batch, and writes only its own shards of every checkpoint;
process 0 alone writes config, metrics and reports. The job is joined when the environment says
there are several processes:

- explicit: `JAX_COORDINATOR_ADDRESS=host:port` with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`
  (and optionally `JAX_LOCAL_DEVICE_IDS`), e.g. for a hand-started job or the tests;
- Slurm: inside `srun` with more than one task (jax reads the SLURM_* variables);
- TPU pods: `JAXSFT_DISTRIBUTED=1` (set by `launch/tpu_pod.py`) lets jax query the TPU metadata;
  GKE's `TPU_WORKER_HOSTNAMES` and multislice's `MEGASCALE_COORDINATOR_ADDRESS` are detected too.

`JAXSFT_DISTRIBUTED=0` never joins; `JAXSFT_HEARTBEAT_TIMEOUT_S` (default 100) is how long a
silent process is waited for before the others stop.

Failure: when one process dies, jax's coordination service notices its missing heartbeats and
aborts every other process ("The following tasks are unhealthy (stopped sending heartbeats)"),
so nothing waits forever in a collective. A Python exception is different: the failing process
would wait up to jax's shutdown timeout (300 s) for the others at exit while they wait for it in
their next collective. `exit_on_failure` makes it exit at once instead.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback

import jax

log = logging.getLogger("jaxsft.distributed")

_initialized = False


def _int_env(env, name):
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def initialize_args(env=None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize` that `env` asks for, or None for a
    single-process run. Pure (reads only `env`), so it is tested without starting jax."""
    env = os.environ if env is None else env
    switch = env.get("JAXSFT_DISTRIBUTED", "auto").lower()
    if switch not in ("auto", "0", "1", "false", "true"):
        raise ValueError(f"JAXSFT_DISTRIBUTED={switch!r}: expected auto, 1 or 0")
    if switch in ("0", "false"):
        return None
    args = {}
    heartbeat = _int_env(env, "JAXSFT_HEARTBEAT_TIMEOUT_S")
    if heartbeat is not None:
        args["heartbeat_timeout_seconds"] = heartbeat
    if env.get("JAX_COORDINATOR_ADDRESS"):
        num, pid = _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")
        if (num is None) != (pid is None):
            raise ValueError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID with JAX_COORDINATOR_ADDRESS "
                             "(or neither, on a cluster jax can detect)")
        if num is not None and not 0 <= pid < num:
            raise ValueError(f"JAX_PROCESS_ID={pid} is outside [0, JAX_NUM_PROCESSES={num})")
        return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": num,
                "process_id": pid, **args}
    slurm_tasks = _int_env(env, "SLURM_NTASKS") or 1
    # SLURM_STEP_NODELIST is set inside `srun` only; a bare `sbatch` shell is one process.
    if slurm_tasks > 1 and env.get("SLURM_STEP_NODELIST"):
        return args
    if switch in ("1", "true") or env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return args
    return None


def maybe_initialize_distributed(env=None) -> None:
    """Join the multi-process job described by the environment (see the module docstring);
    call before anything touches a jax device."""
    global _initialized
    args = initialize_args(env)
    if args is None or _initialized or _jax_initialized():
        return
    try:
        # Multi-process CPU (the tests) needs cross-process collectives; jax's default does not
        # span processes. The option may vanish in later jax versions, where gloo is the default.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001
        pass
    log.info("joining the distributed job: %s", args or "auto-detected (Slurm or TPU)")
    try:
        jax.distributed.initialize(**args)
    except Exception as e:
        raise RuntimeError(
            f"could not join the distributed job ({type(e).__name__}: {e}). Check that every process "
            "runs the same command, that the coordinator (process 0) address and port are reachable, "
            "and JAX_NUM_PROCESSES / JAX_PROCESS_ID (or the Slurm / TPU environment).") from e
    _initialized = True
    log.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def _jax_initialized() -> bool:
    is_init = getattr(jax.distributed, "is_initialized", None)
    return bool(is_init and is_init())


def exit_on_failure(fn):
    """In a multi-process job, an exception (or a usage error) in `fn` prints its message and ends
    this process at once with the status a single process would exit with (`jaxsft.cli.status_of`:
    2 usage, 3 checkpoint, 4 diverged, 75 preempted; 1 with a traceback for anything else), so the
    other processes are stopped by the heartbeat check within `JAXSFT_HEARTBEAT_TIMEOUT_S` instead
    of waiting for it. A preempted job, whose processes all stop together, leaves the job cleanly.
    A single-process run raises as usual."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            if not (_initialized or _jax_initialized()) or jax.process_count() == 1:
                raise
            from jaxsft.cli import PREEMPTED, status_of

            index = jax.process_index()
            known = status_of(e)
            if known is not None:
                status, message = known
            elif isinstance(e, SystemExit):
                status = e.code if isinstance(e.code, int) else 1
                message = "" if isinstance(e.code, int) else str(e.code)
            else:
                status, message = 1, "".join(traceback.format_exception(e))
            if status == PREEMPTED:  # every process saved the same step and stops here
                sys.stderr.write(f"{message}\n")
            else:
                sys.stderr.write(f"{message}\njaxsft: process {index} of {jax.process_count()} failed; "
                                 "stopping it now so that the whole job stops (the other processes exit "
                                 "when they miss its heartbeat)\n")
            sys.stderr.flush()
            sys.stdout.flush()
            logging.shutdown()
            if status == PREEMPTED:
                jax.distributed.shutdown()  # waits for the others: process 0 serves the job
            os._exit(status or 1)

    return wrapper
