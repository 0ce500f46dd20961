"""The GSM8K eval prompts a model exactly as training rendered the same record before its reply
(system prompt, template kwargs, chat_template override), and stops on every end token."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxsft.data import set_chat_template
from jaxsft.data.config import SOURCE_DEFAULTS
from jaxsft.data.tokenize import load_or_tokenize
from jaxsft.evals.gsm8k import build_prompt, load_jsonl, stop_token_ids

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}"
)
CASES = {  # tokenizer folder, template kwargs, chat_template override
    "llama": ("llama-3.2-1b-instruct", {"date_string": "26 Jul 2024"}, ""),
    "qwen": ("qwen2.5-0.5b-instruct", {}, ""),
    "qwen_chatml_override": ("qwen2.5-0.5b-instruct", {}, CHATML),
}
SYSTEM = "You solve grade-school math problems step by step."


@pytest.mark.parametrize("case", sorted(CASES))
def test_eval_prompt_is_the_training_rendering_up_to_the_reply(case, assets, tmp_path):
    folder, kwargs, template = CASES[case]
    tok = AutoTokenizer.from_pretrained(assets / "tokenizers" / folder)
    set_chat_template(tok, template)
    examples = load_jsonl(assets / "data/gsm8k/test.jsonl")[:8]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    settings = dict(render="chat_template", loss_on="all_assistant", system_prompt=SYSTEM, on_bad_record="error",
                    template_kwargs=kwargs)
    table = load_or_tokenize({**SOURCE_DEFAULTS, "path": str(path)}, tok, settings, tmp_path / "cache")
    assert len(table) == len(examples)
    for i, ex in enumerate(examples):
        tokens, mask = table.sample(i)
        reply_start = int(np.argmax(mask))
        prompt = build_prompt(tok, ex["question"], system_prompt=SYSTEM, template_kwargs=kwargs)
        assert prompt == tokens[:reply_start].tolist()
        assert SYSTEM in tok.decode(prompt) and ex["question"] in tok.decode(prompt)
    if kwargs:
        assert "26 Jul 2024" in tok.decode(prompt)


def test_stop_tokens_are_every_end_token_listed(assets):
    llama = AutoTokenizer.from_pretrained(assets / "tokenizers/llama-3.2-1b-instruct")
    # Llama 3.2's generation_config.json lists three end tokens.
    model = SimpleNamespace(config=SimpleNamespace(
        hf_generation_config={"eos_token_id": [128001, 128008, 128009]}, eos_token_id=128009))
    assert stop_token_ids(model, llama, {"date_string": "26 Jul 2024"}) == [128001, 128008, 128009]
    # A base model trained with a ChatML override: its eos is <|endoftext|>, its turns end in <|im_end|>.
    qwen = AutoTokenizer.from_pretrained(assets / "tokenizers/qwen2.5-0.5b-instruct")
    set_chat_template(qwen, CHATML)
    qwen.eos_token = "<|endoftext|>"
    base = SimpleNamespace(config=SimpleNamespace(hf_generation_config={}, eos_token_id=151643))
    assert stop_token_ids(base, qwen) == [151643, 151645]
