"""GSM8K scoring (lm-eval's strict-match and flexible-extract) on the real answers and tricky
outputs; the eval loop on a tiny model."""

import json

import jax.numpy as jnp
import pytest
import transformers as tf

import jaxsft
from jaxsft.evals import evaluate_gsm8k, flexible_answer, load_jsonl, strict_answer, write_results
from jaxsft.evals.gsm8k import build_messages, is_correct, normalize_number, reference_answer, score, summarize
from tests.hf_models import COMMON


@pytest.fixture(scope="module")
def test_split(assets):
    return load_jsonl(assets / "data" / "gsm8k" / "test.jsonl")


def test_every_reference_answer_is_extracted(test_split):
    assert len(test_split) == 1319
    for ex in test_split:
        final = ex["answer"].rsplit("####", 1)[1].strip()
        got = strict_answer(ex["answer"])
        assert got is not None and is_correct(got, normalize_number(final)), (final, got)
        assert reference_answer(ex["answer"]) == got
    assert strict_answer(test_split[0]["answer"]) == "18"
    assert reference_answer("so 7 in all") == "7"  # a reference without a #### line: its last number


@pytest.mark.parametrize("text,strict,flexible", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18", "18"),
    ("The answer is $1,200.50.", None, "1200.5"),
    ("First 3 apples, then 5 more, so 8 apples in total.", None, "8"),
    ("#### 1,000 dollars", "1000", "1000"),
    ("It costs 12.00 dollars; then #### -4.", "-4", "-4"),
    ("#### 42\nCheck: 42 - 1 = 41", "42", "41"),  # strict: the #### line; flexible: the last number
    ("#### 3\n#### 4", "3", "4"),  # strict takes the first #### line, as lm-eval does
    ("####18", None, "18"),  # strict needs the space after ####
    ("#### (no number) but earlier 7", None, "7"),
    ("5 apples, and then ...", None, None),  # the last match is an ellipsis: wrong in lm-eval too
    ("I am not sure.", None, None),
    ("", None, None),
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
    assert result == {"total": 4, "primary_metric": "flexible-extract", "strict_match": 0.5,
                      "strict_match_correct": 2, "flexible_extract": 0.5, "flexible_extract_correct": 2,
                      "accuracy": 0.5, "correct": 2}
    assert summarize(records[:2])["strict_match"] == 0.5 and summarize(records[:2])["accuracy"] == 1.0


def test_numeric_equality():
    assert is_correct(flexible_answer("$1,200.50"), strict_answer("#### 1200.5"))
    assert is_correct("18", normalize_number("18.00"))
    assert not is_correct(None, "18") and not is_correct("17", "18")
    assert normalize_number("1,200") == "1200" and normalize_number("0.0") == "0"


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
        assert r["question"] == ex["question"] and r["expected"] == strict_answer(ex["answer"])
        assert test_split[0]["question"] in r["prompt"] and r["prompt"].rstrip().endswith("assistant")
    write_results(result, tmp_path / "out" / "gsm8k.json")
    assert json.loads((tmp_path / "out" / "gsm8k.json").read_text()) == result
    with pytest.raises(ValueError, match="k_shot=2"):
        evaluate_gsm8k(model, tok, examples, k_shot=2, shots=test_split[:1])
