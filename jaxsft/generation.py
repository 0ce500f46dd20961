"""Batched generation with a KV cache: prefill, then one token per step inside `lax.while_loop`.

Prompts are left-padded to one prompt length in the cache, so every row's next token goes to the
same cache column and one `dynamic_update_slice` writes the whole batch. Each row's RoPE positions
start at its first real token and its padding columns are masked out of attention, so a padded row
computes what it would alone. Batch size, prompt lengths and the number of new tokens are rounded
up (powers of two; prompt lengths above 32 to multiples of 32): one compilation serves every call
in the same buckets.

Prefill is compute-bound and a padding column costs as much as a real one, so the rows, sorted by
length, are prefilled in PREFILL_GROUPS groups, each padded only to its own longest prompt and
written into its rows of the cache at the columns that end at the shared prompt length (GSM8K
prompts of 56-158 tokens at batch 64: 7680 columns instead of 10240).

Decoding is weight-bound at these batch sizes, so each step reads every weight once and nothing
else that is large: the layers are unrolled over per-layer weight slices and per-layer caches
(a scan over the stacked weights copies each layer's slice, and the stacked cache's layer slice,
at every step), the weights are cast to the compute dtype once per chunk of CHUNK steps rather
than per step, and the cache holds only the columns filled by the end of the chunk: the prompt's
and a power of two (at least CHUNK) of new ones, grown between chunks (`_grow`), so 128 new tokens
take three compilations of the decode chunk, 256 four.

Decode attention is bound by reading the cache: keys (batch, KV heads, head_dim, columns), values
(batch, KV heads, columns, head_dim), each KV head serving its group of query heads without being
repeated, and no step copies it; one query column's scores and output are products summed by
reductions (`_decode_attention`), each read along the cache's contiguous axis. Within a chunk the
cache is read-only: each step's keys and values go to a small float32 buffer of the chunk's
columns (written in place; XLA:CPU writes a column into a bfloat16 array by converting the whole
array to float32 and back), attended beside the cache, and written into the cache once, at the end
of the chunk, through a uint16 view of the cache (in place: `update_slice`), as the prefill writes
its keys and values. Both parts hold compute-dtype values and are summed in float32.
The host is consulted once per chunk (for stop strings and to see whether every row is done),
never per token.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models.decoder import (Decoder, decoder_layer, embed_lookup, from_view, layer_weights, rms_norm,
                                   rope_frequencies, scanned_views, uint16_view, update_slice)

# Steps per device call: the host checks stop strings (and whether every row is done) in between.
CHUNK = 32
# Prefill calls, each on batch / PREFILL_GROUPS rows of similar prompt lengths.
PREFILL_GROUPS = 4


class Sampling(NamedTuple):
    """Traced sampling settings: changing them does not recompile."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array


