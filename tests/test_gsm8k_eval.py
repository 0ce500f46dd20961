"""GSM8K scoring against lm-eval's own gsm8k filters and exact_match on hard outputs and the real
answers; the stop strings; the eval loop on a tiny model."""

import json
from pathlib import Path

import jax.numpy as jnp
import lm_eval
import pytest
import transformers as tf

import jaxsft
from jaxsft.evals import evaluate_gsm8k, flexible_answer, load_jsonl, strict_answer, write_results
from jaxsft.evals import gsm8k as gsm8k_module
from jaxsft.evals.gsm8k import (STOP_STRINGS, build_messages, reference_answer, score, summarize,
                                truncate_at_stop)
from tests.hf_models import COMMON

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module")
def test_split(assets):
    return load_jsonl(assets / "data" / "gsm8k" / "test.jsonl")


def lm_eval_gsm8k():
    """lm-eval's own gsm8k task config (the installed YAML), its filter objects and its metric."""
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    import lm_eval.filters  # noqa: F401  (registers the filters)
    from lm_eval.api.registry import get_filter

    with open(Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml") as f:
        task = yaml.safe_load(f)
    filters = {f["name"]: [get_filter(c["function"])(**{k: v for k, v in c.items() if k != "function"})
                           for c in f["filter"]] for f in task["filter_list"]}
    (metric,) = task["metric_list"]
    kwargs = {k: v for k, v in metric.items() if k not in ("metric", "aggregation", "higher_is_better")}

    def verdict(name, output, answer):
        resps = [[output]]
        for f in filters[name]:
            resps = list(f.apply(resps, [{}]))
        return bool(exact_match_hf_evaluate(predictions=resps, references=[answer], **kwargs)["exact_match"] == 1.0)
    return task, verdict


HARD_OUTPUTS = [
    "She makes 9 * 2 = $18 every day.\n#### 18", "#### 18.00", "#### 018", "#### 18.", "#### 18..",
    "so the answer is 18...", "The answer is 18.", "The answer is $18.", ".5", "#### .5", "#### 0.5",
    "#### 1,000 dollars", "The answer is $1,200.50.", "#### 1200.50", "18 dollars", "18 apples.",
    "#### 18 cm", "#### 42\nCheck: 42 - 1 = 41", "#### 3\n#### 4", "#### 4\n#### 3", "####18",
    "#### (no number) but earlier 7", "5 apples, and then ...", "I am not sure.", "", "#### -4",
    "#### \u22124", "It is \u221218 degrees", "#### -18", "The answer is -18.", "#### 18\n\n#### 18",
    "18,000", "#### 18,000", "$18", "#### $18", "18.0.0", "#### 1.8e1", "#### 18!", "#### 18\nQuestion:",
]


@pytest.mark.parametrize("reference", ["Total: 9 * 2 = 18\n#### 18", "#### 0.5", "#### 1,000", "#### -4",
                                       "Step #### 3\n#### 18", "#### 18000", "#### 1200.50"])
def test_scores_agree_with_lm_evals_filters_and_metric(reference):
    task, verdict = lm_eval_gsm8k()
    assert task["generation_kwargs"]["until"] == list(STOP_STRINGS)
    for output in HARD_OUTPUTS:
        record = score({"question": "q", "answer": reference}, output)
        assert record["strict_match_correct"] == verdict("strict-match", output, reference), output
        assert record["flexible_extract_correct"] == verdict("flexible-extract", output, reference), output


def test_every_reference_answer_scores_itself_as_lm_eval_does(test_split):
    assert len(test_split) == 1319
    _, verdict = lm_eval_gsm8k()
    for ex in test_split:
        record = score(ex, ex["answer"])
        assert record["strict_match_correct"] is verdict("strict-match", ex["answer"], ex["answer"]) is True
        assert record["flexible_extract_correct"] == verdict("flexible-extract", ex["answer"], ex["answer"])
    assert reference_answer(test_split[0]["answer"]) == "18"


@pytest.mark.parametrize("text,strict,flexible", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18", "18"),
    ("The answer is $1,200.50.", None, "$1,200.50."),
    ("#### 1,000 dollars", "1,000", "1,000"),
    ("#### 42\nCheck: 42 - 1 = 41", "42", "41"),  # strict: the #### line; flexible: the last number
    ("#### 3\n#### 4", "3", "4"),  # strict takes the first #### line, as lm-eval does
    ("####18", None, "18"),  # strict needs the space after ####
    ("5 apples, and then ...", None, "..."),  # the last match is an ellipsis: wrong
    ("I am not sure.", None, None),
])
def test_strict_match_and_flexible_extract(text, strict, flexible):
    assert strict_answer(text) == strict
    assert flexible_answer(text) == flexible


