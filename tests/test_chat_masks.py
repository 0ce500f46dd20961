"""Loss masks for chat templates that break the prefix rule, tool calls, list contents and plain
text: the labelled tokens decode to exactly each assistant reply and its end-of-turn marker."""

import json
import unicodedata

import pytest
from transformers import AutoTokenizer

from jaxsft.data import DataError, DataPipeline, default_data_config, set_chat_template
from jaxsft.data.config import SOURCE_DEFAULTS
from jaxsft.data.formats import read_source
from jaxsft.data.tokenize import tokenize_conversations

# ChatML with an end-of-text token after the last turn when no generation prompt is asked for
# (like Phi-3's <|endoftext|>).
APPEND_AT_END = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}"
)
# Like Qwen3: earlier assistant turns lose their <think> block, the last one always has one
# (re-spaced, empty if the reply has none); enable_thinking=False puts an empty one in the prompt.
DROP_EARLIER_REASONING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}"
    "{% set reasoning = m.content.split('</think>')[0].split('<think>')[-1] if '</think>' in m.content else '' %}"
    "{% set answer = m.content.split('</think>')[-1] %}"
    "{% if loop.last %}{{ '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}{% endif %}"
    "{{ answer.lstrip('\\n') }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Like Mistral's: a system prompt (a default one if none is given) goes into the last user message.
SYSTEM_IN_LAST_USER = (
    "{% if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = 'You are a careful assistant.' %}{% set msgs = messages %}{% endif %}"
    "{% set last = namespace(i=-1) %}{% for m in msgs %}{% if m.role == 'user' %}{% set last.i = loop.index0 %}"
    "{% endif %}{% endfor %}<|endoftext|>{% for m in msgs %}{% if m.role == 'user' %}[INST] "
    "{% if loop.index0 == last.i %}{{ sys }}\n\n{% endif %}{{ m.content }}[/INST]\n"
    "{% else %}{{ m.content }}<|im_end|>{% endif %}{% endfor %}"
)
# Earlier turns are stripped of surrounding whitespace, the last one is not.
STRIP_EARLIER_TURNS = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if loop.last %}{{ m.content }}{% else %}"
    "{{ m.content | trim }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def drop_reasoning(content):
    return content.split("</think>")[-1].lstrip("\n")


def respace_reasoning(content):
    reasoning = content.split("</think>")[0].split("<think>")[-1]
    return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + drop_reasoning(content)


def as_is(content):
    return content


# template, how an assistant turn's content shows in the whole rendering when it is not the last, and when it is
TEMPLATES = {
    "append_at_end": (APPEND_AT_END, as_is, as_is),
    "drop_earlier_reasoning": (DROP_EARLIER_REASONING, drop_reasoning, respace_reasoning),
    # No reasoning in the data, none asked for: the prompt holds the empty <think> block.
    "no_thinking_prompt": (DROP_EARLIER_REASONING, as_is, as_is),
    "system_in_last_user": (SYSTEM_IN_LAST_USER, as_is, as_is),
    "strip_earlier_turns": (STRIP_EARLIER_TURNS, str.strip, as_is),
}


@pytest.fixture(scope="module")
def qwen(assets):
    return AutoTokenizer.from_pretrained(assets / "tokenizers/qwen2.5-0.5b-instruct")


@pytest.fixture(scope="module")
def multi_turn(assets):
    """OASST paths with at least two assistant replies (a part of the sample, for speed)."""
    source = {**SOURCE_DEFAULTS, "path": str(assets / "data/chat/oasst_en_100_tree.jsonl")}
    conversations = read_source(source, system_prompt="", on_bad_record="error").conversations
    chosen = [c for c in conversations if sum(m["role"] == "assistant" for m in c.messages) >= 2][:60]
    assert len(chosen) == 60
    return chosen


def nfc(text):
    return unicodedata.normalize("NFC", text)  # Qwen's tokenizer normalizes to NFC


def label_texts(tok, ids, mask):
    runs, current = [], []
    for t, m in zip(ids.tolist(), mask.tolist()):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [nfc(tok.decode(r, skip_special_tokens=False)) for r in runs]


def tokenize(tok, conversations, **kwargs):
    settings = dict(render="chat_template", loss_on="all_assistant", template_kwargs={}, on_bad_record="error")
    return tokenize_conversations(conversations, tok, **{**settings, **kwargs})


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_labels_are_each_reply_and_its_end_marker(name, qwen, multi_turn):
    template, shown_when_earlier, shown_when_last = TEMPLATES[name]
    tok = qwen.__class__.from_pretrained(qwen.name_or_path)
    set_chat_template(tok, template)
    conversations = multi_turn
    if name == "drop_earlier_reasoning":
        conversations = [
            type(c)([{**m, "content": f"<think>Why reply {k}?</think>{m['content']}"} if m["role"] == "assistant"
                     else m for k, m in enumerate(c.messages)], c.where)
            for c in multi_turn]
    if name == "strip_earlier_turns":  # whitespace for the template to strip
        conversations = [type(c)([{**m, "content": f"  {m['content']} \n"} for m in c.messages], c.where) for c in multi_turn]
    kwargs = {"enable_thinking": False} if name == "no_thinking_prompt" else {}
    ids, masks, _, skipped = tokenize(tok, conversations, template_kwargs=kwargs)
    assert not skipped and len(ids) == len(conversations)
    turns = 0
    for conv, tokens, mask in zip(conversations, ids, masks):
        replies = [m["content"] for m in conv.messages if m["role"] == "assistant"]
        last = conv.messages[-1]["role"] == "assistant"
        expected = [nfc((shown_when_last(r) if last and k == len(replies) - 1 else shown_when_earlier(r)) + "<|im_end|>")
                    for k, r in enumerate(replies)]
        assert label_texts(tok, tokens, mask) == expected, conv.where
        turns += len(replies)
    assert turns >= 120
    if name == "drop_earlier_reasoning":  # the last reply keeps its reasoning, the earlier ones do not
        assert "<think>" in expected[-1] and "<think>" not in expected[0]