def generate(model: Decoder, prompts: list[list[int]], max_new_tokens: int, eos_token_id=None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, *, top_k: int = 0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, stop_strings=(), tokenizer=None
             ) -> list[list[int]]:
    """New tokens for each prompt (lists of token ids, any lengths).

    A row stops after its first end token, which is included in its output (as in the output of
    transformers' `generate`). `eos_token_id`: an id or a list of ids, default the model config's
    (None there too: every row runs to max_new_tokens). temperature 0 is greedy; otherwise
    sampling, reproducible for a given seed (and bucket sizes). The settings act as transformers'
    logits processors do, in its order: `repetition_penalty` (> 1 discourages every token already
    in the prompt or the output; applies to greedy decoding too), temperature, `top_k` (0: off),
    `top_p` (the nucleus), `min_p` (drop tokens below min_p times the top token's probability).
    `stop_strings` (with the `tokenizer` that decodes the ids) end a row at the token that
    completes one of them, that token included, as transformers' `stop_strings` do.
    Sharded parameters stay where they are: the computation follows their sharding.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or not 0 <= min_p <= 1 or repetition_penalty <= 0:
        raise ValueError(f"sampling settings out of range: temperature={temperature} (>= 0), top_k={top_k} "
                         f"(>= 0), top_p={top_p} (0, 1], min_p={min_p} [0, 1], "
                         f"repetition_penalty={repetition_penalty} (> 0)")
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer= that decodes the generated ids")
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)

    # Longest prompts first, so each prefill group's first row is its longest; filler rows (one
    # token, finished at once) fill the batch bucket.
    order = sorted(range(len(prompts)), key=lambda row: -len(prompts[row]))
    batch = _bucket(len(prompts))
    rows = [prompts[row] for row in order] + [[0]] * (batch - len(prompts))
    groups = min(PREFILL_GROUPS, batch)
    group_rows = batch // groups
    group_lens = [_bucket(len(rows[g * group_rows]), least=8, coarsest=32) for g in range(groups)]
    prompt_len = group_lens[0]
    ids = np.zeros((batch, prompt_len), np.int32)
    pad = np.array([prompt_len - len(p) for p in rows], np.int32)
    for row, p in enumerate(rows):
        ids[row, pad[row]:] = p
    live = np.arange(batch) < len(prompts)
    sampling = Sampling(*map(np.float32, (temperature or 1.0, top_k, top_p, min_p, repetition_penalty)))
    static = dict(greedy=temperature == 0, penalize=repetition_penalty != 1.0)
    eos_ids, key = np.asarray(eos or [-1], np.int32), jax.random.key(seed)
    new_len = _bucket(max_new_tokens)

    cache, logits = _new_cache(model, batch, prompt_len), []
    for g, length in enumerate(group_lens):
        block, column = slice(g * group_rows, (g + 1) * group_rows), prompt_len - length
        group_logits, cache = _prefill(model, ids[block, column:], pad[block] - column, cache,
                                       np.int32(g * group_rows), np.int32(column))
        logits.append(group_logits)
    state = State(np.int32(1), cache=cache, **_start(logits, ids, pad, live, eos_ids, sampling, key,
                                                     new_len=new_len, **static))
    stopped_at = {}  # row -> output length where a stop string ends it
    while True:
        step, done = jax.device_get((state.step, state.done))
        if stop_strings:
            tokens = jax.device_get(state.tokens)
            for row in np.flatnonzero(~done[:len(prompts)]):
                end = _stop_string_end(tokens[row, :step].tolist(), stop_strings, tokenizer)
                if end is not None:
                    stopped_at[row] = end
            if stopped_at:
                done = done.copy()
                done[list(stopped_at)] = True
                state = state._replace(done=jnp.asarray(done))
        if step >= max_new_tokens or done.all():
            break
        # The chunk writes cache columns up to prompt_len + step + CHUNK - 2.
        span = prompt_len + min(new_len, _bucket(int(step) + CHUNK - 1))
        if span > state.cache[0][1].shape[2]:
            state = state._replace(cache=_grow(state.cache, span))
        state = _decode(model, state, pad, np.int32(prompt_len), np.int32(max_new_tokens), eos_ids, sampling, key,
                        **static)
    tokens = jax.device_get(state.tokens)
    results = [None] * len(prompts)
    for row, out in enumerate(tokens[:len(prompts), :max_new_tokens].tolist()):
        ends = [i for i, t in enumerate(out) if t in eos]
        out = out[:ends[0] + 1] if ends else out
        results[order[row]] = out[:stopped_at[row]] if row in stopped_at else out
    return results


def _stop_string_end(tokens: list[int], stop_strings: list[str], tokenizer) -> int | None:
    """The length of the shortest prefix of `tokens` whose text contains a stop string, if any."""
    if not any(s in tokenizer.decode(tokens) for s in stop_strings):
        return None
    return next(n for n in range(1, len(tokens) + 1) if any(s in tokenizer.decode(tokens[:n]) for s in stop_strings))


def _bucket(n: int, least: int = 1, coarsest: int | None = None) -> int:
    """n rounded up to a power of two (at least `least`); above `coarsest`, to a multiple of it,
    so long prompts waste at most `coarsest` columns of prefill."""
    if coarsest is not None and n > coarsest:
        return -(-n // coarsest) * coarsest
    return max(least, 1 << (n - 1).bit_length())


class State(NamedTuple):
    step: jax.Array      # tokens produced so far (the next one goes to column `step` of `tokens`)
    token: jax.Array     # (B,) the latest token
    cache: list          # per layer keys (B, K, H, columns) and values (B, K, columns, H)
    tokens: jax.Array    # (B, new_len) output, -1 after a row is done
    done: jax.Array      # (B,)
    seen: jax.Array      # (B, vocab) tokens in the prompt or output, for the repetition penalty


@functools.partial(jax.jit, static_argnames=("batch", "length"))
def _new_cache(model, batch, length):
    """Per layer (keys, values) of zeros in the compute dtype (State.cache's layout)."""
    c = model.config
    return [(jnp.zeros((batch, c.num_kv_heads, c.head_dim, length), model.compute_dtype),
             jnp.zeros((batch, c.num_kv_heads, length, c.head_dim), model.compute_dtype))
            for _ in range(c.num_layers)]


@functools.partial(jax.jit, static_argnames=("length",))
def _grow(cache, length):
    """The cache with zero columns appended up to `length`."""
    return [(jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, length - k.shape[3]))),
             jnp.pad(v, ((0, 0), (0, 0), (0, length - v.shape[2]), (0, 0)))) for k, v in cache]


