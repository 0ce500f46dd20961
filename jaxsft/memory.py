"""The memory plan of a run, from the compiled programs themselves, before any weight is read.

`python -m jaxsft.memory --config configs/NAME.py [--device-gib 80] [--host-gib 128] [--devices N]`
prints the plan and whether it fits (exit 0) or not (exit 1, with the cheapest change that fits);
`jaxsft.train` makes the same plan first and refuses a run that cannot fit. `--tpu v5p:2x2x1` (any
TPU slice) compiles with XLA's TPU compiler on a machine without a TPU (libtpu's compile-only client,
`pip install 'jax[tpu]'`): XLA:CPU's fusions and buffers are not an accelerator's (on a CPU without
bf16 dot instructions its bf16 matmuls are emulated), so CPU figures plan a CPU run, not a TPU's.

The train step's functions are lowered on abstract inputs (`jax.ShapeDtypeStruct`s with the run's
shardings) and compiled; XLA's `memory_analysis()` gives each program's argument, output, alias
(donated) and temporary bytes per device. The peak per device is the largest of
  accumulate: its arguments (params, accumulator, micro-batch) + temporaries + new outputs
             + what stays resident but is not an argument (the optimizer state with offload='none');
  update:    the same for the update (offload='none': params, optimizer state, accumulator);
             offloaded: one group's update (params, the accumulator's gradients of the group, the
             group's state) + the accumulator's other gradients (alive, but not its arguments)
             + the two groups in flight beside it (the next one read, the previous one being
             written back; with offload='host' on XLA:CPU the copy back is done by then).
Host bytes: the offloaded state (offload='host': all of it, this host's shards; 'disk': the two groups
in flight, read ahead and written back). Disk bytes: the whole state, in the `disk` tier's store.
Where the devices' memory is the host's (XLA:CPU) the peak is `one_memory`: the device peak, plus
the `host` tier's state, or plus the arrays a `disk` update holds twice while copying them between
the store and the devices (the largest of each group in flight).

`model.remat='auto'` plans the run with each recomputation policy of REMAT_AUTO in turn, least
recomputation first, and keeps the first whose programs fit the device (the last if none does).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys

import jax
import jax.numpy as jnp

from jaxsft.models import ConfigError, ModelConfig, lora

GiB = 2**30
# What XLA needs beyond the plan (fragmentation, collectives' buffers, the runtime).
HEADROOM = 0.9
HOST_FRACTION = 0.8  # of the host's memory the offloaded state may take
GROUP_BUDGET = 4 * GiB  # per device, for the groups of state in flight when the device size is unknown
# model.remat='auto' tries these, least recomputation (fastest step) first.
REMAT_AUTO = ("none", "dots", "full")


def parameter_count(c: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters of one layer)."""
    e, f, n, k, h = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    layer = e * (n + 2 * k) * h + n * h * e + 3 * e * f + 2 * e
    layer += (n + 2 * k) * h * c.qkv_bias + e * c.o_bias + 2 * h * c.qk_norm
    head = 0 if c.tie_word_embeddings else e * c.vocab_size
    return c.num_layers * layer + c.vocab_size * e + e + head, layer


