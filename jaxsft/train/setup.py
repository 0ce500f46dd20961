"""`setup(config) -> Run`: everything a run needs before its first step, in the order it is built.

Nothing here runs a step or traces the model: `jaxsft.train.loop.train` does that, under the mesh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding

from jaxsft import memory, rundir
from jaxsft import metrics as metrics_lib
from jaxsft.checkpoint import Checkpointer, base_fingerprint
from jaxsft.compile_cache import enable_compile_cache
from jaxsft.data import DataPipeline
from jaxsft.models import ConfigError, ModelConfig, load_model_config, load_tokenizer
from jaxsft.models import gguf_export, peft_io
from jaxsft.models.hf_io import save_tokenizer as save_tokenizer_files
from jaxsft.sharding import make_mesh
from jaxsft.train.config import validate
from jaxsft.train.distributed import maybe_initialize_distributed
from jaxsft.train.hooks import Eval, Hook, make_evals, make_hooks
from jaxsft.train.build import build, run_model
from jaxsft.train.offload import Offloaded
from jaxsft.train.state import OnDevice
from jaxsft.train.step import TrainStep

log = logging.getLogger("jaxsft.train")

@dataclasses.dataclass
class Run:
    """One training run: its config and everything built from it. `train` advances `params`
    and `state`; hooks read it."""
    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    tokenizer: Any
    data: DataPipeline
    model_config: ModelConfig
    graphdef: Any
    params: Any
    state: OnDevice | Offloaded  # the optimizer state (`jaxsft.train.state`)
    fns: TrainStep
    batch_sharding: NamedSharding
    checkpointer: Checkpointer
    logger: metrics_lib.MetricsLogger | None  # process 0 only
    evals: list[Eval]
    hooks: list[Hook]
    eval_batches: list[dict]  # the held-out samples, packed once
    resumed: bool  # from a checkpoint of this run
    start: int  # the step the run continues from (0, or the restored checkpoint's)
    end: int  # the step it stops at (stop_after_steps may end it before total_steps)
    total_steps: int  # the schedule's length
    history: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # eval name -> results
    step_metrics: Any = None  # the loop's `StepMetrics`, while it runs
    frozen: Any = None  # a LoRA run's base weights (its params are the adapters)
    preempted_at: int | None = None  # the step a preemption notice stopped the loop after
    plan: memory.Plan | None = None  # the memory plan the run was checked against

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def output_dir(self) -> str:
        return self.config.train.output_dir

    def model(self, masters: bool = False):
        """The trained model as evaluations and exports see it (a LoRA run's adapters merged).
        `masters`: the master weights (float32; an offloaded run's gathered from its store)
        instead of the params the devices train with (for float32 exports)."""
        if masters and self.frozen is None:
            return nnx.merge(self.graphdef, self.state.masters(self.params))
        if self.frozen is None:
            return nnx.merge(self.graphdef, self.params)
        return peft_io.merged(nnx.merge(self.graphdef, self.params, self.frozen))


def setup(config) -> Run:
    validate(config)
    maybe_initialize_distributed()
    enable_compile_cache(config.train.compile_cache_dir)
    out = config.train.output_dir
    is_main = jax.process_index() == 0
    if is_main:
        rundir.write_text(rundir.join(out, "config.json"), config.to_json(indent=2))

    mesh = make_mesh(**config.mesh)
    m = config.model
    # The plan sets the recomputation policy (model.remat, or the one 'auto' chooses).
    model_config = load_model_config(m.path, attention=m.attention, base_quant=config.lora.base_quant)
    if model_config.base_quant and not (config.lora.r or config.lora.adapter_path):
        raise ConfigError(f"model.path={m.path!r} is quantized to NF4 (bitsandbytes 4-bit): its weights cannot be "
                          "fully fine-tuned; train LoRA adapters on it (lora.r > 0, QLoRA)")
    with jax.set_mesh(mesh):  # whatever traces the model does so under the mesh (Pallas kernels need it)
        plan = memory.plan(config, model_config, mesh)  # compiled on abstract shapes: no weight read yet
    if not plan.fits:
        raise ConfigError(f"this run does not fit in memory:\n{plan.report}")
    if m.remat == "auto":
        log.info(plan.remat_choice)
        config = memory.changed_config(config, {"model.remat": plan.remat})  # what the run compiles with

    tokenizer = load_tokenizer(config.data.tokenizer or m.path)
    if config.train.export_gguf:  # refused now, not after the run
        try:
            gguf_export.check_supported(model_config, config.train.export_gguf, tokenizer)
        except gguf_export.UnsupportedForGGUF as e:
            raise ConfigError(f"train.export_gguf: {e}") from None
    data = DataPipeline(config.data, tokenizer, num_batch_devices=mesh.shape["data"] * mesh.shape["fsdp"],
                        process_index=jax.process_index(), process_count=jax.process_count())
    if is_main:
        log.info("data: %s", json.dumps(data.summary))
        rundir.write_json(rundir.join(out, "data_summary.json"), data.summary)
    total_steps = config.train.num_steps or math.ceil(config.train.num_epochs * data.steps_per_epoch)

    model = run_model(config, mesh)
    model_config = model.config  # with what the weights' file adds (generation config)
    built = build(config, model, mesh, total_steps, plan.group_layers)
    del model
    graphdef, frozen, state, fns, batch_sharding = built.graphdef, built.frozen, built.state, built.fns, built.batch_sharding

    checkpoint_dir = rundir.absolute(config.checkpoint.dir or rundir.join(out, "checkpoints"))
    checkpointer = Checkpointer(checkpoint_dir, keep=config.checkpoint.keep, keep_best=config.checkpoint.keep_best,
                                base_model=None if frozen is None else base_fingerprint(frozen), config=config.to_dict())
    if not config.checkpoint.resume:
        checkpointer.set_aside_or_refuse(config.checkpoint.overwrite)
    if is_main:
        save_tokenizer(tokenizer, rundir.tokenizer_dir(out))
    start = 0
    # The newest usable checkpoint (saved in any tier), or the model's weights.
    params, record = state.start(checkpointer, built.params, config.checkpoint.resume)
    if record is not None:
        data.set_state(record["data"])
        start = record["step"]
        log.info("resumed from step %d", start)

    logger = metrics_lib.standard_logger(out, total_steps, config.train.progress, start, config) if is_main else None
    # stop_after_steps ends the run early without changing its schedule (which spans total_steps).
    end = max(min(total_steps, config.train.stop_after_steps or total_steps), start)
    return Run(config=config, mesh=mesh, tokenizer=tokenizer, data=data, model_config=model_config,
               graphdef=graphdef, params=params, state=state, fns=fns, batch_sharding=batch_sharding,
               checkpointer=checkpointer, logger=logger, evals=make_evals(config), hooks=make_hooks(config),
               eval_batches=data.eval_microbatches(), resumed=record is not None, start=start, end=end,
               total_steps=total_steps, frozen=frozen, plan=plan)


def save_tokenizer(tokenizer, directory: str) -> None:
    """The run's tokenizer files in `directory` (local or gs://), written once."""
    target = epath.Path(directory)
    if (target / "tokenizer_config.json").exists():
        return
    with tempfile.TemporaryDirectory() as local:
        save_tokenizer_files(tokenizer, local)
        rundir.copy_folder(local, directory)
