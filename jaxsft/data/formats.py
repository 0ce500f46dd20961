"""Reading records from files or the Hub, detecting their format, and turning them into conversations.

Every record becomes one or more conversations: lists of `{'role', 'content'}` with roles
system/user/assistant/tool and at least one assistant turn (assistant messages may carry
`tool_calls`; a content given as a list of text parts is joined with newlines), or a plain text
(`format='text'`). A malformed record raises `DataError`
naming the file, the line (or record/row) and the field; with `on_bad_record='skip'` it is
counted by `DataError.reason` instead.
"""

from __future__ import annotations

import codecs
import collections
import functools
import glob
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field

import fsspec
import fsspec.implementations.local

ROLES = ("system", "user", "assistant", "tool")
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".ndjson")


class DataError(ValueError):
    """A bad record or source; `reason` is the short key it is counted under when skipped."""

    def __init__(self, where: str, field_name: str | None, problem: str, reason: str):
        self.reason = reason
        location = f"{where}, field '{field_name}'" if field_name else where
        super().__init__(f"{location}: {problem}")


@dataclass
class Conversation:
    messages: list[dict]
    where: str
    # For the raw render of single-turn formats; None for chat data.
    prompt_completion: tuple[str, str] | None = None
    record: int = 0  # the record's number in the source, counted across its files
    tools: list | None = None  # tool definitions handed to the chat template
    text: str | None = None  # format='text': a plain document, every token a label


@dataclass
class ReadResult:
    conversations: list[Conversation] = field(default_factory=list)
    records: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    format: str = ""


def is_hub_name(path: str) -> bool:
    if "://" in path or os.path.exists(path) or glob.has_magic(path) or path.endswith(FILE_SUFFIXES):
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None