@functools.partial(jax.jit, donate_argnames=("cache",))
def _prefill(model, ids, pad, cache, row, column):
    """Run the prompts ids (R, T), left-padded by pad (R,), and write their keys and values into
    cache rows [row, row + R), columns [column, column + T). Returns their last column's float32
    logits (R, vocab) and the cache. Compute-bound, so the layers run in a scan (one compilation
    of one layer; copying each layer's weight slice costs nothing beside the matmuls)."""
    c = model.config
    dtype = model.compute_dtype
    columns = jnp.arange(ids.shape[1])
    positions = jnp.maximum(columns[None, :] - pad[:, None], 0)
    mask = _mask(columns, columns, pad, c.sliding_window)
    inv_freq = rope_frequencies(c)

    def attend(q, k, v):
        k, v = k.astype(dtype).transpose(0, 2, 3, 1), v.astype(dtype).transpose(0, 2, 1, 3)
        return _attention(q, [(k, v, mask)], c.attention_scale), (uint16_view(k), uint16_view(v))

    layers, viewed_back = scanned_views(model.layers.arrays())

    def body(x, w):
        return decoder_layer(x, layer_weights(viewed_back(w), c, dtype), positions, inv_freq, c, attend)

    x = embed_lookup(model.embed[...], ids, dtype) * c.embedding_multiplier
    # The weights go in as uint16 views and the keys and values come out as them: XLA:CPU slices
    # a 16-bit float stack in a loop, and writes into one, by converting all of it to float32.
    x, (keys, values) = jax.lax.scan(body, x, layers)
    keys, values = from_view(keys, dtype), from_view(values, dtype)
    cache = [(update_slice(k_cache, keys[i], (row, 0, 0, column)),
              update_slice(v_cache, values[i], (row, 0, column, 0))) for i, (k_cache, v_cache) in enumerate(cache)]
    hidden = rms_norm(x[:, -1:], model.final_norm[...], c.rms_norm_eps)
    return model.logits(hidden)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("new_len", "greedy", "penalize"))
def _start(logits, ids, pad, live, eos, sampling, key, *, new_len, greedy, penalize):
    """The first new token of every row from the prefill groups' logits: State's other fields."""
    batch, prompt_len = ids.shape
    logits = jnp.concatenate(logits)
    seen = jnp.zeros((batch, logits.shape[1] if penalize else 1), jnp.bool_)
    if penalize:
        real = jnp.arange(prompt_len)[None, :] >= pad[:, None]
        seen = seen.at[jnp.arange(batch)[:, None], ids].max(real)
    token = _pick(logits, seen, sampling, key, jnp.int32(0), greedy=greedy, penalize=penalize)
    done = ~live | jnp.isin(token, eos)
    tokens = jnp.full((batch, new_len), -1, jnp.int32).at[:, 0].set(token)
    return dict(token=token, tokens=tokens, done=done, seen=_see(seen, token, penalize))


