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
from jaxsft.data.config import as_dict
from jaxsft.evals.gsm8k import evaluate_gsm8k, load_jsonl, write_results


def gsm8k_accuracy(config, model, tokenizer, step: int) -> dict:
    """Runs on every process (generation is collective); process 0 writes
    `output_dir/eval/gsm8k_step{step}.json`."""
    g = config.gsm8k
    shots = load_jsonl(g.shots_file) if g.k_shot else None
    set_chat_template(tokenizer, config.data.chat_template)  # prompted as training renders a user turn
    result = evaluate_gsm8k(model, tokenizer, load_jsonl(g.file), k_shot=g.k_shot, shots=shots,
                            max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                            subset=g.subset or None, system_prompt=config.data.system_prompt,
                            template_kwargs=as_dict(config.data.chat_template_kwargs))
    result["step"] = step
    if jax.process_index() == 0:
        write_results(result, rundir.join(config.train.output_dir, "eval", f"gsm8k_step{step}.json"))
    return result


def side_by_side(first: dict, last: dict, count: int) -> str:
    """The first `count` questions with the answers at two evaluation points."""
    blocks = []
    for a, b in list(zip(first["records"], last["records"]))[:count]:
        blocks.append(
            f"Q: {a['question']}\n"
            f"  expected {a['expected']}\n"
            f"  step {first['step']:>5}: {_verdict(a)}\n"
            f"  step {last['step']:>5}: {_verdict(b)}")
    return "\n\n".join(blocks)


def _verdict(record: dict, chars: int = 300) -> str:
    text = " ".join(record["output"].split())
    text = text if len(text) <= chars else text[:chars] + " [...]"
    return f"answer {record['extracted']} ({'right' if record['correct'] else 'wrong'}): {text}"


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
