"""Chat templates: the `data.chat_template` override, and where each assistant reply lies in a
rendered conversation (the spans the loss mask is made of).

Real templates have no `{% generation %}` markers, and many break the rule that a rendered
prefix of a conversation is a prefix of the whole rendering: they append an end-of-text token
after the last turn only, drop the reasoning of earlier assistant turns, strip whitespace of
earlier turns, or move the system prompt into the last user message. So each assistant turn i
is located in three steps (see docs/data.md):

1. The reply as the template renders it when it is the last turn: the text of
   `render(messages[:i + 1])` after its common prefix with `render(messages[:i], generation
   prompt)`. It is cut where the reply's own content ends (found as its text, as the longest end
   of it the template kept, or as its last tool call's name); what follows is the end-of-turn
   marker.
2. Where the reply starts in the whole rendering: where `render(messages[:i], generation
   prompt)` stops agreeing with it, or else right after the generation header (what follows
   the previous message's content in that prefix rendering), searched after the previous reply.
3. The reply found there: either exactly as rendered when last, or rewritten (its visible text,
   up to the end-of-turn marker, is the end of the reply's text).

A turn that cannot be located raises `TemplateMismatch`, a bad record. The labels are then the
tokens from the reply's start through the first special token after its content (the
end-of-turn marker, e.g. `<|eot_id|>`, `<|im_end|>`), so nothing the template adds after it (a
newline, an appended end-of-text token) and nothing of the header or the user's turn is one.
"""

from __future__ import annotations

import os

TINY_CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


class TemplateMismatch(ValueError):
    """The chat template renders an assistant turn in a way its span cannot be found."""


def set_chat_template(tokenizer, template: str) -> None:
    """Sets `data.chat_template` (a Jinja template, or the path of a file holding one) on the
    tokenizer; '' keeps the tokenizer's own. Raises ValueError if it cannot render and locate
    the reply of a tiny conversation."""
    if not template:
        return
    if "{{" not in template and "{%" not in template:
        if not os.path.isfile(template):
            raise ValueError(f"data.chat_template {template[:200]!r} is neither a Jinja template nor a file")
        with open(template) as f:
            template = f.read()
    tokenizer.chat_template = template
    try:
        assistant_spans(lambda msgs, gen: render(tokenizer, msgs, gen, {}), TINY_CONVERSATION, special_strings(tokenizer))
    except Exception as e:  # any failure of the user's template: one clear line
        raise ValueError(f"data.chat_template does not render the conversation {TINY_CONVERSATION}: {e}") from e


def render(tokenizer, messages: list[dict], generation_prompt: bool, template_kwargs: dict, tools=None) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt, **template_kwargs)


def special_strings(tokenizer) -> tuple[str, ...]:
    """The special tokens' texts, longest first (for matching the longest marker)."""
    texts = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | set(tokenizer.all_special_tokens)
    return tuple(sorted(texts, key=len, reverse=True))


def common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    low, high = 0, min(len(a), len(b))
    while low < high:  # the longest n with a[:n] == b[:n]
        mid = (low + high + 1) // 2
        if b.startswith(a[:mid]):
            low = mid
        else:
            high = mid - 1
    return low


def assistant_spans(render_prefix, messages: list[dict], specials: tuple[str, ...]):
    """The whole rendering and one (start, content_end, end) character span per assistant turn.

    `render_prefix(messages, generation_prompt) -> str`. Labels are the tokens overlapping
    [start, end) up to the first special token starting at or after content_end.
    """
    full = render_prefix(messages, False)
    spans, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_prefix(messages[:i], True)
        through = full if i == len(messages) - 1 else render_prefix(messages[: i + 1], False)
        previous = messages[i - 1] if i else None
        reply = _reply(before, through, previous)
        content_end = _content_end(message, reply)
        if content_end < 0:
            raise TemplateMismatch(
                f"assistant turn {i}: the template does not render its content {message['content'][:80]!r} "
                f"(rendered turn: {reply[:200]!r})")
        text, tail = reply[:content_end], reply[content_end:]
        span = None
        for start in _starts(before, full, previous, done):
            span = _match(full, start, text, tail, specials)
            if span:
                break
        if span is None:
            raise TemplateMismatch(
                f"assistant turn {i}: its reply {text[-80:]!r} followed by {tail[:40]!r} is not found after "
                f"the previous turn in the rendered conversation, so its loss mask cannot be derived")
        spans.append(span)
        done = span[2]
    return full, spans


