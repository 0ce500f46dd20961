"""`python -m jaxsft.eval --config configs/NAME.py`: GSM8K accuracy of `model.path` as configured
in the run config's `gsm8k` section. Training calls `gsm8k_accuracy` the same way."""

from __future__ import annotations

import logging
import os

import jax

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


def main(argv=None):
    from jaxsft.cli import UsageError, parse_args
    from jaxsft.models import load_tokenizer
    from jaxsft.models.loading import model_for_run
    from jaxsft.sharding import make_mesh

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config, _ = parse_args(argv)
    if not config.gsm8k.file:
        raise UsageError("gsm8k.file is empty: set --config.gsm8k.file=PATH/test.jsonl")
    mesh = make_mesh(**config.mesh)
    model = model_for_run(config.model, mesh, seed=config.train.seed, base_quant=config.lora.base_quant)  # loaded outside: Orbax needs a concrete mesh
    with jax.set_mesh(mesh):
        result = gsm8k_accuracy(config, model, load_tokenizer(config.data.tokenizer or config.model.path), step=0)
    print(f"GSM8K accuracy {result['accuracy']:.3f} ({result['correct']}/{result['total']}), "
          f"written to {os.path.join(config.train.output_dir, 'eval')}")


if __name__ == "__main__":
    main()
