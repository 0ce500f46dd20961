"""GSM8K: prompts through the tokenizer's chat template, greedy generation, exact-match scoring.

Prompts match the SFT data format (`format='gsm8k'`): the question is the user turn, the full
solution ending in `#### N` the assistant turn. k-shot prompts put k training examples before the
question as earlier user/assistant turns.

Scored as lm-evaluation-harness scores its `gsm8k` task, with both of its filters: `strict-match`
takes the number on the first `#### N` line (so it also measures whether the GSM8K answer format
was learned), `flexible-extract` the last number anywhere in the output. Unlike lm-eval, which
compares strings after stripping `$`, commas and a final `.`, two answers match when they are
equal as numbers ("18.00" is 18). `accuracy` is flexible-extract's (the primary metric).
"""

from __future__ import annotations

import json
import os
import re
import time
from decimal import Decimal, InvalidOperation

from etils import epath

from jaxsft import rundir
from jaxsft.data.chat import end_of_turn_id, prompt_tokens
from jaxsft.generation import generate

# lm-evaluation-harness's gsm8k filters (lm_eval/tasks/gsm8k/gsm8k.yaml).
STRICT_MATCH = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_EXTRACT = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
PRIMARY_METRIC = "flexible-extract"


def strict_answer(text: str) -> str | None:
    """strict-match: the number after the first `#### `, normalised; None without one."""
    found = STRICT_MATCH.search(text)
    return normalize_number(found.group(1)) if found else None


def flexible_answer(text: str) -> str | None:
    """flexible-extract: the last number in `text`, normalised; None without one (or when the
    last match is not a number, e.g. an ellipsis, as lm-eval would count it wrong too)."""
    found = FLEXIBLE_EXTRACT.findall(text)
    return normalize_number(next(g for g in found[-1] if g)) if found else None


def reference_answer(answer: str) -> str | None:
    """A reference solution's final number: its `#### N` line, or else its last number."""
    return strict_answer(answer) or flexible_answer(answer)


def normalize_number(s: str) -> str | None:
    """'$1,200.50' -> '1200.5'; '18.00' -> '18'; None if `s` is not a number."""
    try:
        value = Decimal(s.replace("$", "").replace(",", "").strip().rstrip("."))
    except InvalidOperation:
        return None
    # Decimal.normalize() turns 1200 into 1.2E+3; formatting with 'f' keeps plain digits.
    return format(value.normalize(), "f") if value != 0 else "0"


def is_correct(predicted: str | None, expected: str | None) -> bool:
    return predicted is not None and expected is not None and Decimal(predicted) == Decimal(expected)


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a .jsonl file (local or gs://), one per non-empty line (GSM8K examples, metrics lines)."""
    with epath.Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def build_messages(question: str, shots=(), system_prompt: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for shot in shots:
        messages += [{"role": "user", "content": shot["question"]}, {"role": "assistant", "content": shot["answer"]}]
    return messages + [{"role": "user", "content": question}]


def build_prompt(tokenizer, question: str, shots=(), system_prompt: str | None = None,
                 template_kwargs: dict | None = None) -> list[int]:
    """Token ids of the chat-templated conversation, ending with the assistant turn's header:
    exactly what training (`format='gsm8k'`, same system prompt and template kwargs) puts before
    the reply."""
    return prompt_tokens(tokenizer, build_messages(question, shots, system_prompt), template_kwargs or {})


def stop_token_ids(model, tokenizer, template_kwargs: dict | None = None) -> list[int]:
    """Every end token: the generation config's eos ids (an id or a list), the model's and the
    tokenizer's eos, and the template's end-of-turn token (the last label of a training reply)."""
    ids = set()
    for value in (model.config.hf_generation_config.get("eos_token_id"), model.config.eos_token_id,
                  tokenizer.eos_token_id, end_of_turn_id(tokenizer, template_kwargs or {})):
        ids |= set() if value is None else {value} if isinstance(value, int) else set(value)
    return sorted(ids)


def evaluate_gsm8k(model, tokenizer, examples: list[dict], *, k_shot: int = 0, shots: list[dict] | None = None,
                   max_new_tokens: int = 256, batch_size: int = 32, subset: int | None = None,
                   system_prompt: str | None = None, template_kwargs: dict | None = None) -> dict:
    """Greedy strict-match and flexible-extract accuracy on `examples` ({question, answer} dicts,
    e.g. the test split).

    k_shot > 0 takes the first k of `shots` (e.g. the train split) as worked examples in every
    prompt; subset evaluates only the first `subset` examples. Returns accuracy, counts, the
    settings and one record per example (question, prompt, output, expected, both extractions
    and verdicts; see `score`).
    """
    if k_shot:
        if shots is None or len(shots) < k_shot:
            raise ValueError(f"k_shot={k_shot} needs at least {k_shot} examples in shots= (the train split)")
        shots = shots[:k_shot]
    else:
        shots = []
    examples = examples[:subset] if subset is not None else examples
    prompts = [build_prompt(tokenizer, ex["question"], shots, system_prompt, template_kwargs) for ex in examples]
    eos = stop_token_ids(model, tokenizer, template_kwargs)
    # Similar lengths in one batch waste less padding; records keep the input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs = [None] * len(prompts)
    generated, started = 0, time.perf_counter()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, tokens in zip(chunk, generate(model, [prompts[i] for i in chunk], max_new_tokens, eos_token_id=eos)):
            outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True)
            generated += len(tokens)
    seconds = time.perf_counter() - started
    records = [score(ex, output) | {"prompt": tokenizer.decode(prompt)}
               for ex, prompt, output in zip(examples, prompts, outputs)]
    return summarize(records) | {
        "k_shot": k_shot, "max_new_tokens": max_new_tokens,
        # Includes compilation the first time a shape bucket is seen.
        "generated_tokens": generated, "generation_s": seconds, "records": records}


def score(example: dict, output: str) -> dict:
    """One output's record: both extractions and verdicts, and `extracted`/`correct` for the
    primary metric (flexible-extract)."""
    expected = reference_answer(example["answer"])
    strict, flexible = strict_answer(output), flexible_answer(output)
    flexible_correct = is_correct(flexible, expected)
    return {"question": example["question"], "output": output, "expected": expected,
            "strict_match": strict, "strict_match_correct": is_correct(strict, expected),
            "flexible_extract": flexible, "flexible_extract_correct": flexible_correct,
            "extracted": flexible, "correct": flexible_correct}


def summarize(records: list[dict]) -> dict:
    """Accuracy and counts per metric; `accuracy` and `correct` are the primary metric's."""
    total = len(records)
    counts = {m: sum(r[f"{m}_correct"] for r in records) for m in ("strict_match", "flexible_extract")}
    result = {"total": total, "primary_metric": PRIMARY_METRIC}
    for metric, correct in counts.items():
        result[metric] = correct / total if total else 0.0
        result[f"{metric}_correct"] = correct
    primary = PRIMARY_METRIC.replace("-", "_")
    return result | {"accuracy": result[primary], "correct": counts[primary]}


def write_results(result: dict, path: str | os.PathLike) -> None:
    """The result as JSON (records included), local or gs://; the parent folder is created."""
    rundir.write_json(os.fspath(path), result)
