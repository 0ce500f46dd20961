"""Qwen2.5 7B. `--config configs/qwen2_5_7b.py` runs the paper's recipe;
`configs/qwen2_5_7b.py:tulu` the
TULU-style one. Point model.path at a Hugging Face folder or a converted checkpoint (local or gs://)
and data.sources at your data."""

from jaxsft.train.recipes import recipe_config


def get_config(recipe="paper"):
    c = recipe_config(recipe, model_path="models/Qwen2.5-7B-Instruct", learning_rate=2e-5)
    c.data.sources = [{"path": "data/train.jsonl"}]
    c.train.output_dir = "runs/qwen2_5_7b_" + recipe
    return c
