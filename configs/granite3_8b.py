"""Granite 3.x 8B. `--config configs/granite3_8b.py` runs the paper's recipe;
`configs/granite3_8b.py:tulu` the
TULU-style one. Point model.path at a Hugging Face folder or a converted checkpoint (local or gs://)
and data.sources at your data."""

from jaxsft.train.recipes import recipe_config


def get_config(recipe="paper"):
    c = recipe_config(recipe, model_path="models/granite-3.1-8b-instruct", learning_rate=2e-5)
    c.data.sources = [{"path": "data/train.jsonl"}]
    c.train.output_dir = "runs/granite3_8b_" + recipe
    return c