@dataclasses.dataclass
class Plan:
    programs: dict[str, dict[str, int]]  # program -> its memory analysis (bytes per device)
    device_peak: int  # bytes per device
    peak_program: str
    host: int  # bytes per host
    disk: int  # bytes per host
    group_layers: int  # layers per streamed group (offloaded tiers)
    device_bytes: float | None = None
    host_bytes: float | None = None
    advice: str = ""
    remat: str = ""  # the recomputation policy the programs were compiled with
    remat_choice: str = ""  # model.remat='auto': which policy it chose, and why
    # XLA:CPU, whose devices' memory is the host's: the peak of both, the device peak plus what the
    # host holds apart from the devices' arrays (the `host` tier's state; the arrays a `disk` update
    # is copying between the store and the devices). 0 on other platforms.
    one_memory: int = 0

    @property
    def device_fits(self) -> bool:
        return not self.device_bytes or self.device_peak <= HEADROOM * self.device_bytes

    @property
    def host_fits(self) -> bool:
        return not self.host_bytes or self.host <= HOST_FRACTION * self.host_bytes

    @property
    def fits(self) -> bool:
        return self.device_fits and self.host_fits

    @property
    def report(self) -> str:
        lines = ["compiled memory plan, bytes per device:"]
        for name, stats in self.programs.items():
            if stats.get("refused"):
                lines.append(f"  {name:12s} peak > {stats['peak'] / GiB:7.2f} GiB  (the compiler refused it: its "
                             f"temporaries alone exceed the device)")
                continue
            lines.append(f"  {name:12s} peak {stats['peak'] / GiB:8.2f} GiB  (arguments {stats['argument'] / GiB:.2f}, "
                         f"temporaries {stats['temp'] / GiB:.2f}, resident besides {stats['resident'] / GiB:.2f})")
        lines.append(f"peak per device {self.device_peak / GiB:.2f} GiB ({self.peak_program})")
        if self.host:
            lines.append(f"host memory for the offloaded state {self.host / GiB:.2f} GiB per host")
        if self.disk:
            lines.append(f"disk for the offloaded state {self.disk / GiB:.2f} GiB per host "
                         f"(groups of {self.group_layers} layers)")
        if self.one_memory and self.one_memory != self.device_peak:
            lines.append(f"XLA:CPU (the devices' memory is the host's): peak of both {self.one_memory / GiB:.2f} GiB")
        if self.device_bytes:
            budget = HEADROOM * self.device_bytes
            lines.append(f"device memory {self.device_bytes / GiB:.1f} GiB: " + (
                "fits" if self.device_fits else
                f"does NOT fit ({self.device_peak / GiB:.1f} > {budget / GiB:.1f} GiB usable)"))
        if self.host_bytes and self.host:
            lines.append(f"host memory {self.host_bytes / GiB:.1f} GiB: " + (
                "fits" if self.host_fits else
                f"does NOT fit ({self.host / GiB:.1f} > {HOST_FRACTION * self.host_bytes / GiB:.1f} GiB usable)"))
        if self.remat_choice:
            lines.append(self.remat_choice)
        if self.advice:
            lines.append(self.advice)
        return "\n".join(lines)


_analyses = {}  # (device kind, lowered program text) -> its memory analysis (the advisor compiles variants)


def _stats(lowered, resident: int = 0, device_kind: str = "") -> dict[str, int]:
    """`lowered`'s memory analysis, compiled for `device_kind` (the same text is another program
    on another platform: an update's on one CPU device and on one TPU chip)."""
    key = device_kind, lowered.as_text()
    if key not in _analyses:
        try:
            _analyses[key] = lowered.compile().memory_analysis()
        except jax.errors.JaxRuntimeError as e:  # XLA's TPU compiler refuses what exceeds the chip
            required = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])", str(e))
            if "RESOURCE_EXHAUSTED" not in str(e) or not required:
                raise
            _analyses[key] = int(float(required[1]) * 1024 ** " KMGT".index(required[2]))
    m = _analyses[key]
    if isinstance(m, int):  # only the temporaries are known, and they alone exceed the chip
        return {"argument": 0, "output": 0, "alias": 0, "temp": m, "resident": resident,
                "peak": m + resident, "refused": True}
    new_outputs = max(m.output_size_in_bytes - m.alias_size_in_bytes, 0)
    return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes, "resident": resident,
            "peak": m.argument_size_in_bytes + new_outputs + m.temp_size_in_bytes + resident}


def lora_spec(config, model_config: ModelConfig):
    """The adapters of a LoRA run (`lora.r`, or the PEFT folder `lora.adapter_path`), else None."""
    if config.lora.adapter_path:
        from jaxsft.models import peft_io

        cfg, _ = peft_io.read_adapter(config.lora.adapter_path)
        return peft_io.spec_from_peft_config(cfg, model_config.num_layers)
    return lora.make_spec(config.lora, model_config) if config.lora.r else None


