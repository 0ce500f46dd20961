"""GSM8K: prompts through the tokenizer's chat template, greedy generation, exact-match scoring.

Prompts match the SFT data format (`format='gsm8k'`): the question is the user turn, the full
solution ending in `#### N` the assistant turn. k-shot prompts put k training examples before the
question as earlier user/assistant turns. This is jaxsft's own protocol (0-shot chat by default),
not lm-evaluation-harness's `gsm8k` task (5-shot `Question: ... Answer:` text prompts); run that
one with `python -m jaxsft.eval --tasks gsm8k` (docs/gsm8k.md).

The answers are scored exactly as lm-evaluation-harness 0.4 scores its `gsm8k` task: generation
stops at its stop strings (`Question:`, `</s>`, `<|im_end|>`, and the end tokens), and each output
goes through both of its filters, `strict-match` (the number on the first `#### N` line, so it also
measures whether the GSM8K answer format was learned) and `flexible-extract` (the last number
anywhere), then its `exact_match`: the extracted string and the reference solution, each with
commas, `$`, everything up to the last `#### ` and one final `.` removed and lower-cased, must be
equal strings ("18.00" is not "18"). `accuracy` is flexible-extract's (the primary metric).
"""

from __future__ import annotations

import json
import os
import re
import time

import jax
from etils import epath

from jaxsft import rundir
from jaxsft.data import set_chat_template
from jaxsft.data.chat import end_of_turn_id, prompt_tokens
from jaxsft.data.config import as_dict
from jaxsft.generation import generate

# lm-evaluation-harness's gsm8k task (lm_eval/tasks/gsm8k/gsm8k.yaml): its two filters, the
# normalisation of its exact_match (regexes_to_ignore, in order, then ignore_case) and its stop strings.
STRICT_MATCH = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_EXTRACT = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORED = tuple(re.compile(r) for r in (",", "\\$", "(?s).*#### ", "\\.$"))
STOP_STRINGS = ("Question:", "</s>", "<|im_end|>")
PRIMARY_METRIC = "flexible-extract"


def strict_answer(text: str) -> str | None:
    """strict-match: the number after the first `#### ` as written; None without one."""
    found = STRICT_MATCH.findall(text)
    return found[0].strip() if found else None


def flexible_answer(text: str) -> str | None:
    """flexible-extract: the last number-like run in `text` as written (it may be `...` or
    `18.`); None without one."""
    found = FLEXIBLE_EXTRACT.findall(text)
    return next(g for g in found[-1] if g).strip() if found else None


def normalize(text: str) -> str:
    """lm-eval's exact_match normalisation of the gsm8k task: a reference solution becomes its
    final answer ('... #### 1,200' -> '1200'), an extracted answer loses `$`, commas and one
    final '.' ('$1,200.' -> '1200', '18.00' stays '18.00')."""
    for pattern in IGNORED:
        text = pattern.sub("", text)
    return text.lower()


def reference_answer(answer: str) -> str:
    """A reference solution's final answer, as lm-eval compares it."""
    return normalize(answer)


def is_correct(predicted: str | None, expected: str) -> bool:
    """lm-eval's verdict: the normalised strings are equal (None: nothing was extracted)."""
    return predicted is not None and normalize(predicted) == expected


def truncate_at_stop(text: str, stop_strings=STOP_STRINGS) -> str:
    """The text before the first stop string, as lm-eval cuts a generation."""
    for stop in stop_strings:
        text = text.split(stop)[0]
    return text


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
        new = generate(model, [prompts[i] for i in chunk], max_new_tokens, eos_token_id=eos,
                       stop_strings=STOP_STRINGS, tokenizer=tokenizer)
        for i, tokens in zip(chunk, new):
            outputs[i] = truncate_at_stop(tokenizer.decode(tokens, skip_special_tokens=True))
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
    """Accuracy and counts per metric; `accuracy` and `correct` are the primary metric's;
    `answer_form`: the share of outputs that give a `#### N` line, GSM8K's final-answer form."""
    total = len(records)
    counts = {m: sum(r[f"{m}_correct"] for r in records) for m in ("strict_match", "flexible_extract")}
    form = sum(r["strict_match"] is not None for r in records)
    result = {"total": total, "primary_metric": PRIMARY_METRIC, "answer_form": form / total if total else 0.0,
              "answer_form_count": form}
    for metric, correct in counts.items():
        result[metric] = correct / total if total else 0.0
        result[f"{metric}_correct"] = correct
    primary = PRIMARY_METRIC.replace("-", "_")
    return result | {"accuracy": result[primary], "correct": counts[primary]}


def write_results(result: dict, path: str | os.PathLike) -> None:
    """The result as JSON (records included), local or gs://; the parent folder is created."""
    rundir.write_json(os.fspath(path), result)


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
