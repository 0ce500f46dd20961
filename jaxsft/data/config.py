"""The `data` section of a run config, its defaults and its validation.

| key | default | meaning |
|---|---|---|
| `sources` | `[]` | Training sources (stacked mode). Each a dict, see SOURCE_DEFAULTS below. |
| `mode` | `'stacked'` | `'stacked'`: all sources shuffled together. `'phased'`: run `phases` in order. |
| `phases` | `[]` | Phased mode: list of `{'sources': [...], 'epochs': 1.0, 'replay_fraction': 0.0}`. A phase's samples are its sources (each with its own weight/epochs) repeated `epochs` times; `replay_fraction` r in [0, 1) is the share of the phase's samples drawn from the sources of earlier phases. |
| `eval_sources` | `[]` | Held-out sources (same dict shape as `sources`, weights/epochs ignored). |
| `eval_fraction` | `0.0` | With no `eval_sources`: hold out this fraction of every training source's records (0 = no eval set). Whole records (an OASST tree with all its paths) are held out, chosen by `seed`, the source's path and its record count only, so runs with other tokenizers, lengths, settings or process counts hold out the same records. |
| `tokenizer` | `''` | Tokenizer folder; `''` = the model path given by the caller. |
| `chat_template` | `''` | A Jinja chat template, or the path of a file holding one, that replaces the tokenizer's (base models without one, ChatML on a new model); checked at start-up on a tiny conversation, and used by the GSM8K eval and the export too. `''` = the tokenizer's own. |
| `chat_template_kwargs` | `{}` | Extra keyword arguments for `apply_chat_template`, e.g. `{'date_string': '26 Jul 2024'}`. |
| `render` | `'chat_template'` | How non-chat formats become tokens: `'chat_template'` (user/assistant turns) or `'raw'` (bos + prompt + completion + eos, loss on completion + eos). |
| `system_prompt` | `''` | System message added to non-chat formats when rendered with the chat template; `''` = none. |
| `loss_on` | `'all_assistant'` | `'all_assistant'`: every assistant turn is a label; `'last_assistant'`: only the last one. |
| `max_seq_len` | `2048` | Tokens per packed row (after the one-token shift). |
| `global_batch_size` | `64` | Samples per optimizer step, over all processes. |
| `micro_batch_rows` | `4` | Packed rows per batch device per micro-batch (the token budget is this × `max_seq_len`). |
| `on_overlength` | `'truncate'` | Samples longer than `max_seq_len`: `'truncate'` (keep the head; dropped if no loss token is left) or `'drop'`. |
| `on_bad_record` | `'error'` | Malformed records: `'error'` stops naming file, line and field; `'skip'` skips and counts by reason. |
| `seed` | `0` | Seeds shuffling, mixing and the eval hold-out. |
| `cache_dir` | `''` | Tokenized-data cache; `''` = `$JAXSFT_CACHE/data` or `~/.cache/jaxsft/data`. |
| `prefetch` | `2` | Steps prepared ahead by a background thread (0 = prepare on demand). |

Source dict keys (SOURCE_DEFAULTS):

| key | default | meaning |
|---|---|---|
| `path` | required | Local or `gs://` JSONL/JSON/Parquet file or glob (`.gz` allowed), or a Hugging Face Hub dataset name. |
| `format` | `'auto'` | `auto`, `chat` (`messages`, optional `tools`; roles system/user/assistant/tool, assistant `tool_calls`, content a string or a list of text parts), `alpaca`, `prompt_completion`, `gsm8k`, `oasst` (message trees), `text` (a `text` field, bos + text + eos, every token a label: continued pre-training), `columns`. |
| `columns` | `{}` | For `format='columns'`: maps `prompt`, `completion` (and optionally `system`), or `messages`, to the record's own column names. |
| `weight` | `None` | Relative share of the mixture; the epoch has as many samples as all weighted sources together. |
| `epochs` | `None` | Passes over this source per epoch (may be fractional). Neither set = 1 epoch. Do not mix weights and epochs within one source list. |
| `split` | `'train'` | Split of a Hub dataset (local files have no splits). |
| `subset` | `''` | Configuration name of a Hub dataset. |
"""

from __future__ import annotations

import ml_collections

FORMATS = ("auto", "chat", "alpaca", "prompt_completion", "gsm8k", "oasst", "text", "columns")
SOURCE_DEFAULTS = dict(path="", format="auto", columns={}, weight=None, epochs=None, split="train", subset="")
PHASE_DEFAULTS = dict(sources=[], epochs=1.0, replay_fraction=0.0)
CHOICES = dict(
    mode=("stacked", "phased"),
    render=("chat_template", "raw"),
    loss_on=("all_assistant", "last_assistant"),
    on_overlength=("truncate", "drop"),
    on_bad_record=("error", "skip"),
)


def default_data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            sources=[],
            mode="stacked",
            phases=[],
            eval_sources=[],
            eval_fraction=0.0,
            tokenizer="",
            chat_template="",
            chat_template_kwargs={},
            render="chat_template",
            system_prompt="",
            loss_on="all_assistant",
            max_seq_len=2048,
            global_batch_size=64,
            micro_batch_rows=4,
            on_overlength="truncate",
            on_bad_record="error",
            seed=0,
            cache_dir="",
            prefetch=2,
        )
    )


