"""Conversations to token ids and loss masks through the model's chat template, cached on disk.

The assistant spans come from `jaxsft.data.chat.assistant_spans`; tokens whose offsets start
inside a span are labels, up to and including the first special token after the reply's content
(its end-of-turn marker). Plain-text records (`format='text'`) are bos + text + eos, every token
a label.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np

from jaxsft.data.chat import TemplateMismatch, assistant_spans, special_strings
from jaxsft.data.chat import render as render_chat
from jaxsft.data.formats import Conversation, DataError, ReadResult, fingerprint_source, stream_source

CACHE_VERSION = 3  # 3: spans located for templates that rewrite turns; tool calls; plain text
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
ENCODE_CHUNK = 1024


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


def span_mask(ids: np.ndarray, offsets: np.ndarray, spans, special_ids: np.ndarray) -> np.ndarray:
    """1 on the tokens overlapping a span's [start, end), cut after the first special token
    starting at or after its content_end (the end-of-turn marker). A token that straddles the
    header and the reply (']-' after '[/INST]') is a label: it holds the reply's first character."""
    mask = np.zeros(len(ids), np.uint8)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for start, content_end, end in spans:
        inside = np.nonzero((ends > start) & (starts < end))[0]
        marker = inside[(starts[inside] >= content_end) & np.isin(ids[inside], special_ids)]
        if len(marker):
            inside = inside[inside <= marker[0]]
        mask[inside] = 1
    return mask


def tokenize_conversations(conversations: list[Conversation], tokenizer, *, render: str, loss_on: str,
                           template_kwargs: dict, on_bad_record: str):
    """Returns (token arrays, mask arrays, record numbers, Counter of skipped records by reason)."""
    skipped = collections.Counter()
    samples = list(tokenized(conversations, tokenizer, skipped, render=render, loss_on=loss_on,
                             template_kwargs=template_kwargs, on_bad_record=on_bad_record))
    return [x[0] for x in samples], [x[1] for x in samples], [x[2] for x in samples], skipped


def tokenized(conversations, tokenizer, skipped: collections.Counter, *, render: str, loss_on: str,
              template_kwargs: dict, on_bad_record: str):
    """Yields (token ids, loss mask, record number) per sample of an iterable of conversations,
    a chunk at a time; counts the skipped records by reason in `skipped`."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if render == "raw":
        if not eos:
            raise ValueError("data.render='raw' needs a tokenizer with an eos token")
        for chunk in _chunks(conversations):
            pairs = [c.prompt_completion or ("", c.text) for c in chunk]
            prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
            completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
            for conv, p, c in zip(chunk, prompts, completions):
                ids = bos + p + c + eos
                unlabelled = 0 if conv.text is not None else len(bos) + len(p)  # plain text: all labels
                yield (np.array(ids, np.int32),
                       np.array([0] * unlabelled + [1] * (len(ids) - unlabelled), np.uint8), conv.record)
        return

    special_ids = special_token_ids(tokenizer)
    specials = special_strings(tokenizer)
    for chunk in _chunks(conversations):
        rendered = []
        for conv in chunk:
            if conv.text is not None:
                rendered.append((conv, conv.text, None))
                continue
            try:
                full, spans = assistant_spans(
                    lambda msgs, gen: render_chat(tokenizer, msgs, gen, template_kwargs, conv.tools),
                    conv.messages, specials)
            except (jinja2.TemplateError, TemplateMismatch) as e:
                reason = "template_mismatch" if isinstance(e, TemplateMismatch) else "template_error"
                if on_bad_record == "error":
                    problem = "the chat template refused it" if reason == "template_error" else "no loss mask"
                    raise DataError(conv.where, "messages", f"{problem}: {e}", reason) from e
                skipped[reason] += 1
                continue
            rendered.append((conv, full, spans[-1:] if loss_on == "last_assistant" else spans))
        if not rendered:  # every record of the chunk was skipped
            continue
        encoded = tokenizer([text for _, text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        for (conv, _, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
            if spans is None:  # plain text: every token is a label
                ids = np.array(bos + ids + eos, np.int32)
                yield ids, np.ones(len(ids), np.uint8), conv.record
                continue
            ids = np.array(ids, np.int32)
            offsets = np.fromiter(itertools.chain.from_iterable(offsets), np.int64, 2 * len(offsets)).reshape(-1, 2)
            mask = span_mask(ids, offsets, spans, special_ids)
            if not mask.any():
                if on_bad_record == "error":
                    raise DataError(conv.where, "messages", "no assistant token survives tokenization", "no_loss_tokens")
                skipped["no_loss_tokens"] += 1
                continue
            yield ids, mask, conv.record


def _chunks(items):
    items = iter(items)
    while chunk := list(itertools.islice(items, ENCODE_CHUNK)):
        yield chunk


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

    read = ReadResult(format=source["format"])
    conversations = stream_source(source, read, system_prompt=settings["system_prompt"],
                                  on_bad_record=settings["on_bad_record"], shard=shard)
    if settings["render"] == "raw":
        conversations = _single_turn(conversations, source, read)
    skipped = collections.Counter()
    # Streamed to disk sample by sample: memory stays bounded whatever the source's size.
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    lengths, records, loss_tokens = [], [], 0
    with open(tmp / "tokens.bin", "wb") as tokens, open(tmp / "loss_mask.bin", "wb") as masks:
        for ids, mask, record in tokenized(
                conversations, tokenizer, skipped, render=settings["render"], loss_on=settings["loss_on"],
                template_kwargs=settings["template_kwargs"], on_bad_record=settings["on_bad_record"]):
            tokens.write(ids.astype(np.int32).tobytes())
            masks.write(mask.astype(np.uint8).tobytes())
            lengths.append(len(ids))
            records.append(record)
            loss_tokens += int(mask.sum())
    lengths = np.array(lengths, np.int64)
    _raw_to_npy(tmp / "tokens.bin", np.int32)
    _raw_to_npy(tmp / "loss_mask.bin", np.uint8)
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(tmp / "records.npy", np.array(records, np.int64))
    info = {
        "path": source["path"],
        "format": read.format,
        "records": read.records,
        "skipped": dict(read.skipped + skipped),
        "samples": len(lengths),
        "tokens": int(lengths.sum()),
        "loss_tokens": loss_tokens,
        "cache_key": key,
    }
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached the same key first
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(folder)


def _single_turn(conversations, source: dict, read: ReadResult):
    for c in conversations:
        if c.prompt_completion is None and c.text is None:
            raise ValueError(f"data.render='raw' needs single-turn data; {source['path']} is {read.format}")
        yield c


def _raw_to_npy(raw: Path, dtype) -> None:
    """`NAME.bin` (the values back to back) -> `NAME.npy`, copied in blocks; the .bin is removed."""
    count = raw.stat().st_size // np.dtype(dtype).itemsize
    with open(raw, "rb") as src, open(raw.with_suffix(".npy"), "wb") as dst:
        np.lib.format.write_array_header_1_0(
            dst, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (count,)})
        shutil.copyfileobj(src, dst, length=16 << 20)
    raw.unlink()


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
