"""cuDNN packed attention. The kernel checks need an NVIDIA GPU (they run on the device machine via
benchmarks/gpu_check.py); the layout it is given (per-row segment lengths and offsets in a bounded
number of slots) and the slot-cap switch are checked on CPU against brute-force references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.models import attention as attn
from jaxsft.models.attention import CUDNN_SEGMENT_SLOTS, attention, packed_layout, slots_needed, xla_attention

on_gpu = pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs an NVIDIA GPU")


def packed_segments(lengths_per_row, t):
    """(rows, t) 1-based segment ids of samples of the given lengths, trailing padding 0."""
    seg = np.zeros((len(lengths_per_row), t), np.int32)
    for r, lengths in enumerate(lengths_per_row):
        seg[r, :sum(lengths)] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    return seg


def brute_force_layout(seg, slots):
    """cuDNN's packed layout by hand: every run of equal ids (padding included) is one sample."""
    seqlens = np.full((len(seg), slots), -1, np.int32)
    offsets = np.full((len(seg), slots + 1), -1, np.int32)
    for r, row in enumerate(seg):
        starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1]]
        ends = starts[1:] + [len(row)]
        for s, (a, e) in enumerate(zip(starts, ends)):
            seqlens[r, s], offsets[r, s] = e - a, a
    return seqlens, offsets


def test_packed_layout_matches_brute_force_for_1_several_and_max_segments():
    t, cap = 256, CUDNN_SEGMENT_SLOTS
    rng = np.random.default_rng(0)
    rows = [
        [t],                                   # one sample, no padding
        [100],                                 # one sample + padding
        [40, 70, 3, 90],                       # several + padding
        list(rng.multinomial(t - cap, [1 / cap] * cap) + 1),  # exactly `cap` samples, no padding
        [7] * (cap - 1),                       # cap - 1 samples + padding: needs exactly `cap` slots
        [1] * 5 + [2],                         # length-1 samples
    ]
    seg = packed_segments(rows, t)
    needed = np.asarray(slots_needed(jnp.asarray(seg)))
    np.testing.assert_array_equal(needed, [1, 2, 5, cap, cap, 7])
    for slots in (cap, t):
        seqlens, offsets = jax.jit(packed_layout, static_argnums=1)(jnp.asarray(seg), slots)
        want_lens, want_offsets = brute_force_layout(seg, slots)
        assert seqlens.shape == (len(rows), slots) and offsets.shape == (len(rows), slots + 1)
        np.testing.assert_array_equal(seqlens, want_lens)
        np.testing.assert_array_equal(offsets, want_offsets)
        assert (np.asarray(seqlens).clip(0).sum(1) == t).all()  # every position in exactly one slot


def cudnn_on_cpu(q, k, v, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale, mask_type, qkv_layout,
                 sliding_window_length):
    """cuDNN's packed attention semantics (attend causally within a slot's [offset, offset + len))
    computed with the xla backend: what the real kernel is checked against on the GPU."""
    assert q_seqlen is kv_seqlen and q_offsets is kv_offsets and qkv_layout == "BTNH"
    pos = jnp.arange(q.shape[1])
    start, length = q_offsets[:, None, :-1], q_seqlen[:, None, :]
    inside = (pos[None, :, None] >= start) & (pos[None, :, None] < start + length) & (length > 0)
    slot = jnp.where(inside.any(-1), jnp.argmax(inside, -1), -1 - pos)  # uncovered: attends to itself
    return xla_attention(q, k, v, slot, scale=scale, sliding_window=sliding_window_length)


