"""Conversations to token ids and loss masks through the model's chat template, cached on disk.

Real chat templates have no `{% generation %}` markers, so the assistant spans are found by
rendering conversation prefixes: the text of turn i's reply starts where
`render(messages[:i], add_generation_prompt=True)` ends and stops where
`render(messages[:i + 1])` ends. Both must be prefixes of the whole rendering (checked; a
template that rewrites earlier turns is refused). Tokens whose offsets start inside a span are
labels, up to and including the span's last special token (the end-of-turn, e.g. `<|eot_id|>`,
`<|im_end|>`), so what the template puts after it (Qwen's newline) is not.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np

from jaxsft.data.formats import Conversation, DataError, fingerprint_source, read_source

CACHE_VERSION = 2
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
ENCODE_CHUNK = 1024


class TemplateMismatch(ValueError):
    """The chat template breaks the prefix property that mask computation relies on."""


@dataclass
class TokenizedSource:
    tokens: np.ndarray  # int32, every sample's ids back to back
    loss_mask: np.ndarray  # uint8, 1 on label tokens, aligned with tokens
    offsets: np.ndarray  # int64, sample i is tokens[offsets[i]:offsets[i + 1]]
    records: np.ndarray  # int64, the number of the record each sample came from
    info: dict  # format, records, skipped by reason, samples, tokens, loss_tokens, cache key

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.loss_mask[a:b]


def default_cache_dir() -> Path:
    if os.environ.get("JAXSFT_CACHE"):
        return Path(os.environ["JAXSFT_CACHE"]) / "data"
    return Path.home() / ".cache" / "jaxsft" / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    folder = Path(getattr(tokenizer, "name_or_path", "") or "")
    files = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()] if folder.is_dir() else []
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    if not files:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {str(i): [t.content, t.special] for i, t in tokenizer.added_tokens_decoder.items()}
    meta = [type(tokenizer).__name__, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
            getattr(tokenizer, "chat_template", None), special]
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def special_token_ids(tokenizer) -> np.ndarray:
    ids = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    return np.array(sorted(ids), dtype=np.int64)


def render_with_spans(tokenizer, messages: list[dict], loss_on: str, template_kwargs: dict):
    """Returns the rendered conversation and the (start, end) character span of each labelled reply."""

    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt, **template_kwargs
        )

    full = render(messages, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_on == "last_assistant":
        turns = turns[-1:]
    spans = []
    for i in turns:
        before = render(messages[:i], True)
        through = full if i == len(messages) - 1 else render(messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateMismatch(
                f"the chat template does not render conversation prefixes as prefixes of the whole "
                f"conversation (assistant turn {i}), so loss masks cannot be derived from it. "
                f"Prompt up to the reply: {before[-200:]!r}; conversation up to the reply's end: "
                f"{through[-200:]!r}. Use a template that keeps earlier turns unchanged."
            )
        reply = through[len(before):]
        if messages[i]["content"].strip() not in reply:
            raise TemplateMismatch(
                f"assistant turn {i}'s content is not inside its rendered span {reply[:200]!r}; "
                "the template rewrites replies, so loss masks cannot be derived from it"
            )
        spans.append((len(before), len(through)))
    return full, spans


def span_mask(ids: np.ndarray, starts: np.ndarray, spans, special_ids: np.ndarray) -> np.ndarray:
    mask = np.zeros(len(ids), np.uint8)
    for a, b in spans:
        inside = np.nonzero((starts >= a) & (starts < b))[0]
        special = inside[np.isin(ids[inside], special_ids)]
        if len(special):
            inside = inside[inside <= special[-1]]
        mask[inside] = 1
    return mask


def tokenize_conversations(conversations: list[Conversation], tokenizer, *, render: str, loss_on: str,
                           template_kwargs: dict, on_bad_record: str):
    """Returns (token arrays, mask arrays, record numbers, Counter of skipped records by reason)."""
    skipped = collections.Counter()
    all_ids, all_masks, records = [], [], []
    if render == "raw":
        if tokenizer.eos_token_id is None:
            raise ValueError("data.render='raw' needs a tokenizer with an eos token")
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        for chunk in _chunks(conversations):
            texts = [c.prompt_completion for c in chunk]
            prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
            completions = tokenizer([c for _, c in texts], add_special_tokens=False)["input_ids"]
            for conv, p, c in zip(chunk, prompts, completions):
                all_ids.append(np.array(bos + p + c + [tokenizer.eos_token_id], np.int32))
                all_masks.append(np.array([0] * (len(bos) + len(p)) + [1] * (len(c) + 1), np.uint8))
                records.append(conv.record)
        return all_ids, all_masks, records, skipped

    special_ids = special_token_ids(tokenizer)
    for chunk in _chunks(conversations):
        rendered = []
        for conv in chunk:
            try:
                rendered.append((conv, *render_with_spans(tokenizer, conv.messages, loss_on, template_kwargs)))
            except jinja2.TemplateError as e:
                if on_bad_record == "error":
                    raise DataError(conv.where, "messages", f"the chat template refused it: {e}", "template_error") from e
                skipped["template_error"] += 1
        encoded = tokenizer([text for _, text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        for (conv, _, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
            ids = np.array(ids, np.int32)
            mask = span_mask(ids, np.array([o[0] for o in offsets], np.int64), spans, special_ids)
            if not mask.any():
                if on_bad_record == "error":
                    raise DataError(conv.where, "messages", "no assistant token survives tokenization", "no_loss_tokens")
                skipped["no_loss_tokens"] += 1
                continue
            all_ids.append(ids)
            all_masks.append(mask)
            records.append(conv.record)
    return all_ids, all_masks, records, skipped


def _chunks(items):
    for i in range(0, len(items), ENCODE_CHUNK):
        yield items[i:i + ENCODE_CHUNK]


def load_or_tokenize(source: dict, tokenizer, settings: dict, cache_dir: Path,
                     shard: tuple[int, int] = (0, 1)) -> TokenizedSource:
    """The tokenized source (only its records `index` mod `count` for `shard=(index, count)`)
    from the cache, or tokenized now and cached.

    `settings`: render, loss_on, template_kwargs, system_prompt, on_bad_record. The cache key
    covers them, the tokenizer's files and template, the source's format options and contents,
    and the shard.
    """
    key_material = {
        "shard": list(shard),
        "version": CACHE_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings,
        "source": {k: source[k] for k in ("format", "columns", "split", "subset")},
        "contents": fingerprint_source(source),
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True, default=str).encode()).hexdigest()[:40]
    folder = Path(cache_dir) / key
    if (folder / "info.json").exists():
        return _load(folder)

    read = read_source(source, system_prompt=settings["system_prompt"], on_bad_record=settings["on_bad_record"], shard=shard)
    if settings["render"] == "raw" and any(c.prompt_completion is None for c in read.conversations):
        raise ValueError(f"data.render='raw' needs single-turn data; {source['path']} is {read.format}")
    ids, masks, records, skipped = tokenize_conversations(
        read.conversations, tokenizer, render=settings["render"], loss_on=settings["loss_on"],
        template_kwargs=settings["template_kwargs"], on_bad_record=settings["on_bad_record"],
    )
    lengths = np.array([len(t) for t in ids], np.int64)
    tokens = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    loss_mask = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
    info = {
        "path": source["path"],
        "format": read.format,
        "records": read.records,
        "skipped": dict(read.skipped + skipped),
        "samples": len(ids),
        "tokens": int(lengths.sum()),
        "loss_tokens": int(loss_mask.sum()),
        "cache_key": key,
    }
    _save(folder, tokens, loss_mask, np.concatenate([[0], np.cumsum(lengths)]), np.array(records, np.int64), info)
    return _load(folder)


def _save(folder: Path, tokens, loss_mask, offsets, records, info) -> None:
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "tokens.npy", tokens.astype(np.int32))
    np.save(tmp / "loss_mask.npy", loss_mask.astype(np.uint8))
    np.save(tmp / "offsets.npy", offsets.astype(np.int64))
    np.save(tmp / "records.npy", records)
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached the same key first
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path) -> TokenizedSource:
    offsets = np.load(folder / "offsets.npy")
    mmap = "r" if offsets[-1] > 0 else None  # an empty file cannot be memory-mapped
    return TokenizedSource(
        tokens=np.load(folder / "tokens.npy", mmap_mode=mmap),
        loss_mask=np.load(folder / "loss_mask.npy", mmap_mode=mmap),
        offsets=offsets,
        records=np.load(folder / "records.npy"),
        info=json.loads((folder / "info.json").read_text()),
    )
