"""Llama 3.1 8B. `--config configs/llama3_1_8b.py` runs the paper's recipe;
`configs/llama3_1_8b.py:tulu` the
TULU-style one; `configs/llama3_1_8b.py:qlora` the TULU-style one as QLoRA (r=16 all-linear adapters
on an NF4 base, bf16 embeddings and head) for one 16 GiB chip. Point model.path at a Hugging Face folder or a converted checkpoint (local or gs://)
and data.sources at your data."""

from jaxsft.train.recipes import recipe_config


def get_config(recipe="paper"):
    if recipe == "qlora":
        c = recipe_config("tulu", model_path="models/Llama-3.1-8B-Instruct", learning_rate=2e-4)
        c.lora.r, c.lora.alpha, c.lora.target_modules, c.lora.base_quant = 16, 32.0, "all-linear", "nf4"
        c.model.param_dtype = "bfloat16"  # the embeddings, norms and head (the projections are NF4)
        c.train.output_dir = "runs/llama3_1_8b_qlora"
        c.data.sources = [{"path": "data/train.jsonl"}]
        return c
    c = recipe_config(recipe, model_path="models/Llama-3.1-8B-Instruct", learning_rate=2e-5)
    c.data.sources = [{"path": "data/train.jsonl"}]
    c.train.output_dir = "runs/llama3_1_8b_" + recipe
    return c
