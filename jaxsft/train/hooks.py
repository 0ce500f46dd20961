"""What a run does between steps, each at its interval: evaluations, then checkpoints (so a
checkpoint keeps the held-out loss of its step).

An eval is registered by name with `register_eval`: a factory that takes the run config and
returns an `Eval` (or None when the config leaves it off). Every registered eval runs before the
first step (`train.eval_at_start`), every `every` steps, and at the end; its result is kept in
`run.history[name]` and its figures go to eval.jsonl (one line per step) and the metrics sinks. The held-out loss
and GSM8K accuracy are two such evals, lm-evaluation-harness tasks (`lm_eval.*`) a third; a user adds one the same way:

    @register_eval("my_eval")
    def my_eval(config):
        return Eval("my_eval", every=100, run=lambda run, step: {"my_metric": ...})
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp

from jaxsft import rundir
from jaxsft.models.hf_io import hf_config_dict

if TYPE_CHECKING:
    from jaxsft.train.setup import Run


@dataclasses.dataclass(frozen=True)
class Eval:
    name: str
    every: int  # also every N steps (0: before training and at the end only)
    run: Callable[["Run", int], dict]  # (run, step) -> its result, kept in run.history[name]
    figures: Callable[[dict], dict] = dict  # result -> the numbers logged to eval.jsonl


@dataclasses.dataclass(frozen=True)
class Hook:
    """Something the loop calls after step `every`, `2 * every`, ... once that step's evals ran
    (never at the last step, which `finish` handles)."""
    name: str
    every: int
    call: Callable[["Run", int], None]


EVAL_FACTORIES: dict[str, Callable] = {}


def register_eval(name: str):
    def register(factory):
        EVAL_FACTORIES[name] = factory
        return factory
    return register


def make_evals(config) -> list[Eval]:
    return [e for e in (factory(config) for factory in EVAL_FACTORIES.values()) if e is not None]


def make_hooks(config) -> list[Hook]:
    return [Hook("checkpoint", config.checkpoint.every_steps, save_checkpoint)] if config.checkpoint.every_steps else []


def run_evals(run: "Run", evals: list[Eval], step: int) -> None:
    """Runs `evals` at `step`; their figures make one line of eval.jsonl."""
    figures = {}
    for e in evals:
        result = {**e.run(run, step), "step": step}
        run.history.setdefault(e.name, []).append(result)
        figures.update(e.figures(result))
    figures.pop("step", None)
    if figures and run.logger:
        run.logger.log_eval(step, figures)


def eval_loss_at(run: "Run", step: int) -> float | None:
    """The held-out loss measured at `step`, if one was (checkpoints keep the best by it)."""
    for result in reversed(run.history.get("heldout_loss", [])):
        if result["step"] == step:
            return result.get("eval_loss")
    return None


def checkpoint_record(run: "Run", step: int) -> dict:
    """What a checkpoint stores besides the arrays: enough to resume the run exactly and to
    export the model from the checkpoint alone (`python -m jaxsft.export`)."""
    c = run.config
    return {"step": step, "data": run.data.get_state(),
            # No randomness is drawn during training: init and data order come from these seeds.
            "rng": {"train.seed": c.train.seed, "data.seed": c.data.seed},
            "config": c.to_dict(),
            "model_config": hf_config_dict(run.model_config, jnp.dtype(c.model.param_dtype)),
            "generation_config": dict(run.model_config.hf_generation_config),
            "tokenizer_dir": rundir.tokenizer_dir(c.train.output_dir)}


def save_checkpoint(run: "Run", step: int) -> None:
    # The step's metrics line is logged (and a gs:// metrics file rewritten) before its
    # checkpoint exists, so a run resumed from it has every line.
    run.step_metrics.flush()
    if run.logger:
        run.logger.flush()
    run.state.save(run.checkpointer, step, run.params, checkpoint_record(run, step), eval_loss=eval_loss_at(run, step))


def to_global(batch: dict, sharding) -> dict:
    """Each process's rows of a micro-batch -> one global array per key."""
    n = jax.process_count()
    return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n, *v.shape[1:]))
            for k, v in batch.items()}


@register_eval("heldout_loss")
def heldout_loss(config) -> Eval:
    def measure(run: "Run", step: int) -> dict:
        total, count = 0.0, 0.0
        for batch in run.eval_batches:
            s, c = run.fns.eval_loss(run.params, to_global(batch, run.batch_sharding))
            total, count = total + float(s), count + float(c)
        return {"eval_loss": total / count} if count else {}
    return Eval("heldout_loss", config.train.eval_every, measure)


@register_eval("gsm8k")
def gsm8k(config) -> Eval | None:
    if not config.gsm8k.file:
        return None
    from jaxsft.evals.gsm8k import gsm8k_accuracy

    def measure(run: "Run", step: int) -> dict:
        return gsm8k_accuracy(run.config, run.model(), run.tokenizer, step)
    return Eval("gsm8k", config.gsm8k.every, measure,
                figures=lambda r: {"gsm8k_accuracy": r["accuracy"], "gsm8k_strict_match": r["strict_match"],
                                   "gsm8k_answer_form": r["answer_form"]})


@register_eval("lm_eval")
def lm_eval_tasks(config) -> Eval | None:
    if not config.lm_eval.tasks:
        return None
    from jaxsft.evals.lm_eval_backend import ModelCalls, figures, run_tasks, write_results

    def measure(run: "Run", step: int) -> dict:
        # Process 0 drives lm-eval; the others serve its model calls and report nothing.
        results = run_tasks(run.config.lm_eval, ModelCalls(run.model(), run.tokenizer, run.mesh))
        if results is None:
            return {}
        write_results(results, rundir.join(run.output_dir, "eval", f"lm_eval_step{step}.json"))
        return figures(results)
    return Eval("lm_eval", config.lm_eval.every, measure)
