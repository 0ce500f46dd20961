"""The SFT train step, read top to bottom.

One optimizer step = a variable number of fixed-shape micro-batches. Each micro-batch adds the
*sum* of its token losses and the gradient of that sum to an accumulator; the update divides by
the step's total loss-token count. So the loss is an exact per-token mean over the whole step,
however the samples were split into micro-batches (the classic accumulation bug, averaging
per-micro-batch means, cannot happen).

Jitted functions, each compiled once per run: `zero_accumulator` (once, at the run's start),
`accumulate` (per micro-batch), the optimizer state's update (`jaxsft.train.state`; `apply_update`
here is the one of optax's state on the devices, `optim.offload='none'`) and `clear_accumulator`
(per step), which hands the accumulator back zeroed in place for the next step (donated: its
buffers are reused), so one float32 gradient tree is alive at any moment, in every memory tier.
All run on sharded global arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsft.train.loss import token_loss_sum

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted functions of one run, bound to its model structure, optimizer and shardings."""
    zero_accumulator: Callable  # (params, step) -> a new accumulator for `step`
    accumulate: Callable  # (acc, params, micro-batch) -> acc (donated)
    apply_update: Callable  # (params, opt_state, acc, num_loss_tokens, step) -> (params, opt_state, metrics): optax's state on the devices
    clear_accumulator: Callable  # (acc, step) -> acc zeroed in place for step + 1 (donated)
    eval_loss: Callable

    def update(self, params, opt_state, acc, num_loss_tokens, step):
        """The step's update of optax's state on the devices; returns (params, opt_state, the
        accumulator of step + 1, metrics).
        `acc` is consumed: its buffers become the next step's accumulator, so no second gradient
        tree is ever allocated (zeroing is its own program: in one with the update, XLA copies the
        accumulator to order its reads before the zeros' writes)."""
        params, opt_state, metrics = self.apply_update(params, opt_state, acc, num_loss_tokens, step)
        return params, opt_state, self.clear_accumulator(acc, step), metrics


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, param_sharding,
                    opt_sharding, batch_sharding,
                    frozen=None, frozen_sharding=None, dropout_seed: int | None = None) -> TrainStep:
    """param_sharding / opt_sharding: trees (or prefixes) of shardings of the params and the
    optimizer state on the device; batch_sharding: the sharding of every micro-batch array.
    With `frozen` (a LoRA run's base weights, `nnx.split(model, LoraParam, nnx.Param)`) params are
    the adapters alone: the frozen state is an input of every function but never differentiated,
    so no gradient of it is computed or stored. `dropout_seed`: LoRA dropout masks are drawn from
    (seed, step, micro-batch); None = no dropout."""
    def loss_sum(params, frozen, batch, dropout_key=None):
        model = nnx.merge(graphdef, params, *(() if frozen is None else (frozen,)))
        if dropout_key is not None:
            model.lora.dropout_key = dropout_key
        return token_loss_sum(model, batch)

    def zero_accumulator(params, step=0):
        acc = {"grads": jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
               "loss_sum": jnp.zeros((), jnp.float32)}
        if dropout_seed is not None:
            acc["dropout_key"] = jax.random.fold_in(jax.random.key(dropout_seed), step)
        return acc

    def clear_accumulator(acc, step):
        return zero_accumulator(acc["grads"], step + 1)

    def accumulate(frozen, acc, params, batch):
        acc = dict(acc)
        dropout_key = None
        if dropout_seed is not None:
            acc["dropout_key"], dropout_key = jax.random.split(acc["dropout_key"])
        loss, grads = jax.value_and_grad(loss_sum)(params, frozen, batch, dropout_key)
        # Each weight's gradient is rounded to the compute dtype once (a tied embedding's two uses
        # summed first), as an offloaded run's compute-dtype copy has it: the tiers stay bitwise equal.
        compute_dtype = nnx.merge(graphdef, params, *(() if frozen is None else (frozen,))).compute_dtype
        return {**acc, "grads": jax.tree.map(lambda a, g: a + g.astype(compute_dtype).astype(jnp.float32),
                                             acc["grads"], grads),
                "loss_sum": acc["loss_sum"] + loss}

    def update(params, opt_state, acc, num_loss_tokens, step):
        denominator = jnp.maximum(num_loss_tokens, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denominator, acc["grads"])
        grad_norm = optax.global_norm(grads)  # before clipping
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
        metrics = {"loss": acc["loss_sum"] / denominator, "grad_norm": grad_norm,
                   "update_norm": optax.global_norm(updates), "param_norm": optax.global_norm(params),
                   "learning_rate": schedule(step)}
        return params, opt_state, metrics

    def eval_loss(frozen, params, batch):
        return loss_sum(params, frozen, batch), jnp.sum(batch["loss_mask"])

    acc_sharding = {"grads": param_sharding, "loss_sum": None}
    if dropout_seed is not None:
        acc_sharding["dropout_key"] = None
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    return TrainStep(
        zero_accumulator=jax.jit(zero_accumulator, out_shardings=acc_sharding),
        clear_accumulator=jax.jit(clear_accumulator, in_shardings=(acc_sharding, None),
                                  out_shardings=acc_sharding, donate_argnums=0, keep_unused=True),
        # The frozen weights are bound here, so the loop calls the same functions with or without LoRA.
        accumulate=functools.partial(jax.jit(
            accumulate, in_shardings=(frozen_sharding, acc_sharding, param_sharding, batch_shardings),
            out_shardings=acc_sharding, donate_argnums=1), frozen),
        apply_update=jax.jit(
            update, in_shardings=(param_sharding, opt_sharding, acc_sharding, None, None),
            out_shardings=(param_sharding, opt_sharding, None), donate_argnums=(0, 1)),
        eval_loss=functools.partial(
            jax.jit(eval_loss, in_shardings=(frozen_sharding, param_sharding, batch_shardings)), frozen),
    )


def compile_counts(step: TrainStep) -> dict[str, Any]:
    """How many times each function was compiled (for the compile-once test)."""
    functions = {f.name: getattr(step, f.name) for f in dataclasses.fields(step)}
    functions = {k: getattr(f, "func", f) for k, f in functions.items()}  # unwrap the frozen binding
    return {k: f._cache_size() for k, f in functions.items() if hasattr(f, "_cache_size")}
