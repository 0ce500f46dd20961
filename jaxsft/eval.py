"""`python -m jaxsft.eval --config configs/NAME.py`: evaluate `model.path` (or `--model SOURCE`).

Without `--tasks`: jaxsft's GSM8K eval as the config's `gsm8k` section sets it (0-shot chat
prompts; training calls `gsm8k_accuracy` the same way). With `--tasks mmlu,gsm8k,arc_easy`:
lm-evaluation-harness's tasks through the jaxsft backend, as the config's `lm_eval` section sets it
(`--num-fewshot N`, `--limit N`, `--apply-chat-template`, `--include-path DIR`, `--batch-size N`
override it); lm-eval's results JSON goes to `--output` (default
`output_dir/eval/lm_eval.json`) and one summary line to stdout.
`--model` takes anything `jaxsft.load_model` reads, a training run, its checkpoint directory or a
step (a LoRA run's adapters merged into its base).
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from jaxsft import rundir
from jaxsft.data import set_chat_template
from jaxsft.evals.gsm8k import gsm8k_accuracy


# Flags of `--tasks` runs, and the `lm_eval` config field each sets.
LM_EVAL_FLAGS = {"tasks": "tasks", "num-fewshot": "num_fewshot", "limit": "limit",
                 "apply-chat-template": "apply_chat_template", "include-path": "include_path", "batch-size": "batch_size"}


def main(argv=None):
    from jaxsft.cli import UsageError, parse_args, set_field
    from jaxsft.models import load_tokenizer
    from jaxsft.models.loading import model_for_run
    from jaxsft.sharding import make_mesh

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config, extras = parse_args(argv, extra_flags=(*LM_EVAL_FLAGS, "model", "output"))
    for flag, key in LM_EVAL_FLAGS.items():
        if flag in extras:
            set_field(config, f"lm_eval.{key}", extras[flag])
    if not config.lm_eval.tasks and not config.gsm8k.file:
        raise UsageError("nothing to evaluate: give --tasks TASK[,TASK] (lm-eval) or --config.gsm8k.file=PATH/test.jsonl")
    if extras.get("output") and not config.lm_eval.tasks:
        raise UsageError("--output is for --tasks runs; the GSM8K eval writes to train.output_dir/eval")
    mesh = make_mesh(**config.mesh)
    # Loaded outside set_mesh: Orbax needs a concrete mesh.
    if extras.get("model"):
        from jaxsft.evals.lm_eval_backend import load_for_eval
        model, tokenizer = load_for_eval(extras["model"], mesh, jnp.dtype(config.model.compute_dtype))
    else:
        model = model_for_run(config.model, mesh, seed=config.train.seed, base_quant=config.lora.base_quant)
        tokenizer = load_tokenizer(config.data.tokenizer or config.model.path)
    if config.lm_eval.tasks:
        from jaxsft.evals.lm_eval_backend import ModelCalls, run_tasks, summary, write_results

        set_chat_template(tokenizer, config.data.chat_template)
        with jax.set_mesh(mesh):
            results = run_tasks(config.lm_eval, ModelCalls(model, tokenizer, mesh))
        if results is not None:
            out = extras.get("output") or rundir.join(config.train.output_dir, "eval", "lm_eval.json")
            write_results(results, out)
            print(f"{summary(results)} (written to {out})")
        return
    with jax.set_mesh(mesh):
        result = gsm8k_accuracy(config, model, tokenizer, step=0)
    print(f"GSM8K accuracy {result['accuracy']:.3f} ({result['correct']}/{result['total']}), "
          f"written to {os.path.join(config.train.output_dir, 'eval')}")


if __name__ == "__main__":
    main()