@functools.partial(jax.jit, static_argnames=("greedy", "penalize"), donate_argnames=("state",))
def _decode(model, state, pad, prompt_len, max_new, eos, sampling, key, *, greedy, penalize):
    """Up to CHUNK more steps, stopping early once every row is done. The cache has room for every
    column the chunk writes (`_grow`); they are gathered in a float32 buffer and written into the
    cache at the end."""
    layers = _layer_weights(model)
    end = jnp.minimum(state.step + CHUNK, max_new)
    start = prompt_len + state.step - 1  # the chunk's first column
    batch, kv_heads, head_dim, _ = state.cache[0][0].shape
    width = min(CHUNK, state.tokens.shape[1])
    recent = [(jnp.zeros((batch, kv_heads, head_dim, width), jnp.float32),
               jnp.zeros((batch, kv_heads, width, head_dim), jnp.float32)) for _ in layers]

    def body(carry):
        s, recent = carry
        # The previous token sits at column prompt_len + step - 1.
        logits, recent = _step(model, layers, s.token, pad, prompt_len + s.step - 1, s.cache, recent, start)
        token = _pick(logits, s.seen, sampling, key, s.step, greedy=greedy, penalize=penalize)
        tokens = s.tokens.at[:, s.step].set(jnp.where(s.done, -1, token))
        s = s._replace(step=s.step + 1, token=token, tokens=tokens, done=s.done | jnp.isin(token, eos),
                       seen=_see(s.seen, token, penalize))
        return s, recent

    state, recent = jax.lax.while_loop(lambda c: (c[0].step < end) & ~jnp.all(c[0].done), body, (state, recent))
    cache = [(update_slice(k, rk, (0, 0, 0, start)), update_slice(v, rv, (0, 0, start, 0)))
             for (k, v), (rk, rv) in zip(state.cache, recent)]
    return state._replace(cache=cache)


def _see(seen, token, penalize):
    return seen.at[jnp.arange(token.shape[0]), token].set(True) if penalize else seen


def _layer_weights(model):
    """One dict of compute-dtype weights per layer, sliced and cast once per call."""
    stacked = model.layers.arrays()
    return [layer_weights(jax.tree.map(lambda w: w[i], stacked), model.config, model.compute_dtype)
            for i in range(model.config.num_layers)]


def _mask(columns, key_columns, pad, sliding_window):
    """(B, T, S) for queries at `columns` (T,) over keys at `key_columns` (S,): causal, no padding
    column of the row (pad (B,)), and within the sliding window if any."""
    mask = (key_columns[None, None, :] <= columns[None, :, None]) & (key_columns[None, None, :] >= pad[:, None, None])
    if sliding_window is not None:
        mask &= key_columns[None, None, :] > columns[None, :, None] - sliding_window
    return mask


def _step(model, layers, token, pad, column, cache, recent, start):
    """Run token (B,) at column `column`, its keys and values written into the float32 buffers
    `recent` (the columns from `start`); attention reads the cache's columns before `start` and the
    buffers'. Returns the float32 logits (B, vocab) and the buffers."""
    c = model.config
    dtype = model.compute_dtype
    positions = jnp.maximum(column - pad[:, None], 0)
    columns = jnp.arange(cache[0][1].shape[2])
    old_mask = _mask(column[None], columns, pad, c.sliding_window) & (columns < start)
    new_mask = _mask(column[None], start + jnp.arange(recent[0][1].shape[2]), pad, c.sliding_window)
    inv_freq = rope_frequencies(c)
    x = embed_lookup(model.embed[...], token[:, None], dtype) * c.embedding_multiplier
    new_recent = []
    for w, (k_cache, v_cache), (k_new, v_new) in zip(layers, cache, recent):
        def attend(q, k, v, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new):
            k = k.astype(dtype).astype(jnp.float32).transpose(0, 2, 3, 1)
            v = v.astype(dtype).astype(jnp.float32).transpose(0, 2, 1, 3)
            k_new = jax.lax.dynamic_update_slice(k_new, k, (0, 0, 0, column - start))
            v_new = jax.lax.dynamic_update_slice(v_new, v, (0, 0, column - start, 0))
            parts = [(k_cache, v_cache, old_mask), (k_new, v_new, new_mask)]
            return _decode_attention(q, parts, c.attention_scale), (k_new, v_new)

        x, kv = decoder_layer(x, w, positions, inv_freq, c, attend)
        new_recent.append(kv)
    hidden = rms_norm(x, model.final_norm[...], c.rms_norm_eps)
    return model.logits(hidden)[:, 0], new_recent