def _content_end(message: dict, reply: str) -> int:
    """Where the reply's own content ends in the rendered reply (-1: not rendered): after the
    content, or after its longest end that the template rendered as is (Qwen3 re-spaces the
    <think> block before the answer), or after the last tool call's name."""
    if message.get("tool_calls"):
        name = message["tool_calls"][-1]["function"]["name"]
        at = reply.rfind(name)
        return at + len(name) if at >= 0 else -1
    content = message["content"].strip()
    at = reply.find(content)
    if at >= 0:
        return at + len(content)
    low, high = 0, len(content)  # the first k with content[k:] in reply (a shorter end is in it too)
    while low < high:
        mid = (low + high) // 2
        if content[mid:] in reply:
            high = mid
        else:
            low = mid + 1
    end = content[low:].strip()
    return reply.rfind(end) + len(end) if end else -1


def _header(before: str, previous: dict | None) -> str:
    """The generation header: what follows the previous message's content in `before`."""
    content = previous["content"].strip() if previous else ""
    at = before.rfind(content) if content else -1
    return before[at + len(content):].lstrip() if at >= 0 else ""


def _reply(before: str, through: str, previous: dict | None) -> str:
    """The reply as rendered when it is the last turn: `through` after the prompt `before`, or
    after their common prefix if that holds the whole previous message (Qwen3's prompt without
    thinking ends in an empty <think> block), or else after the last generation header (the
    template rendered the prompt's turns otherwise)."""
    if through.startswith(before):
        return through[len(before):]
    agreed = common_prefix_len(before, through)
    content = previous["content"].strip() if previous else ""
    if not content or through.rfind(content) + len(content) <= agreed:
        return through[agreed:]
    header = _header(before, previous)
    at = through.rfind(header) if header else -1
    return through[at + len(header):] if at >= 0 else ""


def _starts(before: str, full: str, previous: dict | None, done: int):
    """Candidate starts of the reply in `full`, most likely first."""
    agreed = common_prefix_len(before, full)
    if agreed >= done:
        yield agreed
    header = _header(before, previous)
    found = full.find(header, done) if header else -1
    if found >= 0:
        yield found + len(header)


def _match(full: str, start: int, text: str, tail: str, specials: tuple[str, ...]):
    """The reply's (start, content_end, end) if it is at `start`: verbatim, or rewritten with
    its visible text a suffix of `text` and followed by the end-of-turn marker."""
    if full.startswith(text, start):
        content_end = start + len(text)
        return start, content_end, content_end + common_prefix_len(tail, full[content_end: content_end + len(tail)])
    marker = _marker(tail, specials)
    end = full.find(marker, start) if marker else -1
    if end < 0:
        return None
    shown = full[start:end]
    visible = shown.strip()
    if not visible or not text.rstrip().endswith(visible):
        return None
    first = start + len(shown) - len(shown.lstrip())
    return first, first + len(visible), end + len(marker)


def _marker(tail: str, specials: tuple[str, ...]) -> str:
    """The end-of-turn marker that `tail` (what follows a reply's content) starts with."""
    tail = tail.lstrip()
    for special in specials:
        if tail.startswith(special):
            return special
    return tail.split("\n", 1)[0].strip()


def prompt_tokens(tokenizer, messages: list[dict], template_kwargs: dict) -> list[int]:
    """Token ids of `messages` and the generation prompt, as training renders the prompt of a
    reply (generation, e.g. the GSM8K eval, uses this so prompts match training)."""
    # The template already wrote any special tokens it wants.
    return tokenizer(render(tokenizer, messages, True, template_kwargs), add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer, template_kwargs: dict) -> int | None:
    """The special token that ends an assistant reply in this template (the last label of a turn)."""
    full, [(_, content_end, end)] = assistant_spans(
        lambda msgs, gen: render(tokenizer, msgs, gen, template_kwargs), TINY_CONVERSATION, special_strings(tokenizer))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if content_end <= start < end and tokenizer.convert_ids_to_tokens(token) in special:
            return token
    return None