@pytest.mark.parametrize("window", [None, 24])
def test_cudnn_path_with_capped_slots_is_exact(monkeypatch, window):
    """The cudnn backend's own code (layout, slot cap, fallback to one slot per token when a row
    holds more samples than the cap), forward and backward inside jit, with cuDNN's semantics
    emulated on CPU: equal to the xla backend on every real position."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(attn, "_cudnn_packing_supported", lambda: True)
    monkeypatch.setattr(fused_attention_stablehlo, "dot_product_attention", cudnn_on_cpu)
    t, n, k, h = 128, 4, 2, 16
    fits = packed_segments([[30, 50, 20], [128]], t)
    too_many = packed_segments([[3] * (CUDNN_SEGMENT_SLOTS + 4), [60, 60]], t)
    keys = jax.random.split(jax.random.key(1), 4)
    for seg in (fits, too_many):
        seg = jnp.asarray(seg)
        q = jax.random.normal(keys[0], (2, t, n, h))
        kk = jax.random.normal(keys[1], (2, t, k, h))
        v = jax.random.normal(keys[2], (2, t, k, h))
        cot = jax.random.normal(keys[3], (2, t, n, h)) * (seg > 0)[..., None, None]

        def loss(backend, q, kk, v):
            out = attention(q, kk, v, seg, scale=h ** -0.5, sliding_window=window, backend=backend)
            return jnp.sum(out * cot), out

        grad = lambda b: jax.jit(jax.value_and_grad(lambda *a: loss(b, *a), (0, 1, 2), has_aux=True))(q, kk, v)
        with jax.default_matmul_precision("float32"):  # no TF32 where this runs on a GPU
            (_, ref), ref_grads = grad("xla")
            (_, got), got_grads = grad("cudnn")
        real = np.asarray(seg > 0)
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=1e-5)
        for g, r in zip(got_grads, ref_grads):
            np.testing.assert_allclose(g, r, atol=1e-5)
    # The emulation is not trivially equal to xla: one slot too few breaks the too-many rows.
    seqlens, _ = packed_layout(jnp.asarray(too_many), CUDNN_SEGMENT_SLOTS)
    assert np.asarray(seqlens)[0].clip(0).sum() < t


@on_gpu
@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("slots", [None, 512])
def test_cudnn_packed_attention_matches_xla(window, slots):
    """The real kernel on packed rows, forward and backward, with the slot cap (None) and with one
    slot per token (512): equal to the xla backend."""
    b, t, n, k, h = 2, 512, 8, 2, 128
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, t, k, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, k, h), jnp.bfloat16)
    seg = jnp.asarray(packed_segments([[100, 250, 150], [512]], t))  # 12 padding tokens in row 0
    cot = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)

    def loss(fn, q, kk, v):
        out = fn(q, kk, v)
        return jnp.sum(jnp.where((seg > 0)[..., None, None], out.astype(jnp.float32) * cot, 0.0)), out

    ref_fn = lambda q, kk, v: attention(q, kk, v, seg, scale=h ** -0.5, sliding_window=window, backend="xla")
    got_fn = lambda q, kk, v: attn.cudnn_attention(q, kk, v, seg, scale=h ** -0.5, sliding_window=window,
                                                   slots=slots)
    (_, ref), ref_grads = jax.jit(jax.value_and_grad(lambda *a: loss(ref_fn, *a), (0, 1, 2), has_aux=True))(q, kk, v)
    (_, got), got_grads = jax.jit(jax.value_and_grad(lambda *a: loss(got_fn, *a), (0, 1, 2), has_aux=True))(q, kk, v)
    real = np.asarray(seg > 0)
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_allclose(got[real], ref[real], atol=2e-2)
    assert np.isfinite(got).all()
    # A cross-sample leak would move row 0's second sample by O(1): make sure the check can see it.
    leak = np.asarray(attention(q, kk, v, jnp.ones_like(seg), scale=h ** -0.5, sliding_window=window,
                                backend="xla"), np.float32)
    assert np.abs(leak[0, 100:350] - ref[0, 100:350]).max() > 0.1
    for g, r in zip(got_grads, ref_grads):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.isfinite(g).all()
        assert np.abs(g - r).max() <= 2e-2 * np.abs(r).max()


@on_gpu
def test_cudnn_row_with_more_samples_than_slots_matches_xla():
    """A row holding more samples than CUDNN_SEGMENT_SLOTS takes the one-slot-per-token branch."""
    b, t, n, k, h = 1, 512, 4, 2, 64
    keys = jax.random.split(jax.random.key(2), 3)
    q, kk, v = (jax.random.normal(key, (b, t, heads, h), jnp.bfloat16) for key, heads in zip(keys, (n, k, k)))
    seg = jnp.asarray(packed_segments([[8] * (CUDNN_SEGMENT_SLOTS + 8)], t))
    ref = attention(q, kk, v, seg, scale=h ** -0.5, sliding_window=None, backend="xla")
    got = jax.jit(lambda *a: attention(*a, seg, scale=h ** -0.5, sliding_window=None, backend="cudnn"))(q, kk, v)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(ref, np.float32)[real], atol=2e-2)
