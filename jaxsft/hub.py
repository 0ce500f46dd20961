"""The Hugging Face Hub: a model id as `model.path` (downloaded once into the HF cache, found there
offline) and a run's export pushed to a model repo at its end (`train.push_to_hub`).

The endpoint, the cache and the credentials are huggingface_hub's own: `HF_ENDPOINT`,
`HF_HUB_CACHE` / `HF_HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN` or `hf auth login`."""

from __future__ import annotations

import os
import re

from jaxsft.models.config import ModelNotFound

# 'owner/name' with the characters the Hub allows (huggingface_hub's validate_repo_id).
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

# What a model folder needs: config, safetensors weights, tokenizer, chat template. Not the
# .bin / .pth / .gguf copies many repos also carry (Llama's original/*.pth alone is gigabytes).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def is_hub_id(path: str) -> bool:
    """'owner/name' that is not an existing local path (the rule transformers follows too)."""
    return bool(HUB_ID.fullmatch(path)) and not path.endswith(".gguf") and not os.path.exists(path)


def resolve_model_path(path: str, config_only: bool = False) -> str:
    """A local path, `gs://` path or `.gguf` file as given; a Hub id -> its snapshot folder in the
    HF cache, downloaded there first if missing (or found there offline); `config_only`: its json
    files alone (config.json first, the weights once the plan says the run fits)."""
    if not is_hub_id(path):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(path, allow_patterns=["*.json"] if config_only else MODEL_FILES)
    except RepositoryNotFoundError as e:
        raise ModelNotFound(
            f"{path!r} is not a local path, and the Hugging Face Hub has no model {path!r} you can read "
            f"(a gated model needs its license accepted on the Hub and `hf auth login`): {e}") from None
    except LocalEntryNotFoundError as e:
        why = ("its cached copy is incomplete" if isinstance(e, IncompleteSnapshotError) else
               "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached")
        cache = constants.HF_HUB_CACHE
        raise ModelNotFound(
            f"{path!r} is not a local path, and as a Hugging Face Hub model it is not in the cache {cache} "
            f"({why}). Where there is network, run `hf download {path} "
            f"--include {' '.join(repr(p) for p in MODEL_FILES)} --cache-dir {cache}` "
            f"(or give model.path a local folder)") from None


def push_to_hub(folder: str, repo_id: str, commit_message: str = "Upload a jaxsft fine-tune") -> str:
    """Uploads every file of `folder` to the model repo `repo_id`, created first when missing
    (with the account's default visibility: public unless the account or organisation defaults to
    private). Returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message).commit_url
