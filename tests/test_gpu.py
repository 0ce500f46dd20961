"""Checks that need an NVIDIA GPU: cuDNN attention on packed rows against the xla reference,
forward and backward. They run wherever a GPU is present (the device machine), not in CPU CI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.models.attention import attention

pytestmark = pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs an NVIDIA GPU")


@pytest.mark.parametrize("window", [None, 64])
def test_cudnn_packed_attention_matches_xla(window):
    b, t, n, k, h = 2, 512, 8, 2, 128
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    kk = jax.random.normal(keys[1], (b, t, k, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, k, h), jnp.bfloat16)
    seg = np.zeros((b, t), np.int32)
    seg[0, :100], seg[0, 100:350], seg[0, 350:500] = 1, 2, 3  # 12 padding tokens at the end
    seg[1, :512] = 1
    seg = jnp.asarray(seg)
    cot = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)

    def loss(backend, q, kk, v):
        out = attention(q, kk, v, seg, scale=h ** -0.5, sliding_window=window, backend=backend)
        return jnp.sum(jnp.where((seg > 0)[..., None, None], out.astype(jnp.float32) * cot, 0.0)), out

    (ref_loss, ref), ref_grads = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, kk, v)
    (got_loss, got), got_grads = jax.value_and_grad(lambda *a: loss("cudnn", *a), argnums=(0, 1, 2), has_aux=True)(q, kk, v)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(ref, np.float32)[real], atol=2e-2)
    assert np.isfinite(np.asarray(got, np.float32)).all()
    for g, r in zip(got_grads, ref_grads):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.isfinite(g).all()
        assert np.abs(g - r).max() <= 2e-2 * np.abs(r).max()
