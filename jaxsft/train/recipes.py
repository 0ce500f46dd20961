"""The two fine-tuning recipes that the model configs in configs/ offer.

- `paper`: "Unveiling the Secret Recipe" (2024): a large batch counted in samples (3,840), a low
  constant learning rate with no warmup, all data stacked into one phase.
- `tulu`: the TULU-style alternative: 128 samples per step, warmup for 3% of the run, then
  linear decay to zero.
"""

from jaxsft.models import ConfigError
from jaxsft.train.config import default_config

RECIPES = ("paper", "tulu")


def recipe_config(recipe: str, model_path: str, learning_rate: float = 2e-5):
    """A run config for a real model. Set `model.path` and `data.sources` on the command line
    (`--config.model.path=gs://...`, `--config.data.sources="[{'path': '...'}]"`)."""
    if recipe not in RECIPES:
        raise ConfigError(f"recipe {recipe!r}: choose one of {', '.join(RECIPES)} (configs/NAME.py:RECIPE)")
    c = default_config()
    c.model.path = model_path
    c.model.remat = "auto"
    c.data.max_seq_len = 4096
    c.data.micro_batch_rows = 1
    c.data.mode = "stacked"
    c.train.num_epochs = 1.0
    c.train.eval_every = 50
    c.train.export_hf = True
    c.checkpoint.every_steps = 50
    c.optim.learning_rate = learning_rate
    if recipe == "paper":
        c.data.global_batch_size = 3840
        c.optim.schedule = "constant"
    else:
        c.data.global_batch_size = 128
        c.optim.schedule = "warmup_linear"
        c.optim.warmup_fraction = 0.03
    return c
