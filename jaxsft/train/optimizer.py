"""AdamW with global-norm clipping, and the learning-rate schedules of the recipe and its rivals."""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("constant", "warmup_constant", "warmup_linear", "warmup_cosine")


def warmup_steps(optim, total_steps: int) -> int:
    if optim.warmup_fraction:
        return int(round(optim.warmup_fraction * total_steps))
    return int(optim.warmup_steps)


def make_schedule(optim, total_steps: int) -> optax.Schedule:
    """`constant` (the paper's recipe: no warmup, no decay) or warmup followed by constant,
    linear decay or cosine decay to `final_lr_fraction * learning_rate` at `total_steps`."""
    lr = optim.learning_rate
    if optim.schedule == "constant":
        return optax.constant_schedule(lr)
    warmup = warmup_steps(optim, total_steps)
    ramp = optax.linear_schedule(lr / max(warmup, 1), lr, max(warmup - 1, 0))
    rest = max(total_steps - warmup, 1)
    end = lr * optim.final_lr_fraction
    after = {
        "warmup_constant": optax.constant_schedule(lr),
        "warmup_linear": optax.linear_schedule(lr, end, rest),
        "warmup_cosine": optax.cosine_decay_schedule(lr, rest, alpha=optim.final_lr_fraction),
    }[optim.schedule]
    if warmup == 0:
        return after
    return optax.join_schedules([ramp, after], [warmup])


def decay_mask(params):
    """Weight decay on matrices only: not on norms, biases (whatever their stacked rank)."""
    def decays(path, _):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return "norm" not in name and "bias" not in name
    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(optim, schedule) -> optax.GradientTransformation:
    """The elementwise part: applied to any subset of the parameters alone, it gives the same
    numbers (the offloaded update streams it layer group by layer group)."""
    return optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay, mask=decay_mask, mu_dtype=optim.state_dtype)


def make_optimizer(optim, total_steps: int):
    """Returns (optax transformation, schedule): global-norm clipping, then `adamw`."""
    schedule = make_schedule(optim, total_steps)
    clip = optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm else optax.identity()
    return optax.chain(clip, adamw(optim, schedule)), schedule
