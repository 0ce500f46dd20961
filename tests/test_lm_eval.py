"""The jaxsft backend for lm-evaluation-harness against lm-eval's own `hf` backend, on tiny random
Llama and Qwen2 models exported with `save_hf`: tasks defined as lm-eval YAMLs over local files
(a multiple-choice set, a perplexity set, lm-eval's real gsm8k task over the GSM8K asset)."""

import json
import time
from pathlib import Path

import jax.numpy as jnp
import lm_eval
from lm_eval.tasks import TaskManager
import numpy as np
import pytest
import torch
import transformers as tf

import jaxsft
import jaxsft.train.loss
from jaxsft.evals.lm_eval_backend import JaxsftLM
from tests.hf_models import COMMON, FAMILIES

ASSETS = Path(__file__).parent / "assets"

MC = [  # question, choices, label
    ("What is 2 + 2?", ["3", "4", "5", "22"], 1),
    ("Which is a colour?", ["red", "dog", "run", "seven"], 0),
    ("The capital of France is", ["Berlin", "Madrid", "Paris", "Rome"], 2),
    ("Water freezes at", ["0 degrees Celsius", "50 degrees", "boiling", "never"], 0),
    ("A cat says", ["moo", "woof", "quack", "meow"], 3),
    ("The sun rises in the", ["west", "east", "north", "south"], 1),
]


def write_tasks(folder: Path) -> Path:
    """Three lm-eval task YAMLs over local files, loaded with TaskManager(include_path=folder)."""
    folder.mkdir()
    (folder / "mc.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in MC))
    gsm8k = ASSETS / "data" / "gsm8k"
    texts = [json.loads(line)["answer"] for line in open(gsm8k / "test.jsonl")][:3]
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (folder / "mc_local.yaml").write_text(f"""
task: mc_local
dataset_path: json
dataset_kwargs: {{data_files: {{test: {folder / 'mc.jsonl'}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""")
    (folder / "rolling_local.yaml").write_text(f"""
task: rolling_local
dataset_path: json
dataset_kwargs: {{data_files: {{test: {folder / 'text.jsonl'}}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: bits_per_byte}}]
""")
    (folder / "gsm8k_local.yaml").write_text(f"""
include: {Path(lm_eval.__file__).parent / 'tasks' / 'gsm8k' / 'gsm8k.yaml'}
task: gsm8k_local
tag: []
dataset_path: json
dataset_name: null
dataset_kwargs: {{data_files: {{train: {gsm8k / 'train.jsonl'}, test: {gsm8k / 'test.jsonl'}}}}}
num_fewshot: 2
generation_kwargs: {{until: ["Question:", "</s>", "<|im_end|>"], do_sample: false, temperature: 0.0, max_gen_toks: 16}}
""")
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("t") / "tasks")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def small_tokenizer(bos: bool):
    """A byte-level BPE tokenizer of 400 tokens trained on GSM8K text (a real tokenizer's 150k-token
    vocabulary makes every logits call ~100x slower on CPU), with a ChatML template; `bos`: it
    prepends <s> as Llama's does, else none as Qwen2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [json.loads(line)["question"] + "\n" + json.loads(line)["answer"]
             for line in open(ASSETS / "data" / "gsm8k" / "train.jsonl")][:300]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>" if bos else None, eos_token="</s>",
                                     additional_special_tokens=specials[2:])
    tok.chat_template = CHATML
    return tok


def exported_model(family: str, out: Path) -> Path:
    """A tiny random model of `family` with the small tokenizer, loaded by jaxsft and written by save_hf."""
    tok = small_tokenizer(bos=family == "llama")
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model_cls(config_cls(**{**COMMON, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                            "bos_token_id": tok.bos_token_id}, **extra)).save_pretrained(out / "random")
    jaxsft.save_hf(jaxsft.load_model(out / "random", compute_dtype=jnp.float32), out / "model", tokenizer=tok,
                   dtype=jnp.float32)
    return out / "model"


def evaluate(model, tasks, names, **kwargs):
    return lm_eval.simple_evaluate(model=model, tasks=names, task_manager=tasks, log_samples=True,
                                   bootstrap_iters=0, random_seed=0, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("family,chat", [("llama", False), ("qwen2", True)])
def test_backend_equals_lm_evals_hf_backend(family, chat, task_dir, tmp_path, monkeypatch):
    """Log-likelihoods, rolling log-likelihoods, accuracies and greedy generations; the Qwen2 run
    with lm-eval's chat template and few-shot as multi-turn on every task. The logits budget is cut
    so that scoring runs in chunks of 4 positions, as a 128k vocabulary makes it do."""
    monkeypatch.setattr(jaxsft.train.loss, "LOGITS_PER_DEVICE", 1000)
    path = exported_model(family, tmp_path)
    settings = dict(tasks=TaskManager(include_path=str(task_dir)), names=["mc_local", "rolling_local", "gsm8k_local"],
                    limit=3, apply_chat_template=chat, fewshot_as_multiturn=chat)
    start = time.perf_counter()
    ours = evaluate(JaxsftLM(pretrained=str(path), compute_dtype="float32", batch_size=4), **settings)
    middle = time.perf_counter()
    theirs = evaluate("hf", model_args=f"pretrained={path},dtype=float32", batch_size=4, device="cpu", **settings)
    print(f"{family}: jaxsft {middle - start:.1f} s, hf {time.perf_counter() - middle:.1f} s")
    for task in ("mc_local", "rolling_local"):
        a = [np.array([r[0] for r in s["resps"]], dtype=object) for s in ours["samples"][task]]
        b = [np.array([r[0] for r in s["resps"]], dtype=object) for s in theirs["samples"][task]]
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            lls = lambda v: np.array([e[0] if isinstance(e, tuple) else e for e in v], float)  # noqa: E731
            # A rolling log-likelihood is a sum over ~100 tokens, which lm-eval's hf sums in float32.
            np.testing.assert_allclose(lls(x), lls(y), atol=1e-4, rtol=1e-6 if task == "rolling_local" else 0)
            if task == "mc_local":
                assert [e[1] for e in x] == [e[1] for e in y]  # is-greedy flags
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["mc_local"][metric] == theirs["results"]["mc_local"][metric]
    assert ours["results"]["rolling_local"]["word_perplexity,none"] == pytest.approx(
        theirs["results"]["rolling_local"]["word_perplexity,none"], rel=1e-4)
    prompt = ours["samples"]["gsm8k_local"][0]["arguments"][0][0]
    assert (prompt.count("<|im_start|>user") == 3) == chat and prompt.count("Question:") == 3  # 2 shots
    outputs = [[s["resps"][0][0] for s in r["samples"]["gsm8k_local"]] for r in (ours, theirs)]
    assert outputs[0] == outputs[1] and all(outputs[0])
    print(family, "greedy outputs", outputs[0])

