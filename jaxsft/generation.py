"""Batched generation with a KV cache: prefill once, then one token per step inside `lax.while_loop`.

Prompts are left-padded into one (batch, prompt_len) block, so every row's next token goes to the
same cache column and one `dynamic_update_slice` writes the whole batch. Each row's RoPE positions
start at its first real token and its padding columns are masked out of attention, so a padded row
computes what it would alone. Batch size, prompt length and the number of new tokens are rounded
up (powers of two; prompt lengths above 128 to multiples of 128): one compilation serves every
call that falls in the same buckets.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models.decoder import Decoder, decoder_layer, rms_norm, rope_frequencies


def generate(model: Decoder, prompts: list[list[int]], max_new_tokens: int, eos_token_id=None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
    """New tokens for each prompt (lists of token ids, any lengths).

    A row stops after its first end token, which is included in its output (as in the output of
    transformers' `generate`). `eos_token_id`: an id or a list of ids, default the model config's
    (None there too: every row runs to max_new_tokens). temperature 0 is greedy; otherwise
    sampling from the top_p nucleus, reproducible for a given seed (and bucket sizes).
    Sharded parameters stay where they are: the computation follows their sharding.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    batch, prompt_len = _bucket(len(prompts)), _bucket(max(map(len, prompts)), least=8, coarsest=128)
    ids = np.zeros((batch, prompt_len), np.int32)
    pad = np.full((batch,), prompt_len - 1, np.int32)  # filler rows: one token, finished at once
    for row, p in enumerate(prompts):
        ids[row, prompt_len - len(p):] = p
        pad[row] = prompt_len - len(p)
    live = np.arange(batch) < len(prompts)
    out = _generate(model, ids, pad, live, np.int32(max_new_tokens), np.asarray(eos or [-1], np.int32),
                    np.float32(temperature or 1.0), np.float32(top_p), jax.random.key(seed),
                    greedy=temperature == 0, new_len=_bucket(max_new_tokens))
    out = np.asarray(jax.device_get(out))
    results = []
    for row in out[:len(prompts), :max_new_tokens].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        results.append(row[:ends[0] + 1] if ends else row)
    return results


def _bucket(n: int, least: int = 1, coarsest: int | None = None) -> int:
    """n rounded up to a power of two (at least `least`); above `coarsest`, to a multiple of it,
    so long prompts waste at most `coarsest` columns of prefill."""
    if coarsest is not None and n > coarsest:
        return -(-n // coarsest) * coarsest
    return max(least, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("greedy", "new_len"))
def _generate(model, ids, pad, live, max_new, eos, temperature, top_p, key, *, greedy, new_len):
    c = model.config
    batch, prompt_len = ids.shape
    cache_shape = (c.num_layers, batch, prompt_len + new_len, c.num_kv_heads, c.head_dim)
    cache = (jnp.zeros(cache_shape, model.compute_dtype), jnp.zeros(cache_shape, model.compute_dtype))

    def pick(logits, step):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return _sample(logits / temperature, top_p, jax.random.fold_in(key, step))

    logits, cache = _forward(model, ids, pad, 0, cache)
    token = pick(logits, 0)
    done = ~live | jnp.isin(token, eos)
    tokens = jnp.full((batch, new_len), -1, jnp.int32).at[:, 0].set(token)

    def cond(state):
        step, _, _, _, done = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, token, cache, tokens, done = state
        # The previous token sits at column prompt_len + step - 1.
        logits, cache = _forward(model, token[:, None], pad, prompt_len + step - 1, cache)
        token = pick(logits, step)
        tokens = tokens.at[:, step].set(jnp.where(done, -1, token))
        return step + 1, token, cache, tokens, done | jnp.isin(token, eos)

    _, _, _, tokens, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, tokens, done))
    return tokens


def _forward(model, ids, pad, start, cache):
    """Run ids (B, T) at cache columns [start, start + T); returns the last column's float32
    logits (B, vocab) and the cache with this block's keys and values written in."""
    c = model.config
    dtype = model.compute_dtype
    t = ids.shape[1]
    columns = start + jnp.arange(t)
    positions = jnp.maximum(columns[None, :] - pad[:, None], 0)
    key_columns = jnp.arange(cache[0].shape[2])
    # (B, T, S): causal, and no padding column of that row.
    mask = (key_columns[None, None, :] <= columns[None, :, None]) & (key_columns[None, None, :] >= pad[:, None, None])
    if c.sliding_window is not None:
        mask &= key_columns[None, None, :] > columns[None, :, None] - c.sliding_window
    inv_freq = rope_frequencies(c)
    x = model.embed[...].astype(dtype)[ids] * c.embedding_multiplier

    def layer(carry, w_and_index):
        x, (k_cache, v_cache) = carry
        w, i = w_and_index
        w = jax.tree.map(lambda a: a.astype(dtype), w)

        def attend(q, k, v):
            # Update the whole stacked cache in place rather than scanning over per-layer slices,
            # which would copy all of it every step.
            kc = jax.lax.dynamic_update_slice(k_cache, k[None].astype(dtype), (i, 0, start, 0, 0))
            vc = jax.lax.dynamic_update_slice(v_cache, v[None].astype(dtype), (i, 0, start, 0, 0))
            return _cached_attention(q, kc[i], vc[i], mask, c.attention_scale), (kc, vc)

        x, new_cache = decoder_layer(x, w, positions, inv_freq, c, attend)
        return (x, new_cache), None

    layers = model.layers.arrays()
    (x, cache), _ = jax.lax.scan(layer, (x, cache), (layers, jnp.arange(c.num_layers)))
    hidden = rms_norm(x[:, -1:], model.final_norm[...], c.rms_norm_eps)
    return model.logits(hidden)[:, 0], cache


def _cached_attention(q, k, v, mask, scale):
    """q (B, T, N, H) against the cache k, v (B, S, K, H) under mask (B, T, S)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


def _sample(logits, top_p, key):
    """Sample from the smallest set of top tokens whose probability reaches top_p (at least one)."""
    probs = jax.nn.softmax(logits, axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    # Keep a token if the tokens ranked above it do not yet reach top_p.
    keep = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
    keep = keep.at[:, 0].set(True)
    choice = jax.random.categorical(key, jnp.where(keep, jnp.log(sorted_probs), -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
