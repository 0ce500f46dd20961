"""`python -m jaxsft.data --config configs/X.py [--config.data.key=value ...]`

Prints the data summary as JSON, then the first packed rows decoded with every label span
wrapped in [[...]], so masking can be checked before paying for a run.
"""

from __future__ import annotations

import json

import numpy as np

from jaxsft.cli import UsageError, parse_args
from jaxsft.data.pipeline import DataPipeline

ROWS_SHOWN = 2


def mark_labels(tokenizer, batch: dict[str, np.ndarray], row: int) -> str:
    """One row as text: each packed sample on its own line, label tokens inside [[...]]."""
    lines = []
    segments = batch["segment_ids"][row]
    for segment in np.unique(segments[segments > 0]):
        where = np.flatnonzero(segments == segment)
        # The sample is its first input token followed by all its targets.
        tokens = np.concatenate([batch["input_ids"][row, where[:1]], batch["targets"][row, where]])
        labels = np.concatenate([[0.0], batch["loss_mask"][row, where]]) > 0
        change = np.flatnonzero(np.diff(labels.astype(np.int8))) + 1
        pieces = []
        for run in np.split(np.arange(len(tokens)), change):
            text = tokenizer.decode(tokens[run].tolist(), skip_special_tokens=False)
            pieces.append(f"[[{text}]]" if labels[run[0]] else text)
        lines.append(f"--- row {row}, sample {segment} ({len(where)} tokens) ---\n" + "".join(pieces))
    return "\n".join(lines)


def main() -> None:
    from jaxsft.models import load_tokenizer  # as training loads it: HF folders, GGUF files, gs://

    config, _ = parse_args()
    if "data" not in config:
        raise UsageError("the config has no data section")
    tokenizer = load_tokenizer(config.data.tokenizer or config.model.path)
    pipeline = DataPipeline(config.data, tokenizer)
    try:
        print(json.dumps(pipeline.summary, indent=1))
        batch = next(pipeline).microbatches[0]
        for row in range(min(ROWS_SHOWN, len(batch["input_ids"]))):
            print(mark_labels(tokenizer, batch, row))
    finally:
        pipeline.close()


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad data or config: one clear line, not a traceback
        raise SystemExit(f"error: {e}") from None