def test_both_metrics_are_reported_and_accuracy_is_flexible_extract():
    example = {"question": "q", "answer": "2 + 2 = 4\n#### 4"}
    outputs = ["2 + 2 = 4\n#### 4",          # both right
               "So the answer is 4.",         # flexible right, no #### line
               "#### 4\nor maybe 5",          # strict right, flexible takes the 5
               "#### 3"]                      # both wrong
    records = [score(example, out) for out in outputs]
    assert [(r["strict_match_correct"], r["flexible_extract_correct"]) for r in records] == [
        (True, True), (False, True), (True, False), (False, False)]
    assert all(r["extracted"] == r["flexible_extract"] and r["correct"] == r["flexible_extract_correct"]
               for r in records)
    result = summarize(records)
    assert result == {"total": 4, "primary_metric": "flexible-extract", "answer_form": 0.75, "answer_form_count": 3,
                      "strict_match": 0.5,
                      "strict_match_correct": 2, "flexible_extract": 0.5, "flexible_extract_correct": 2,
                      "accuracy": 0.5, "correct": 2}
    assert summarize(records[:2])["strict_match"] == 0.5 and summarize(records[:2])["accuracy"] == 1.0


def test_generation_stops_at_lm_evals_stop_strings(monkeypatch):
    """evaluate_gsm8k asks generate for the stop strings and cuts the text before them."""
    tok = tf.AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "qwen2.5-0.5b-instruct")
    asked = {}

    def fake_generate(model, prompts, max_new_tokens, **kwargs):
        asked.update(kwargs)
        return [tok.encode(" #### 18\n\nQuestion: what next?<|im_end|>")] * len(prompts)

    monkeypatch.setattr(gsm8k_module, "generate", fake_generate)
    monkeypatch.setattr(gsm8k_module, "stop_token_ids", lambda *a: [0])
    result = evaluate_gsm8k(None, tok, [{"question": "q", "answer": "#### 18"}])
    assert asked["stop_strings"] == STOP_STRINGS and asked["tokenizer"] is tok
    assert result["records"][0]["output"] == " #### 18\n\n" and result["correct"] == 1
    assert truncate_at_stop("a</s>b<|im_end|>c") == "a"


def test_k_shot_messages_are_prior_turns(test_split):
    shots = test_split[:2]
    messages = build_messages("Q?", shots)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == shots[0]["answer"] and messages[-1]["content"] == "Q?"


def test_eval_loop_on_a_tiny_model(tmp_path, assets, test_split):
    tok = tf.AutoTokenizer.from_pretrained(assets / "tokenizers" / "qwen2.5-0.5b-instruct")
    # A tiny random Qwen2 with the tokenizer's whole vocabulary.
    tf.Qwen2ForCausalLM(tf.Qwen2Config(**{**COMMON, "vocab_size": len(tok)}, num_attention_heads=4,
                                       num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(tmp_path / "m")
    model = jaxsft.load_model(tmp_path / "m", compute_dtype=jnp.float32)
    examples = [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"},
                {"question": "3+3?", "answer": "#### 6"}]
    result = evaluate_gsm8k(model, tok, examples, k_shot=1, shots=test_split[:1], max_new_tokens=4,
                            batch_size=2, subset=3)
    assert result["total"] == 3 and 0 <= result["correct"] <= 3
    assert result["accuracy"] == result["flexible_extract"] == result["correct"] / 3
    assert result["strict_match"] == result["strict_match_correct"] / 3
    for ex, r in zip(examples, result["records"]):
        assert r == score(ex, r["output"]) | {"prompt": r["prompt"]}
        assert r["question"] == ex["question"] and r["expected"] == reference_answer(ex["answer"])
        assert test_split[0]["question"] in r["prompt"] and r["prompt"].rstrip().endswith("assistant")
    write_results(result, tmp_path / "out" / "gsm8k.json")
    assert json.loads((tmp_path / "out" / "gsm8k.json").read_text()) == result
    with pytest.raises(ValueError, match="k_shot=2"):
        evaluate_gsm8k(model, tok, examples, k_shot=2, shots=test_split[:1])
