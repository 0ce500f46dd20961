"""The early-pruning check on CPU: the demo's tiny random Qwen2-shaped model on the shipped GSM8K
subset, 2 batch sizes x 3 learning rates (constant schedule) = 6 runs of 128 samples each (sized
for a 2-core CPU: ~400 tokens/s), every run
trained to the end (`action='flag'`) so the rule's picks can be compared with the real outcome.
`--config.action=stop` prunes for real. The paper's own grid (batch 128 / 3,840 / 7,680, LR 1e-6
to 1e-4, constant vs warmup) is the same config with a pretrained model and larger numbers."""

import os

from jaxsft.sweep import default_sweep_config

CONFIGS = os.path.dirname(os.path.abspath(__file__))


def get_config():
    s = default_sweep_config()
    b = s.base
    b.model.path = os.path.join(CONFIGS, "assets", "tiny-qwen2")
    b.model.init = "random"
    b.model.compute_dtype = "float32"  # as benchmarks/results/sweep_gsm8k_* were measured
    b.model.remat = "auto"
    gsm8k = os.path.join(CONFIGS, "assets", "gsm8k")
    b.data.sources = [{"path": os.path.join(gsm8k, "train.jsonl"), "format": "gsm8k"}]
    b.data.eval_fraction = 0.03  # 60 held-out problems: a cheap eval on CPU
    b.data.max_seq_len = 256
    b.data.micro_batch_rows = 4
    b.train.eval_at_start = False
    b.checkpoint.every_steps = 8  # resume granularity when the sweep is killed
    s.output_dir = "runs/sweep_gsm8k"
    s.train_samples = 128
    s.batch_sizes = [4, 16]
    # A random model needs far larger steps than the recipe's 2e-5 for a pretrained one.
    s.learning_rates = [1e-3, 3e-3, 1e-2]
    s.schedules = ["constant"]
    s.warmup_fractions = [0.0]
    s.rungs = [0.25, 0.5]
    s.window = 0.25
    s.action = "flag"
    return s
