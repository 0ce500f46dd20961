"""bf16 matmuls accumulate in float32, forward and backward, and the bf16 train step runs no other form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft.models import Decoder, ModelConfig, dots
from jaxsft.train.loss import token_loss_sum

BF16_ULP = 2.0**-8


def reference(equation, x, w):
    """The float32-accumulated product of the bf16 values, in float64 on the host."""
    return np.einsum(equation, np.asarray(x, np.float64), np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64))


def assert_rounded_from(ours, exact):
    """`ours` is `exact` rounded to ours' dtype: one bf16 ulp, or float32 summation error (relative
    to the largest element where terms cancel)."""
    if ours.dtype == jnp.bfloat16:
        rtol, atol = BF16_ULP, BF16_ULP * np.abs(exact).max() * 1e-2
    else:
        rtol, atol = 1e-6, 1e-6 * np.abs(exact).max()
    np.testing.assert_allclose(np.asarray(ours, np.float64), exact, rtol=rtol, atol=atol)


@pytest.mark.parametrize("equation, x_shape, w_shape, w_dtype, out_dtype", [
    ("bte,enh->btnh", (2, 7, 32), (32, 4, 8), jnp.bfloat16, None),          # a projection
    ("btf,fe->bte", (2, 7, 48), (48, 32), jnp.bfloat16, None),              # the MLP's down projection
    ("btkgh,bskh->bkgts", (2, 7, 2, 2, 8), (2, 7, 2, 8), jnp.bfloat16, jnp.float32),  # attention scores
    ("bte,ev->btv", (2, 7, 32), (32, 97), jnp.float32, jnp.float32),        # logits from the float32 master
])
def test_bf16_matmul_and_its_gradients_equal_a_float32_accumulated_reference(equation, x_shape, w_shape, w_dtype,
                                                                             out_dtype):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(*x_shape), jnp.bfloat16)
    w = jnp.asarray(rng.randn(*w_shape), w_dtype)
    y, vjp = jax.vjp(lambda x, w: dots.einsum(equation, x, w, out_dtype=out_dtype), x, w)
    assert y.dtype == (out_dtype or jnp.bfloat16)
    assert_rounded_from(y, reference(equation, x, w))

    g = jnp.asarray(rng.randn(*y.shape), y.dtype)
    dx, dw = vjp(g)
    assert (dx.dtype, dw.dtype) == (jnp.bfloat16, w_dtype)  # a float32 master gets a float32 gradient
    inputs, out = equation.split("->")
    x_axes, w_axes = inputs.split(",")
    g16 = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64)  # the cotangent is rounded to bf16 first
    assert_rounded_from(dx, np.einsum(f"{out},{w_axes}->{x_axes}", g16,
                                      np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64)))
    assert_rounded_from(dw, np.einsum(f"{x_axes},{out}->{w_axes}", np.asarray(x, np.float64), g16))


def dot_operand_dtypes(jaxpr) -> list[tuple]:
    """(lhs dtype, rhs dtype, preferred dtype) of every dot_general in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((*(str(v.aval.dtype) for v in eqn.invars), str(eqn.params["preferred_element_type"])))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found += dot_operand_dtypes(sub)
    return found


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_bf16_train_gradient_runs_every_matmul_as_bf16_times_bf16_into_float32(remat):
    c = ModelConfig(architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
                    remat=remat, attention="xla")
    graphdef, params = nnx.split(Decoder(c, compute_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.RandomState(0)
    batch = {"input_ids": rng.randint(0, 512, (2, 64)), "targets": rng.randint(0, 512, (2, 64)),
             "loss_mask": np.ones((2, 64), np.int32), "segment_ids": np.ones((2, 64), np.int32),
             "positions": np.tile(np.arange(64), (2, 1))}
    loss = lambda p: token_loss_sum(nnx.merge(graphdef, p), batch)  # noqa: E731
    forms = dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    # 7 projections + 2 attention matmuls per layer, the logits: each once forward, twice backward.
    assert len(forms) >= 3 * (9 * 1 + 1)
    assert set(forms) == {("bfloat16", "bfloat16", "float32")}
    # Compiled, it runs (XLA:CPU has no bf16 x bf16 -> float32 kernel for a matmul with a
    # transposed left operand, which a transposed tied embedding made of the logits' gradient), and
    # the gradient of every float32 master is float32 (the tied embedding's included).
    grads = jax.jit(jax.grad(loss))(params)
    assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"float32"}