def test_the_old_templates_refusal_case_now_labels_the_last_reply_without_the_appended_token(qwen, multi_turn):
    tok = qwen.__class__.from_pretrained(qwen.name_or_path)
    set_chat_template(tok, APPEND_AT_END)
    ids, masks, _, _ = tokenize(tok, multi_turn[:5], loss_on="last_assistant")
    for tokens, mask in zip(ids, masks):
        assert tokens[-1] == tok.convert_tokens_to_ids("<|endoftext|>") and mask[-1] == 0
        assert len(label_texts(tok, tokens, mask)) == 1


def test_a_turn_whose_mask_cannot_be_derived_is_a_bad_record(qwen, tmp_path):
    tok = qwen.__class__.from_pretrained(qwen.name_or_path)
    # Earlier assistant replies are not rendered at all: they cannot be labelled.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if loop.last or m.role != 'assistant' %}{{ m.content }}"
        "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    two_turns = {"messages": good["messages"] + [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, two_turns, good)))
    cfg = default_data_config()
    cfg.sources = [{"path": str(path)}]
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.global_batch_size = 2
    with pytest.raises(DataError, match=r"chat.jsonl, line 2, field 'messages': no loss mask: assistant turn 1") as e:
        DataPipeline(cfg, tok)
    assert e.value.reason == "template_mismatch"
    cfg.on_bad_record = "skip"
    pipe = DataPipeline(cfg, tok)
    assert pipe.summary["skipped"] == {"template_mismatch": 1} and pipe.samples_per_epoch == 2
    path.write_text(json.dumps(two_turns) + "\n")  # every record skipped: a clear error, not a crash
    with pytest.raises(ValueError, match="has no usable sample left"):
        DataPipeline(cfg, tok)


def test_chat_template_override_is_validated_at_start_up(qwen, tmp_path):
    tok = qwen.__class__.from_pretrained(qwen.name_or_path)
    file = tmp_path / "chatml.jinja"
    file.write_text(APPEND_AT_END)
    set_chat_template(tok, str(file))
    assert tok.chat_template == APPEND_AT_END
    with pytest.raises(ValueError, match="data.chat_template does not render the conversation"):
        set_chat_template(tok, "{% for m in messages %}{{ m.content }}{% endfor %}{{ undefined_call() }}")
    with pytest.raises(ValueError, match="neither a Jinja template nor a file"):
        set_chat_template(tok, str(tmp_path / "missing.jinja"))


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_RECORD = {"tools": TOOLS, "messages": [
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}, {"type": "text", "text": "Be brief."}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"temp_c\": 21}"},
    {"role": "assistant", "content": [{"type": "text", "text": "21 degrees in Paris."}]},
]}


def test_tool_calls_and_text_parts_through_the_real_qwen_template(qwen, tmp_path):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(TOOL_RECORD) + "\n")
    read = read_source({**SOURCE_DEFAULTS, "path": str(path)}, system_prompt="", on_bad_record="error")
    assert read.format == "chat"
    ids, masks, _, _ = tokenize(qwen, read.conversations)
    whole = qwen.decode(ids[0])
    assert "Weather in Paris?\nBe brief." in whole and '"name": "get_weather"' in whole  # tools are rendered
    assert "<tool_response>\n{\"temp_c\": 21}\n</tool_response>" in whole
    assert label_texts(qwen, ids[0], masks[0]) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "21 degrees in Paris.<|im_end|>",
    ]


@pytest.mark.parametrize("bad,field,reason", [
    ({"role": "user", "content": [{"type": "image_url", "text": "x"}]}, "messages[0].content[0]", "non_text_content"),
    ({"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]}, "messages[0].tool_calls",
     "bad_tool_call"),
    ({"role": "user", "content": "hi"}, None, None),
])
def test_bad_tool_and_part_records_name_the_field(bad, field, reason, tmp_path):
    record = {"messages": [bad, {"role": "assistant", "content": None,
                                 "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        read_source({**SOURCE_DEFAULTS, "path": str(path)}, system_prompt="", on_bad_record="error")
    field = field or "messages[1].tool_calls[0].arguments"
    assert f"field '{field}'" in str(e.value) and e.value.reason == (reason or "bad_tool_call")


def test_plain_text_is_all_labels_and_mixes_with_chat(qwen, assets, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "The mitochondria is the powerhouse of the cell."}) + "\n")
    cfg = default_data_config()
    cfg.sources = [{"path": str(path), "epochs": 4}, {"path": str(assets / "data/gsm8k/test.jsonl")}]
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.global_batch_size = 8
    cfg.prefetch = 0
    pipe = DataPipeline(cfg, qwen)
    assert [s["format"] for s in pipe.summary["sources"]] == ["text", "gsm8k"]
    table = pipe._tables[0]
    tokens, mask = table.sample(0)
    assert qwen.decode(tokens) == "The mitochondria is the powerhouse of the cell.<|im_end|>"  # eos ends the document
    assert mask.all()
    assert pipe.summary["sources"][0]["loss_tokens"] == len(tokens)