def _attention(q, parts, scale):
    """q (B, T, N, H) in the compute dtype against keys and values in parts, a list of
    (keys (B, K, H, S), values (B, K, S, H), mask (B, T, S)), one softmax over all their columns.
    Each KV head serves its group of N / K query heads; the products accumulate in float32 from
    operands holding compute-dtype values (a part stored in float32 is computed in float32)."""
    b, t, n, h = q.shape
    kv_heads = parts[0][0].shape[1]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.concatenate([
        jnp.where(mask[:, None, None],
                  jnp.einsum("btkgh,bkhs->bkgts", q.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale,
                  jnp.finfo(jnp.float32).min) for k, _, mask in parts], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out, at = 0, 0
    for _, v, _ in parts:
        p = probs[..., at:at + v.shape[2]].astype(v.dtype)
        out += jnp.einsum("bkgts,bksh->btkgh", p, v, preferred_element_type=jnp.float32)
        at += v.shape[2]
    return out.astype(q.dtype).reshape(b, t, n, h)


def _decode_attention(q, parts, scale):
    """`_attention` for one query column (T = 1), as elementwise products summed by reductions
    rather than as matmuls: each (row, KV head) is a (group x head_dim) by (head_dim x columns)
    product, too small for a matmul kernel. XLA:CPU ran those batched products slowly and on one
    core while the other idled (a profile at batch 64), the float32 buffer's in its generic dot
    kernel; as reductions, the real SmolLM2's decoding at batch 64 went 1.4x as fast in bf16 and
    1.9x in float32. Sums in float32 over compute-dtype values, as `_attention`'s products do."""
    b, t, n, h = q.shape
    dtype, kv_heads = q.dtype, parts[0][0].shape[1]
    q = q.reshape(b, kv_heads, n // kv_heads, h, 1).astype(jnp.float32)
    scores = jnp.concatenate([
        jnp.where(mask[:, None], jnp.sum(q * k[:, :, None].astype(jnp.float32), axis=3) * scale,
                  jnp.finfo(jnp.float32).min) for k, _, mask in parts], axis=-1)  # (B, K, group, S)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).astype(jnp.float32)[..., None]
    out, at = 0, 0
    for _, v, _ in parts:
        out += jnp.sum(probs[:, :, :, at:at + v.shape[2]] * v[:, :, None].astype(jnp.float32), axis=3)
        at += v.shape[2]
    return out.astype(dtype).reshape(b, t, n, h)


def _pick(logits, seen, s: Sampling, key, step, *, greedy, penalize):
    """The next token from float32 logits (B, vocab), as transformers' processors would pick it."""
    if penalize:  # transformers' RepetitionPenaltyLogitsProcessor
        penalized = jnp.where(logits < 0, logits * s.repetition_penalty, logits / s.repetition_penalty)
        logits = jnp.where(seen, penalized, logits)
    if greedy:
        return _argmax(logits)
    return _sample(logits / s.temperature, s, jax.random.fold_in(key, step))


def _argmax(logits):
    """The first index of each row's maximum, (B,) int32, as two plain reductions: XLA:CPU runs
    `jnp.argmax`'s paired (value, index) reduction far slower (~20 of ~350 ms per decode step at
    batch 64 over SmolLM2's 49k vocabulary, on a loaded machine)."""
    vocab = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(logits == top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)


def _sample(logits, s: Sampling, key):
    return jax.random.categorical(key, _filtered(logits, s), axis=-1).astype(jnp.int32)


def _filtered(logits, s: Sampling):
    """Logits (B, vocab) after transformers' top-k, top-p and min-p warpers, in that order: dropped
    tokens are -inf, and each filter keeps at least the top token."""
    rows = jnp.arange(logits.shape[0])[:, None]
    order = jnp.argsort(-logits, axis=-1)
    ranked = logits[rows, order]
    # top_k: drop tokens below the k-th largest logit (ties with it stay, as in transformers).
    kth = ranked[:, jnp.clip(s.top_k.astype(jnp.int32) - 1, 0, None)][:, None]
    ranked = jnp.where((s.top_k > 0) & (ranked < kth), -jnp.inf, ranked)
    # top_p: keep a token if the tokens ranked above it do not yet reach top_p.
    probs = jax.nn.softmax(ranked, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < s.top_p
    # min_p: drop tokens less likely than min_p times the top token.
    keep &= probs >= s.min_p * probs[:, :1]
    keep = keep.at[:, 0].set(True)
    return jnp.full_like(logits, -jnp.inf).at[rows, order].set(jnp.where(keep, ranked, -jnp.inf))