def plan(config, model_config: ModelConfig, mesh=None, device_bytes=None, host_bytes=None,
         advise: bool = True) -> Plan:
    """The run's memory plan on `mesh` (default: the config's mesh over all devices): the programs
    `jaxsft.train.build.build` makes for the loop, compiled on abstract inputs."""
    if config.model.remat == "auto":
        return _auto_remat_plan(config, model_config, mesh, device_bytes, host_bytes, advise)
    from jaxsft.sharding import bytes_per_device, make_mesh
    from jaxsft.train.build import abstract_batch, abstract_model, build
    from jaxsft.train.offload_store import group_layers_that_fit

    mesh = mesh or make_mesh(**config.mesh)
    stats = functools.partial(_stats, device_kind=mesh.devices.flat[0].device_kind)
    device_bytes = device_memory_bytes() if device_bytes is None else device_bytes  # 0: unknown
    host_bytes = host_memory_bytes() if host_bytes is None else host_bytes
    m, tier = config.model, config.optim.offload
    model_config = model_config.replace(remat=m.remat)
    _, layer = parameter_count(model_config)
    shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    state_bytes_per_param = jnp.dtype(m.param_dtype).itemsize + jnp.dtype(config.optim.state_dtype).itemsize + 4
    group_layers = 1
    if tier != "none":
        spare = HEADROOM * device_bytes if device_bytes else GROUP_BUDGET
        group_layers = group_layers_that_fit(model_config.num_layers, layer * state_bytes_per_param / shards,
                                             min(spare / 4, GROUP_BUDGET) if device_bytes else GROUP_BUDGET)
    run = build(config, abstract_model(config, model_config, lora_spec(config, model_config)), mesh,
                total_steps=1000, group_layers=group_layers, abstract=True)
    fns = run.fns
    params = run.state.device_params(run.params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    acc = jax.eval_shape(fns.zero_accumulator, params, scalar)  # with the accumulator's shardings
    batch = abstract_batch(config, mesh, run.batch_sharding)
    state = run.state.planned(params, acc)
    # Alive between the calls, beside each program's arguments: the optimizer state's resident part
    # (on the devices with offload='none'), the accumulator (from the run's first step to its last).
    acc_bytes = bytes_per_device(acc)

    programs = {"zero_accumulator": stats(_lower(fns.zero_accumulator, params, scalar), resident=state.resident),
                "accumulate": stats(_lower(fns.accumulate, acc, params, batch), resident=state.resident)}
    if config.data.eval_sources:  # the held-out loss runs between steps, the accumulator kept
        programs["eval_loss"] = stats(_lower(fns.eval_loss, params, batch), resident=state.resident + acc_bytes)
    for name, (lowered, beside, _) in state.updates.items():
        programs[name] = stats(lowered, resident=beside)
    programs["clear_accumulator"] = stats(_lower(fns.clear_accumulator, acc, scalar), resident=state.resident)
    host, disk = state.host, state.disk
    twice = {name: in_transit for name, (_, _, in_transit) in state.updates.items()}
    one_memory = 0
    if mesh.devices.flat[0].platform == "cpu":
        one_memory = max(p["peak"] + twice.get(name, 0) for name, p in programs.items()) + state.host_apart

    peak_program = max(programs, key=lambda k: programs[k]["peak"])
    result = Plan(programs, programs[peak_program]["peak"], peak_program, host, disk, group_layers,
                  device_bytes, host_bytes, remat=m.remat, one_memory=one_memory)
    if advise and not result.fits:
        result.advice = advice(config, model_config, mesh, device_bytes, host_bytes)
    return result


def _auto_remat_plan(config, model_config, mesh, device_bytes, host_bytes, advise) -> Plan:
    """model.remat='auto': the plan of the first policy of REMAT_AUTO whose programs fit the device
    (recomputation changes nothing on the host), else of the last."""
    too_big = []
    for remat in REMAT_AUTO:
        chosen = changed_config(config, {"model.remat": remat})
        result = plan(chosen, model_config, mesh, device_bytes, host_bytes, advise=False)
        if result.device_fits:
            break
        too_big.append(f"{remat!r} needs {result.device_peak / GiB:.2f} GiB")
    why = "the least recomputation that fits" if result.device_fits else "nothing fits"
    result.remat_choice = f"model.remat='auto': {remat!r}, {why}" + (f" ({'; '.join(too_big)})" if too_big else "")
    if advise and not result.fits:
        result.advice = advice(chosen, model_config, mesh, result.device_bytes, result.host_bytes)
    return result


def _lower(fn, *args):
    """Lowers a TrainStep function (a jitted function, or one with the frozen weights bound)."""
    return getattr(fn, "func", fn).lower(*getattr(fn, "args", ()), *args)


# The changes the advisor tries, cheapest first. Every one trains like the original run (the same
# arithmetic, or LoRA); float32 master weights are never traded away (bf16 masters round away
# AdamW's updates at the recipe's learning rates).
def candidates(config):
    rows = config.data.micro_batch_rows
    tries = []
    if config.optim.offload == "none":
        tries.append(("optim.offload='host' (master weights and moments in host memory)", {"optim.offload": "host"}))
    if config.model.remat not in ("full", "auto"):  # 'auto' tried 'full' already
        tries.append(("model.remat='full'", {"model.remat": "full"}))
    r = rows // 2
    while r >= 1:
        tries.append((f"data.micro_batch_rows={r}", {"data.micro_batch_rows": r}))
        r //= 2
    if config.optim.offload != "disk":
        tries.append(("optim.offload='disk' (master weights and moments on local disk)", {"optim.offload": "disk"}))
    both = {"optim.offload": "disk", "model.remat": "full", "data.micro_batch_rows": 1}
    tries.append(("optim.offload='disk', model.remat='full', data.micro_batch_rows=1", both))
    return tries


def changed_config(config, changes: dict):
    """A copy of the run config with `changes` ({'section.name': value}) applied."""
    changed = config.copy_and_resolve_references()
    for key, value in changes.items():
        section, name = key.split(".")
        changed[section][name] = value
    return changed


def advice(config, model_config, mesh, device_bytes, host_bytes) -> str:
    for text, changes in candidates(config):
        if plan(changed_config(config, changes), model_config, mesh, device_bytes, host_bytes, advise=False).fits:
            return f"to fit, set {text}"
    return ("no single change fits: use more devices (mesh.fsdp), or train LoRA adapters (lora.r=16) "
            "instead of all weights")


def device_memory_bytes() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def host_memory_bytes() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def tpu_devices(topology: str):
    """The devices of a TPU slice such as 'v5p:2x2x1' or 'v6e:1x1', for compiling without a TPU
    (libtpu's compile-only client: `pip install 'jax[tpu]'`)."""
    import importlib.util

    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--tpu {topology} compiles with libtpu, which is not installed: pip install 'jax[tpu]'")
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception:  # noqa: BLE001 - a slice smaller than a host needs its own host bounds
        dims = [int(d) for d in topology.split(":")[-1].split("x")]
        bounds = (dims + [1, 1, 1])[:3]
        return topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            chips_per_host_bounds=bounds).devices


