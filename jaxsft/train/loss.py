"""The SFT loss: summed token cross-entropy, with the logits computed one sequence chunk at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxsft.models import dots

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


def mesh_size() -> int:
    """The devices of the mesh being traced under (the run's, set by the loop and the memory plan;
    a TPU slice compiled on a CPU host is not the host's devices), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.device_count() if mesh.empty else mesh.size


def token_loss_sum(model, batch, chunk: int | None = None):
    """Sum of cross-entropy over loss tokens, in float32.

    Logits are computed and dropped chunk by chunk along the sequence (recomputed in the backward
    pass), so a 128k vocabulary never materialises (batch, seq, vocab) in float32.
    """
    hidden = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"])
    b, t, e = hidden.shape
    chunk = chunk or loss_chunk(b, t, model.config.vocab_size, mesh_size())
    num_chunks = -(-t // chunk)

    def chunks(x):
        # Pad the sequence to whole chunks; padded positions have mask 0 and add nothing.
        x = jnp.pad(x, [(0, 0), (0, num_chunks * chunk - t)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, num_chunks, chunk, *x.shape[2:]), 1, 0)

    equation, w = model.output_weight()
    # A frozen output weight (a LoRA run's) has no gradient to sum: autodiff's backward is the
    # smaller program there.
    loss = cross_entropy_sum if getattr(model, "lora", None) is not None else chunked_cross_entropy
    return loss(chunks(hidden), w, chunks(batch["targets"]), chunks(batch["loss_mask"].astype(jnp.float32)),
                equation, model.config.logits_scaling)


def cross_entropy_sum(hidden, w, targets, mask, equation: str, scaling: float):
    """Summed cross-entropy where `mask` > 0 of the float32 logits `einsum(equation, h, w) /
    scaling` of every chunk h of `hidden` (chunks, rows, chunk, hidden; compute dtype), one chunk
    at a time; differentiated, each chunk's logits are recomputed in the backward pass."""
    @jax.checkpoint
    def body(total, xs):
        h, t, m = xs
        logits = dots.einsum(equation, h, w, out_dtype=jnp.float32) / scaling
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, t)
        return total + jnp.sum(jnp.where(m > 0, losses, 0.0)), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, targets, mask))
    return total


# `cross_entropy_sum` with its own backward: each chunk's logits recomputed, w's gradient summed
# over the chunks in float32 whatever w's dtype (autodiff of the scan sums it in w's dtype: bf16 for
# an offloaded run's compute copy), then rounded to the compute dtype once, as every weight's
# gradient is, so a float32 master and its bf16 copy get the same bits.
chunked_cross_entropy = jax.custom_vjp(cross_entropy_sum, nondiff_argnums=(4, 5))


def _chunked_cross_entropy_fwd(hidden, w, targets, mask, equation, scaling):
    return chunked_cross_entropy(hidden, w, targets, mask, equation, scaling), (hidden, w, targets, mask)


def _chunked_cross_entropy_bwd(equation, scaling, residuals, g):
    hidden, w, targets, mask = residuals
    w_compute = w.astype(hidden.dtype)

    def body(dw, xs):
        h, t, m = xs
        logits = dots.einsum(equation, h, w_compute, out_dtype=jnp.float32) / scaling
        dlogits = jax.nn.softmax(logits) - jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32)
        dlogits = dlogits * (jnp.where(m > 0, g, 0.0) / scaling)[..., None]
        dh, dw_chunk = dots.backward_products(equation, h, w_compute, dlogits)  # dlogits rounded to h's dtype
        return dw + dw_chunk, dh.astype(h.dtype)

    dw, dhidden = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), (hidden, targets, mask))
    return dhidden, dw.astype(hidden.dtype).astype(w.dtype), None, None


chunked_cross_entropy.defvjp(_chunked_cross_entropy_fwd, _chunked_cross_entropy_bwd)
