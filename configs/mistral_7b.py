"""Mistral 7B (the paper found 1e-6 best for Mistral). `--config configs/mistral_7b.py` runs the paper's recipe;
`configs/mistral_7b.py:tulu` the
TULU-style one. Point model.path at a Hugging Face folder or a converted checkpoint (local or gs://)
and data.sources at your data."""

from jaxsft.train.recipes import recipe_config


def get_config(recipe="paper"):
    c = recipe_config(recipe, model_path="models/Mistral-7B-v0.3", learning_rate=1e-6)
    c.data.sources = [{"path": "data/train.jsonl"}]
    c.train.output_dir = "runs/mistral_7b_" + recipe
    return c