# HBM per TPU device (one chip; v4 has two devices per chip under megacore, each with its half).
TPU_DEVICE_GIB = {"TPU v4": 16, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}


def main(argv=None):
    from jaxsft.cli import exit_statuses, parse_args
    from jaxsft.models import load_model_config
    from jaxsft.models.attention import resolve_backend
    from jaxsft.sharding import make_mesh

    with exit_statuses():
        config, extra = parse_args(argv, extra_flags=("device-gib", "host-gib", "devices", "tpu"))
        # The plan sets the recomputation policy (model.remat, or each of 'auto''s).
        model_config = load_model_config(config.model.path, attention=config.model.attention,
                                         base_quant=config.lora.base_quant)
        device_bytes = float(extra["device-gib"]) * GiB if "device-gib" in extra else None
        host_bytes = float(extra["host-gib"]) * GiB if "host-gib" in extra else None
        if "tpu" in extra:  # XLA's TPU compiler: the target's figures, not this machine's
            devices = tpu_devices(extra["tpu"])
            model_config = model_config.replace(attention=resolve_backend(
                model_config.attention, model_config.head_dim, config.model.compute_dtype, platform="tpu"))
            if device_bytes is None:  # 0: unknown
                device_bytes = TPU_DEVICE_GIB.get(devices[0].device_kind, 0) * GiB
            if host_bytes is None:  # the target's host is not this machine
                host_bytes = 0
        else:
            devices = jax.devices()[:int(extra["devices"])] if "devices" in extra else None
        mesh = make_mesh(**config.mesh, devices=devices)
        with jax.set_mesh(mesh):  # the model is traced under its mesh, as in training
            result = plan(config, model_config, mesh, device_bytes, host_bytes)
        if "tpu" in extra:
            print(f"compiled for TPU {extra['tpu']} ({len(mesh.devices.flat)} x {devices[0].device_kind})")
        elif mesh.devices.flat[0].platform == "cpu":
            print("compiled by XLA:CPU, whose fusions and buffers differ from an accelerator's; --tpu SLICE "
                  "(e.g. v5p:1x1x1) gives XLA's TPU compiler's figures")
    print(result.report)
    sys.exit(0 if result.fits else 1)


if __name__ == "__main__":
    main()
