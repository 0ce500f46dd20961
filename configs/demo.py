"""The README's first command: a tiny random Qwen2-shaped model fine-tuned on real GSM8K
problems (chat template, assistant-only loss), on CPU, in a few minutes."""

import os

from jaxsft.train import default_config

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def get_config():
    c = default_config()
    c.model.path = os.path.join(ASSETS, "tiny-qwen2")
    c.model.init = "random"
    c.model.remat = "auto"
    c.data.sources = [{"path": os.path.join(ASSETS, "gsm8k", "train.jsonl"), "format": "gsm8k"}]
    c.data.eval_sources = [{"path": os.path.join(ASSETS, "gsm8k", "test.jsonl"), "format": "gsm8k"}]
    c.data.max_seq_len = 512
    c.data.global_batch_size = 32
    c.data.micro_batch_rows = 2
    # A random model needs a far larger step than the recipe's 2e-5 for fine-tuning.
    c.optim.learning_rate = 5e-3
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 5
    c.optim.final_lr_fraction = 0.1
    c.train.num_steps = 40
    c.train.eval_every = 20
    c.train.output_dir = "runs/demo"
    c.train.export_hf = True
    return c
