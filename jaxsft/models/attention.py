"""Attention with packing: one interface, several backends.

Every backend takes `segment_ids` (batch, seq), 1-based per sample and 0 for padding, so a packed
row never attends across samples. RoPE positions are applied by the caller, before attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from jaxsft.models import dots


def resolve_backend(backend: str, head_dim: int, dtype, platform: str | None = None) -> str:
    """'auto' picks the fastest backend that is correct on `platform` (default: this machine's)."""
    if backend != "auto":
        return backend
    platform = platform or jax.devices()[0].platform
    if platform == "gpu" and head_dim % 8 == 0 and head_dim <= 256 and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    if platform == "tpu":
        return "splash"
    return "xla"


def attention(q, k, v, segment_ids, *, scale: float, sliding_window: int | None, backend: str):
    """q: (B, T, N, H); k, v: (B, T, K, H) with N % K == 0; returns (B, T, N, H)."""
    if backend == "xla":
        return xla_attention(q, k, v, segment_ids, scale=scale, sliding_window=sliding_window)
    if backend == "cudnn":
        return cudnn_attention(q, k, v, segment_ids, scale=scale, sliding_window=sliding_window)
    if backend == "splash":
        return splash_attention(q, k, v, segment_ids, scale=scale, sliding_window=sliding_window)
    raise ValueError(f"unknown attention backend {backend!r}; choose auto, xla, cudnn or splash")


def attention_mask(segment_ids, sliding_window: int | None):
    """(B, T, T) boolean: causal, same sample, and within the sliding window if any."""
    t = segment_ids.shape[1]
    q_idx = jnp.arange(t)[:, None]
    k_idx = jnp.arange(t)[None, :]
    allowed = k_idx <= q_idx
    if sliding_window is not None:
        allowed &= k_idx > q_idx - sliding_window
    return allowed[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def xla_attention(q, k, v, segment_ids, *, scale, sliding_window):
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    out = _softmax_attention(scale, sliding_window, q, k, v, segment_ids)
    return checkpoint_name(out.reshape(b, t, n, h), dots.BATCH_DOT)  # 'dots' remat policies keep it


# Autodiff of softmax attention saves every layer's (heads, seq, seq) scores, mask choice and
# probabilities for the backward, float32 and bf16: 1.35 GB per micro-batch of the quickstart (two
# rows of 512, 30 layers), 25% of its step's temporaries, written afresh on every call. As in flash
# attention, the forward keeps only each row's log-sum-exp and the backward recomputes the
# probabilities from q and k (one more q.k matmul per layer).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _softmax_attention(scale, sliding_window, q, k, v, segment_ids):
    return _attention_forward(scale, sliding_window, q, k, v, segment_ids)[0]


# The two matmuls, in the compute dtype with float32 accumulation as `jaxsft.models.dots` computes
# them, but unnamed: remat policies see inside this forward and would keep named scores.
SCORES, WEIGHTED = "btkgh,bskh->bkgts", "bkgts,bskh->btkgh"


def _masked_scores(scale, sliding_window, q, k, segment_ids):
    """(B, K, G, T, S) float32 scores of q (B, T, K, G, H) against k (B, S, K, H), masked."""
    scores = jnp.einsum(SCORES, q, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(segment_ids, sliding_window)[:, None, None]
    return jnp.where(mask, scores, jnp.finfo(jnp.float32).min)


def _attention_forward(scale, sliding_window, q, k, v, segment_ids):
    scores = _masked_scores(scale, sliding_window, q, k, segment_ids)
    top = jnp.max(scores, axis=-1, keepdims=True)  # every row sees itself (causal, own segment)
    exp = jnp.exp(scores - top)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    probs = (exp / total).astype(v.dtype)
    out = jnp.einsum(WEIGHTED, probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
    return out, (q, k, v, segment_ids, top + jnp.log(total))


def _attention_backward(scale, sliding_window, residuals, g):
    q, k, v, segment_ids, log_sum_exp = residuals
    probs = jnp.exp(_masked_scores(scale, sliding_window, q, k, segment_ids) - log_sum_exp)
    dprobs, dv = dots.backward_products(WEIGHTED, probs.astype(v.dtype), v, g)
    dscores = probs * (dprobs - jnp.sum(probs * dprobs, axis=-1, keepdims=True)) * scale
    dq, dk = dots.backward_products(SCORES, q, k, dscores)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_softmax_attention.defvjp(_attention_forward, _attention_backward)


# Segment slots per row given to cuDNN's packed attention. cuDNN schedules work and keeps float32
# softmax statistics per slot ((rows x slots, heads, seq): 1.6 GB per layer call at 4096 slots, 24
# heads), so one slot per token is wasteful; packed SFT rows hold far fewer samples (GSM8K packed
# at seq 4096 needs 10-23 slots a row, padding included). Peers use 32. A row with more samples still gets one slot per token (exact, slower).
CUDNN_SEGMENT_SLOTS = 32


def cudnn_attention(q, k, v, segment_ids, *, scale, sliding_window, slots: int | None = None):
    """cuDNN flash attention. On Hopper and newer, packed rows go through cuDNN's native
    sequence packing (per-sample lengths and offsets, no T x T mask); elsewhere a same-sample
    mask with is_causal keeps packing exact at the cost of a dense bias.

    `slots`: segment slots per row (None: CUDNN_SEGMENT_SLOTS when every row fits, decided on the
    device, else one per token). Benchmarks pass it to time a fixed layout."""
    if _cudnn_packing_supported():
        from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

        def packed(slots, q, k, v):
            seqlens, offsets = packed_layout(segment_ids, slots)
            return dot_product_attention(
                q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets, kv_offsets=offsets,
                scale=scale, mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
                sliding_window_length=sliding_window)

        t = segment_ids.shape[1]
        if slots is not None or t <= CUDNN_SEGMENT_SLOTS:
            return packed(slots or t, q, k, v)
        fits = jnp.max(slots_needed(segment_ids)) <= CUDNN_SEGMENT_SLOTS
        return jax.lax.cond(fits, functools.partial(packed, CUDNN_SEGMENT_SLOTS), functools.partial(packed, t),
                            q, k, v)
    same_sample = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, mask=same_sample, scale=scale, is_causal=True, local_window_size=window,
        implementation="cudnn")


def _cudnn_packing_supported() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and float(getattr(device, "compute_capability", "0")) >= 9.0


def slots_needed(segment_ids):
    """(B,) slots each row needs in `packed_layout`: its highest segment id, plus one for trailing
    padding."""
    last = jnp.max(segment_ids, axis=1)
    return last + jnp.any(segment_ids == 0, axis=1)


def packed_layout(segment_ids, slots: int | None = None):
    """Per-row sample lengths (B, M) and start offsets (B, M + 1), -1 in unused slots, as cuDNN's
    packed attention wants them; M = `slots` (default: T, the most a row can hold). Every row must
    fit (`slots_needed` <= M): a sample beyond the last slot would be dropped.

    Trailing padding (segment 0) becomes one more sample of its own, so every position gets a
    finite output: a garbage value there would turn into NaN gradients through the 0-weighted loss.
    """
    b, t = segment_ids.shape
    slots = slots or t
    last = jnp.max(segment_ids, axis=1, keepdims=True)
    segments = jnp.where(segment_ids == 0, last + 1, segment_ids)
    counts = jax.vmap(lambda s: jnp.bincount(s, length=slots + 1)[1:])(segments)
    starts = jnp.cumsum(counts, axis=1) - counts
    present = counts > 0
    seqlens = jnp.where(present, counts, -1).astype(jnp.int32)
    offsets = jnp.where(present, starts, -1).astype(jnp.int32)
    return seqlens, jnp.concatenate([offsets, jnp.full((b, 1), -1, jnp.int32)], axis=1)


def splash_attention(q, k, v, segment_ids, *, scale, sliding_window, block: int = 128):
    """Pallas splash attention (TPU); runs in interpret mode elsewhere, which is how CPU tests use it."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q.shape
    if t % block:
        raise ValueError(f"splash attention needs a sequence length that is a multiple of {block}, got {t}")
    if sliding_window is None:
        head_mask = sm.CausalMask((t, t))
    else:
        head_mask = sm.LocalMask((t, t), window_size=(sliding_window - 1, 0), offset=0)
    sizes = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([head_mask] * n), head_shards=1, q_seq_shards=1, block_sizes=sizes,
        interpret=jax.devices()[0].platform != "tpu")

    def one_row(q, k, v, seg):
        # The kernel wants (heads, seq, head_dim) and does not scale q itself.
        out = kernel(
            (q * scale).astype(q.dtype).swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
            segment_ids=sk.SegmentIds(q=seg, kv=seg))
        return out.swapaxes(0, 1)

    return _per_shard(jax.vmap(one_row), q, k, v, segment_ids)


def _per_shard(fn, q, k, v, segment_ids):
    """Run a Pallas kernel on each device's block of rows and heads: the compiler cannot
    partition a kernel call by itself. Rows split over (data, fsdp), heads over tensor."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, segment_ids)
    shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
    rows = tuple(a for a in ("data", "fsdp") if shape.get(a, 1) > 1)
    rows_size = 1
    for a in rows:
        rows_size *= shape[a]
    row_spec = rows if rows and q.shape[0] % rows_size == 0 else None
    tensor = shape.get("tensor", 1)
    head_spec = "tensor" if tensor > 1 and q.shape[2] % tensor == 0 and k.shape[2] % tensor == 0 else None
    qkv = P(row_spec, None, head_spec, None)
    return jax.shard_map(fn, in_specs=(qkv, qkv, qkv, P(row_spec, None)), out_specs=qkv,
                         check_vma=False)(q, k, v, segment_ids)
