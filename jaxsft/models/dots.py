"""Matmuls in the compute dtype, accumulated in float32, forward and backward.

In bfloat16 every matmul runs as bf16 x bf16 -> float32 (`preferred_element_type`), the result
rounded to bf16 after where bf16 is wanted. That is the form TPUs and GPUs run natively and the
one XLA:CPU runs natively too (avx512_bf16), while a bf16-output matmul is converted there to a
float32 one, about 4x slower. Autodiff of that form would give the backward mixed float32 x bf16
matmuls (the cotangent of a float32 result is float32), converted to float32 x float32 on CPU and
GPU; the custom VJP rounds the cotangent to bf16 and runs both backward matmuls in the same
bf16 x bf16 -> float32 form (what a TPU's default precision does to a float32 operand anyway).
Where the cotangent was bf16 already (a bf16 result) the numbers are those of autodiff.

A custom VJP hides its dot from `jax.checkpoint`'s dot policies (`checkpoint_dots` sees no
dot_general), so every result is named: DOT, or BATCH_DOT when the matmul has batch dimensions
(indices in both operands and the result, as in attention), and the decoder's 'dots' policies save
those names too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

DOT, BATCH_DOT = "dot", "batch_dot"


def einsum(equation: str, x, w, out_dtype=None):
    """`jnp.einsum(equation, x, w)` for two operands, computed in x's dtype with float32
    accumulation; w is cast to x's dtype (a float32 master keeps a float32 gradient). The result
    is `out_dtype` (default x's dtype). Every index of an operand must appear in the other operand
    or in the output (no index summed within one operand), as in every matmul of the decoder."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if x.dtype == jnp.float32:
        y = jnp.einsum(equation, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)
    else:
        y = _accumulated(equation, out_dtype, x, w)
    inputs, out_axes = equation.replace(" ", "").split("->")
    x_axes, w_axes = inputs.split(",")
    return checkpoint_name(y, BATCH_DOT if set(x_axes) & set(w_axes) & set(out_axes) else DOT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _accumulated(equation, out_dtype, x, w):
    return jnp.einsum(equation, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _forward(equation, out_dtype, x, w):
    return _accumulated(equation, out_dtype, x, w), (x, w)


def backward_products(equation: str, x, w, g):
    """The two backward matmuls of `einsum(equation, x, w)` for the cotangent g, in x's dtype
    (g rounded to it first) with float32 accumulation: (dx, dw), both float32, not rounded."""
    inputs, out_axes = equation.replace(" ", "").split("->")
    x_axes, w_axes = inputs.split(",")
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out_axes},{w_axes}->{x_axes}", g, w.astype(x.dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{out_axes},{x_axes}->{w_axes}", g, x, preferred_element_type=jnp.float32)
    return dx, dw


def _backward(equation, out_dtype, residuals, g):
    x, w = residuals
    dx, dw = backward_products(equation, x, w, g)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_accumulated.defvjp(_forward, _backward)