def as_dict(value) -> dict:
    """A plain dict from a dict or a (nested) ConfigDict."""
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _with_defaults(value, defaults: dict, key: str, required: str) -> dict:
    """A dict (or ConfigDict) with unknown keys refused and the defaults filled in."""
    if not isinstance(value, dict) and not hasattr(value, "to_dict"):
        raise ValueError(f"data.{key} must be a dict with {required}, got {value!r}")
    value = as_dict(value)
    unknown = set(value) - set(defaults)
    if unknown:
        raise ValueError(f"data.{key} has unknown keys {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **value}


def normalize_source(source, key: str) -> dict:
    """Returns the source with defaults filled in, or raises ValueError naming `key`."""
    if isinstance(source, str):
        source = {"path": source}
    source = _with_defaults(source, SOURCE_DEFAULTS, key, "'path'")
    if not isinstance(source["path"], str) or not source["path"]:
        raise ValueError(f"data.{key}.path must be a non-empty string")
    if source["format"] not in FORMATS:
        raise ValueError(f"data.{key}.format is {source['format']!r}; expected one of {FORMATS}")
    if source["format"] == "columns":
        cols = source["columns"]
        names = set(cols) if isinstance(cols, dict) else set()
        if names != {"messages"} and not {"prompt", "completion"} <= names <= {"prompt", "completion", "system"}:
            raise ValueError(
                f"data.{key}.columns must map 'prompt' and 'completion' (optionally 'system'), or 'messages', "
                f"to column names; got {cols!r}"
            )
    if source["weight"] is not None and source["epochs"] is not None:
        raise ValueError(f"data.{key}: set weight or epochs, not both")
    for field in ("weight", "epochs"):
        value = source[field]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"data.{key}.{field} must be a positive number, got {value!r}")
    return source


def normalize_sources(sources, key: str) -> list[dict]:
    if not isinstance(sources, (list, tuple)):
        raise ValueError(f"data.{key} must be a list of source dicts, got {type(sources).__name__}")
    out = [normalize_source(s, f"{key}[{i}]") for i, s in enumerate(sources)]
    if any(s["weight"] is not None for s in out) and any(s["weight"] is None for s in out):
        raise ValueError(f"data.{key}: give every source a weight, or none (use epochs instead)")
    return out


def normalize_phases(phases) -> list[dict]:
    if not isinstance(phases, (list, tuple)):
        raise ValueError("data.phases must be a list of phase dicts")
    out = []
    for i, phase in enumerate(phases):
        phase = _with_defaults(phase, PHASE_DEFAULTS, f"phases[{i}]", "'sources'")
        phase["sources"] = normalize_sources(phase["sources"], f"phases[{i}].sources")
        if not phase["sources"]:
            raise ValueError(f"data.phases[{i}].sources is empty")
        if not isinstance(phase["epochs"], (int, float)) or phase["epochs"] <= 0:
            raise ValueError(f"data.phases[{i}].epochs must be a positive number, got {phase['epochs']!r}")
        r = phase["replay_fraction"]
        if not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise ValueError(f"data.phases[{i}].replay_fraction must be in [0, 1), got {r!r}")
        if r > 0 and i == 0:
            raise ValueError("data.phases[0].replay_fraction must be 0: there is no earlier phase to replay")
        out.append(phase)
    return out


def validate_data_config(cfg) -> None:
    """Raises ValueError naming the offending key; returns None when `cfg` is usable."""
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            raise ValueError(f"data.{key} is {cfg[key]!r}; expected one of {choices}")
    sources = normalize_sources(cfg.sources, "sources")
    phases = normalize_phases(cfg.phases)
    normalize_sources(cfg.eval_sources, "eval_sources")
    if cfg.mode == "stacked":
        if not sources:
            raise ValueError("data.sources is empty: give at least one {'path': ...}")
        if phases:
            raise ValueError("data.phases is set but data.mode is 'stacked'; set data.mode='phased'")
    elif not phases:
        raise ValueError("data.mode is 'phased' but data.phases is empty")
    elif sources:
        raise ValueError("data.mode is 'phased': put the sources inside data.phases, and leave data.sources empty")
    for key in ("max_seq_len", "global_batch_size", "micro_batch_rows"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"data.{key} must be a positive integer, got {cfg[key]!r}")
    if cfg.max_seq_len < 2:
        raise ValueError("data.max_seq_len must be at least 2")
    if not isinstance(cfg.prefetch, int) or cfg.prefetch < 0:
        raise ValueError(f"data.prefetch must be a non-negative integer, got {cfg.prefetch!r}")
    if not isinstance(cfg.seed, int):
        raise ValueError(f"data.seed must be an integer, got {cfg.seed!r}")
    if not 0 <= cfg.eval_fraction < 1:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {cfg.eval_fraction!r}")
    if cfg.eval_fraction and len(cfg.eval_sources):
        raise ValueError("data.eval_fraction and data.eval_sources are both set; use one")
    if not isinstance(cfg.chat_template_kwargs, dict) and not hasattr(cfg.chat_template_kwargs, "to_dict"):
        raise ValueError(f"data.chat_template_kwargs must be a dict, got {cfg.chat_template_kwargs!r}")
    for key in ("tokenizer", "chat_template", "system_prompt", "cache_dir"):
        if not isinstance(cfg[key], str):
            raise ValueError(f"data.{key} must be a string, got {cfg[key]!r}")
