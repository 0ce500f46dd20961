"""The SFT loss: summed token cross-entropy, with the logits computed one sequence chunk at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Float32 logits elements per device in one loss chunk (256 MiB).
LOGITS_PER_DEVICE = 2**26


def loss_chunk(rows: int, seq_len: int, vocab: int, devices: int) -> int:
    """Sequence positions per loss chunk: halve the chunk (rounding up) until its float32 logits
    fit LOGITS_PER_DEVICE per device (a 128k vocabulary makes whole-row logits gigabytes).
    A length the chunk does not divide is padded up to whole chunks by `token_loss_sum`."""
    chunk = seq_len
    while chunk > 1 and rows * chunk * vocab > LOGITS_PER_DEVICE * devices:
        chunk = -(-chunk // 2)
    return chunk


def token_loss_sum(model, batch, chunk: int | None = None):
    """Sum of cross-entropy over loss tokens, in float32.

    Logits are computed and dropped chunk by chunk along the sequence (recomputed in the backward
    pass), so a 128k vocabulary never materialises (batch, seq, vocab) in float32.
    """
    hidden = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"])
    b, t, e = hidden.shape
    chunk = chunk or loss_chunk(b, t, model.config.vocab_size, jax.device_count())
    num_chunks = -(-t // chunk)

    @jax.checkpoint
    def chunk_loss(total, xs):
        h, targets, mask = xs
        logits = model.logits(h)  # the output weights' gradient sums over chunks in float32
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return total + jnp.sum(jnp.where(mask > 0, losses, 0.0)), None

    def chunks(x):
        # Pad the sequence to whole chunks; padded positions have mask 0 and add nothing.
        x = jnp.pad(x, [(0, 0), (0, num_chunks * chunk - t)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, num_chunks, chunk, *x.shape[2:]), 1, 0)

    total, _ = jax.lax.scan(
        chunk_loss, jnp.zeros((), jnp.float32),
        (chunks(hidden), chunks(batch["targets"]), chunks(batch["loss_mask"].astype(jnp.float32))))
    return total