def expand_files(path: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, _, files = fsspec.get_fs_token_paths(path)
    files = sorted(f for f in files if not fs.isdir(f))
    if not files:
        raise DataError(path, None, "no file matches this path", "no_files")
    return fs, files


def fingerprint_source(source: dict) -> dict:
    """What identifies the source's contents: file digests, or the Hub dataset's own fingerprint."""
    if is_hub_name(source["path"]):
        return {"hub": source["path"], "subset": source["subset"], "split": source["split"],
                "fingerprint": load_hub_dataset(source)._fingerprint}
    fs, files = expand_files(source["path"])
    digests = {}
    for f in files:
        if _is_local(fs):
            digest = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(chunk)
            digests[f] = digest.hexdigest()
        else:  # remote: the store's own checksum (md5/crc/etag), without downloading
            digests[f] = str(fs.checksum(f))
    return {"files": digests}


def _is_local(fs) -> bool:
    return isinstance(fs, fsspec.implementations.local.LocalFileSystem)


def load_hub_dataset(source: dict):
    import datasets  # slow import, only for Hub sources

    return datasets.load_dataset(source["path"], source["subset"] or None, split=source["split"])


def iter_raw_records(source: dict):
    """Yields (where, decode) in file order; `decode()` returns the record or a DataError. JSON
    lines are decoded only when asked, so a shard passes over the other shards' records cheaply."""
    if is_hub_name(source["path"]):
        for i, record in enumerate(load_hub_dataset(source)):
            yield f"{source['path']}[{source['split']}], row {i}", functools.partial(_as_is, record)
        return
    fs, files = expand_files(source["path"])
    for f in files:
        name = f if _is_local(fs) else fs.unstrip_protocol(f)
        base = f.removesuffix(".gz")
        with fs.open(f, "rb", compression="infer") as fh:
            if base.endswith(".parquet"):
                import pyarrow.parquet as pq

                row = 0
                for batch in pq.ParquetFile(fh).iter_batches():
                    for record in batch.to_pylist():
                        yield f"{name}, row {row}", functools.partial(_as_is, record)
                        row += 1
            elif base.endswith(".json"):  # one JSON document: read whole
                try:
                    text = fh.read().decode("utf-8-sig")
                except UnicodeDecodeError as e:
                    raise DataError(name, None, f"not UTF-8 text: {e}", "not_utf8") from None
                try:
                    data = json.loads(text)
                except json.JSONDecodeError:
                    yield from _json_lines(name, io.BytesIO(text.encode()))  # a .json file holding JSON lines
                    continue
                if isinstance(data, dict):  # {"data": [records]} as written by pandas/datasets, or one record
                    data = data["data"] if isinstance(data.get("data"), list) else [data]
                for i, record in enumerate(data if isinstance(data, list) else [data]):
                    yield f"{name}, record {i}", functools.partial(_as_is, record)
            else:
                yield from _json_lines(name, fh)


def _as_is(record):
    return record


def _json_lines(name: str, fh):
    """(where, decode) per non-empty line of a binary file, read line by line (bounded memory).
    Split on b"\n" only: JSON strings may hold raw U+2028 and other line breaks. A line that is
    not UTF-8 is a bad record naming its line; a UTF-8 BOM before the first line is skipped."""
    for lineno, line in enumerate(fh, 1):
        if lineno == 1:
            line = line.removeprefix(codecs.BOM_UTF8)
        if line.strip():
            where = f"{name}, line {lineno}"
            yield where, functools.partial(_decode_line, where, line)


def _decode_line(where: str, line: bytes):
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(where, None, f"not UTF-8 text: {e}", "not_utf8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return DataError(where, None, f"bad JSON: {e}", "bad_json")


def detect_format(record: dict, where: str) -> str:
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if isinstance(record.get("prompt"), dict) and "replies" in record["prompt"]:
        return "oasst"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if "text" in keys:
        return "text"
    raise DataError(
        where, None,
        f"cannot detect the format from keys {sorted(keys)}; set format to one of chat, alpaca, "
        "prompt_completion, gsm8k, oasst, text, or format='columns' with a columns mapping",
        "unknown_format",
    )


def read_source(source: dict, *, system_prompt: str, on_bad_record: str, shard: tuple[int, int] = (0, 1)) -> ReadResult:
    """`stream_source` gathered into a list."""
    result = ReadResult(format=source["format"])
    result.conversations = list(stream_source(source, result, system_prompt=system_prompt,
                                              on_bad_record=on_bad_record, shard=shard))
    return result


def stream_source(source: dict, result: ReadResult, *, system_prompt: str, on_bad_record: str,
                  shard: tuple[int, int] = (0, 1)):
    """Yields the conversations of the records numbered `index` mod `count` for
    `shard=(index, count)`, one record at a time; counts records, skips and the format in `result`.

    The other records are not decoded, except that an auto-detected format comes from the
    source's first decodable record, so every shard detects the same one.
    """
    index, count = shard
    for number, (where, decode) in enumerate(iter_raw_records(source)):
        mine = number % count == index
        if not mine and result.format != "auto":
            continue
        result.records += mine
        record = decode()
        try:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict):
                raise DataError(where, None, f"expected a JSON object, got {type(record).__name__}", "not_an_object")
            if result.format == "auto":
                result.format = detect_format(record, where)
            if mine:
                conversations = to_conversations(record, result.format, source["columns"], system_prompt, where)
        except DataError as e:
            if e.reason == "unknown_format":
                raise
            if not mine:  # its own shard reports it
                continue
            if on_bad_record == "error":
                raise
            result.skipped[e.reason] += 1
            continue
        if mine:
            for conversation in conversations:
                conversation.record = number
                yield conversation


def _text(record: dict, key: str, where: str, field_name: str | None = None, *, optional: bool = False) -> str:
    field_name = field_name or key
    if key not in record or record[key] is None:
        if optional:
            return ""
        raise DataError(where, field_name, "missing", "missing_field")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(where, field_name, f"expected a string, got {type(value).__name__}", "non_string_content")
    if not value.strip() and not optional:
        raise DataError(where, field_name, "empty", "empty_content")
    return value


def single_turn(prompt: str, completion: str, system_prompt: str, where: str) -> Conversation:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return Conversation(messages, where, (prompt, completion))


def to_conversations(record: dict, fmt: str, columns: dict, system_prompt: str, where: str) -> list[Conversation]:
    if fmt == "columns":
        if "messages" in columns:
            return to_conversations({"messages": _get(record, columns["messages"], where)}, "chat", {}, "", where)
        prompt = _text(record, columns["prompt"], where)
        completion = _text(record, columns["completion"], where)
        system = _text(record, columns["system"], where, optional=True) if "system" in columns else ""
        return [single_turn(prompt, completion, system or system_prompt, where)]
    if fmt == "chat":
        tools = record.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise DataError(where, "tools", "expected a list of tool definitions (objects)", "bad_tools")
        return [Conversation(check_messages(_get(record, "messages", where), where), where, tools=tools or None)]
    if fmt == "text":
        return [Conversation([], where, text=_text(record, "text", where))]
    if fmt == "alpaca":
        instruction = _text(record, "instruction", where)
        extra = _text(record, "input", where, optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [single_turn(prompt, _text(record, "output", where), system_prompt, where)]
    if fmt == "prompt_completion":
        return [single_turn(_text(record, "prompt", where), _text(record, "completion", where), system_prompt, where)]
    if fmt == "gsm8k":
        return [single_turn(_text(record, "question", where), _text(record, "answer", where), system_prompt, where)]
    if fmt == "oasst":
        return [Conversation(m, where) for m in oasst_paths(_get(record, "prompt", where), where)]
    raise ValueError(f"unknown format {fmt!r}")


def _get(record: dict, key: str, where: str):
    if key not in record:
        raise DataError(where, key, "missing", "missing_field")
    return record[key]


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(where, "messages", "expected a non-empty list of {role, content}", "missing_field")
    out = []
    for i, message in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(where, name, f"expected an object, got {type(message).__name__}", "not_an_object")
        if "role" not in message:
            raise DataError(where, f"{name}.role", "missing", "missing_field")
        role = message["role"]
        if role not in ROLES:
            raise DataError(where, f"{name}.role", f"unknown role {role!r}; expected one of {ROLES}", "unknown_role")
        checked = {"role": role}
        if message.get("tool_calls"):
            if role != "assistant":
                raise DataError(where, f"{name}.tool_calls", "only assistant messages make tool calls", "bad_tool_call")
            checked["tool_calls"] = check_tool_calls(message["tool_calls"], where, f"{name}.tool_calls")
        checked["content"] = _content(message, where, name, optional="tool_calls" in checked)
        for key in ("name", "tool_call_id"):  # which tool answered (templates may show it)
            if message.get(key) is not None:
                checked[key] = _text(message, key, where, f"{name}.{key}")
        out.append(checked)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(where, "messages", "the conversation has no assistant turn", "no_assistant_turn")
    return out


def _content(message: dict, where: str, name: str, *, optional: bool) -> str:
    """A message's text: a string, or a list of {'type': 'text', 'text': ...} parts joined with newlines."""
    parts = message.get("content")
    if not isinstance(parts, list):
        return _text(message, "content", where, f"{name}.content", optional=optional)
    texts = []
    for j, part in enumerate(parts):
        if not (isinstance(part, dict) and isinstance(part.get("text"), str)):
            raise DataError(where, f"{name}.content[{j}]", "expected a string or a list of "
                            "{'type': 'text', 'text': ...} parts", "non_string_content")
        if part.get("type", "text") != "text":
            raise DataError(where, f"{name}.content[{j}]", f"part type {part['type']!r}: only text is supported",
                            "non_text_content")
        texts.append(part["text"])
    return _text({"content": "\n".join(texts)}, "content", where, f"{name}.content", optional=optional)


def check_tool_calls(calls, where: str, name: str) -> list[dict]:
    """OpenAI-style calls ({'type': 'function', 'function': {name, arguments}} or {name, arguments})
    as templates expect them: arguments a dict (a JSON string is decoded)."""
    if not isinstance(calls, list):
        raise DataError(where, name, "expected a list of tool calls", "bad_tool_call")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(where, f"{name}[{j}]", "expected {'function': {'name': ..., 'arguments': ...}}", "bad_tool_call")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise DataError(where, f"{name}[{j}].arguments", f"bad JSON: {e}", "bad_tool_call") from e
        if not isinstance(arguments, dict):
            raise DataError(where, f"{name}[{j}].arguments", "expected an object", "bad_tool_call")
        checked = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            checked["id"] = call["id"]
        out.append(checked)
    return out


def oasst_paths(root, where: str) -> list[list[dict]]:
    """Every root-to-leaf path of an OASST message tree, cut after its last assistant message.

    A path ending in a user message is cut back to its last assistant reply; the cut paths that
    coincide (siblings that are all unanswered prompts) are kept once.
    """
    conversations, seen = [], set()

    def walk(node, name, path):
        if not isinstance(node, dict):
            raise DataError(where, name, "expected a message object", "not_an_object")
        if node.get("deleted"):
            return
        role = node.get("role")
        if role is None:
            raise DataError(where, f"{name}.role", "missing", "missing_field")
        if role not in OASST_ROLES:
            raise DataError(where, f"{name}.role", f"unknown role {role!r}; expected prompter or assistant", "unknown_role")
        path = path + [({"role": OASST_ROLES[role], "content": _text(node, "text", where, f"{name}.text")}, id(node))]
        replies = node.get("replies") or []
        if not isinstance(replies, list):
            raise DataError(where, f"{name}.replies", "expected a list", "not_an_object")
        live = [r for r in replies if not (isinstance(r, dict) and r.get("deleted"))]
        if not live:
            while path and path[-1][0]["role"] != "assistant":
                path = path[:-1]
            key = tuple(node_id for _, node_id in path)
            if path and key not in seen:
                seen.add(key)
                conversations.append([m for m, _ in path])
        for i, reply in enumerate(replies):
            walk(reply, f"{name}.replies[{i}]", path)

    walk(root, "prompt", [])
    if not conversations:
        raise DataError(where, "prompt", "the message tree has no assistant reply", "no_assistant_turn")
    return conversations
