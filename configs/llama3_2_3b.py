"""Llama 3.2 3B. `--config configs/llama3_2_3b.py` runs the paper's recipe;
`configs/llama3_2_3b.py:tulu` the
TULU-style one. Point model.path at a Hugging Face folder or a converted checkpoint (local or gs://)
and data.sources at your data."""

from jaxsft.train.recipes import recipe_config


def get_config(recipe="paper"):
    c = recipe_config(recipe, model_path="models/Llama-3.2-3B-Instruct", learning_rate=2e-5)
    c.data.sources = [{"path": "data/train.jsonl"}]
    c.train.output_dir = "runs/llama3_2_3b_" + recipe
    return c
