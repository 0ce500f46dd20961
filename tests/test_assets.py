"""A clone of the repository runs its tests and benchmarks: nothing reads a sibling folder outside it."""

import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paths to a shared/ folder beside the repository (how the tests once found their assets).
OUTSIDE = re.compile(r"shared[/\"', ]+assets|\.\.[/\"', ]+\.\.[/\"', ]+shared|parents\[2\]")
SKIP_DIRS = {".git", ".venv", "assets", "results", "__pycache__", "runs", "build"}


def source_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith((".py", ".md", ".sh", ".sbatch", ".toml")) or name == "run":
                yield os.path.join(root, name)


def test_nothing_reads_assets_outside_the_repository():
    found = []
    for path in source_files():
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if OUTSIDE.search(line):
                    found.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
    assert not found, "reads outside the repository:\n" + "\n".join(found)


@pytest.mark.parametrize("name", ["train.jsonl", "test.jsonl"])
def test_gsm8k_copies_are_complete(assets, name):
    with open(assets / "data" / "gsm8k" / name) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == {"train.jsonl": 7473, "test.jsonl": 1319}[name]
    assert all(r["answer"].rsplit("#### ", 1)[1].strip() for r in rows)


def test_every_asset_folder_carries_its_license(assets):
    for folder in ("data/gsm8k", "data/chat", "tokenizers/llama-3.2-1b-instruct", "tokenizers/qwen2.5-0.5b-instruct"):
        assert any(n.startswith("LICENSE") for n in os.listdir(assets / folder)), folder
    assert (assets / "tokenizers/llama-3.2-1b-instruct/USE_POLICY.md").exists()
