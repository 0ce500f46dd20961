"""One generic decoder for Llama, Mistral, Qwen2/3 and Granite.

Parameters live in NNX modules and carry logical axis names (metadata `logical_axes`); the math is
plain functions. Layer weights are stacked on a leading 'layers' axis and run with `jax.lax.scan`,
so compile time does not grow with depth. No sharding logic here: `jaxsft.sharding` maps the
logical names onto a mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft.models import dots, nf4
from jaxsft.models.attention import attention, resolve_backend
from jaxsft.models.config import ModelConfig

_policies = jax.checkpoint_policies
# The dot policies save `dots.einsum`'s named results (its custom VJP hides the dot itself) and
# the attention's output (BATCH_DOT), not the scores inside the attention's own VJP (recomputed).
REMAT = {
    "none": None,
    "full": _policies.nothing_saveable,
    "dots": _policies.save_from_both_policies(_policies.dots_with_no_batch_dims_saveable,
                                              _policies.save_only_these_names(dots.DOT, dots.BATCH_DOT)),
    "dots_no_batch": _policies.save_from_both_policies(_policies.dots_with_no_batch_dims_saveable,
                                                       _policies.save_only_these_names(dots.DOT)),
}


def residuals_as_integers(layer):
    """`layer(x, weights) -> (x, aux)` with the same values and derivatives, whose residuals (what
    the backward keeps of each layer) are stored with their 16-bit floats bitcast to uint16. The
    scan stacks every layer's residuals; XLA:CPU writes one layer's slice into a bf16 stack by
    converting the whole stack to float32 and back (not in place), 30 layers x ~20 stacks per
    micro-batch: 3.8 of a quickstart-shaped step's 17 s of kernels. Integer stacks are written in
    place; the bitcasts are free on every backend."""
    stored = {}

    @jax.custom_vjp
    def wrapped(x, weights):
        return layer(x, weights)

    def forward(x, weights):
        out, pullback = jax.vjp(layer, x, weights)
        residuals, stored["tree"] = jax.tree.flatten(pullback)
        stored["dtypes"] = [a.dtype for a in residuals]
        return out, [uint16_view(a) for a in residuals]

    def backward(residuals, g):
        residuals = [from_view(a, d) for a, d in zip(residuals, stored["dtypes"])]
        return jax.tree.unflatten(stored["tree"], residuals)(g)

    wrapped.defvjp(forward, backward)
    return wrapped


def uint16_view(a):
    """A 16-bit float array as uint16 (same bits), any other unchanged: XLA:CPU writes a slice into
    a 16-bit float array (a scan's stacked outputs, a KV cache) by converting all of it to float32
    and back, into an integer array in place. The bitcast is free on every backend."""
    if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(a, jnp.uint16)
    return a


def from_view(a, dtype):
    """The array `uint16_view` viewed as `dtype` again."""
    return a if a.dtype == dtype else jax.lax.bitcast_convert_type(a, dtype)


def scanned_views(stacked):
    """(`stacked`'s leaves as `uint16_view`s, the function viewing one scan step's slice of them
    back): XLA:CPU slices a 16-bit float stack in a loop by converting all of it to float32 first
    (every weight of the model, each call). The views have no gradient."""
    dtypes = jax.tree.map(lambda a: a.dtype, stacked)
    return jax.tree.map(uint16_view, stacked), lambda sliced: jax.tree.map(from_view, sliced, dtypes)


def update_slice(a, update, index):
    """`jax.lax.dynamic_update_slice(a, update.astype(a.dtype), index)`, in place on XLA:CPU for
    16-bit floats too (`uint16_view`)."""
    written = jax.lax.dynamic_update_slice(uint16_view(a), uint16_view(update.astype(a.dtype)), index)
    return from_view(written, a.dtype)


# The linear projections (LoRA's targets, QLoRA's NF4 weights) -> how many leading axes of their
# kernel are input features (o is (heads, head_dim, embed)).
INPUT_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def layer_shapes(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Per-layer weight shapes and logical axes (without the leading layers axis)."""
    e, n, k, h, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    shapes = {
        "attn_norm": ((e,), ("norm",)),
        "q": ((e, n, h), ("embed", "heads", "head_dim")),
        "k": ((e, k, h), ("embed", "kv_heads", "head_dim")),
        "v": ((e, k, h), ("embed", "kv_heads", "head_dim")),
        "o": ((n, h, e), ("heads", "head_dim", "embed")),
        "mlp_norm": ((e,), ("norm",)),
        "gate": ((e, f), ("embed", "mlp")),
        "up": ((e, f), ("embed", "mlp")),
        "down": ((f, e), ("mlp", "embed")),
    }
    if c.qkv_bias:
        shapes["q_bias"] = ((n, h), ("heads", "head_dim"))
        shapes["k_bias"] = ((k, h), ("kv_heads", "head_dim"))
        shapes["v_bias"] = ((k, h), ("kv_heads", "head_dim"))
    if c.o_bias:
        shapes["o_bias"] = ((e,), ("norm",))
    if c.qk_norm:
        shapes["q_norm"] = ((h,), ("norm",))
        shapes["k_norm"] = ((h,), ("norm",))
    return shapes


def _init_for(name: str):
    if "norm" in name:
        return jax.nn.initializers.ones
    if "bias" in name:
        return jax.nn.initializers.zeros
    return jax.nn.initializers.normal(0.02)


class Layers(nnx.Module):
    """All decoder layers' weights, each stacked on a leading 'layers' axis. With
    `config.base_quant='nf4'` the linear projections are `nf4.NF4` weights (placeholders here,
    filled by the loaders), the norms and biases stay in `param_dtype`."""

    def __init__(self, c: ModelConfig, param_dtype, rngs: nnx.Rngs):
        for name, (shape, axes) in layer_shapes(c).items():
            if c.base_quant and name in INPUT_AXES:
                k = INPUT_AXES[name]
                out_axis, in_axis = axes[k], axes[0]  # heads / mlp / embed: the leading axis of each side
                setattr(self, name, nf4.NF4.zeros(c.num_layers, *nf4.hf_shape(shape, k), out_axis, in_axis,
                                                  c.base_double_quant))
                continue
            value = _init_for(name)(rngs.params(), (c.num_layers, *shape), param_dtype)
            setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))

    def arrays(self) -> dict[str, jax.Array | dict[str, jax.Array]]:
        """Stacked weights; an NF4 weight is its dict of arrays (`layer_weights` dequantizes it)."""
        return {name: p.arrays() if isinstance(p, nf4.NF4) else p[...]
                for name, p in vars(self).items() if isinstance(p, (nnx.Param, nf4.NF4))}


def layer_weights(w: dict, c: ModelConfig, dtype) -> dict[str, jax.Array]:
    """One layer's weights (a slice of `Layers.arrays()`) in `dtype`: NF4 weights dequantized here,
    inside the layer, so only one layer's full-precision kernels exist at a time."""
    shapes = layer_shapes(c)
    return {name: nf4.dequantize(a, dtype).reshape(shapes[name][0]) if isinstance(a, dict) else a.astype(dtype)
            for name, a in w.items()}


class Decoder(nnx.Module):
    def __init__(self, config: ModelConfig, *, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        c = config
        self.config = config
        self.compute_dtype = compute_dtype
        normal = jax.nn.initializers.normal(0.02)
        self.embed = nnx.Param(
            normal(rngs.params(), (c.vocab_size, c.hidden_size), param_dtype), logical_axes=("vocab", "embed"))
        self.layers = Layers(c, param_dtype, rngs)
        self.final_norm = nnx.Param(jnp.ones((c.hidden_size,), param_dtype), logical_axes=("norm",))
        if not c.tie_word_embeddings:
            self.lm_head = nnx.Param(
                normal(rngs.params(), (c.hidden_size, c.vocab_size), param_dtype), logical_axes=("embed", "vocab"))
        # LoRA adapters (`jaxsft.models.lora.Adapters`), attached by `lora.attach` or a PEFT import.
        self.lora = nnx.data(None)

    def __call__(self, input_ids, segment_ids=None, positions=None):
        """input_ids (B, T) -> float32 logits (B, T, vocab)."""
        return self.logits(self.hidden_states(input_ids, segment_ids, positions))

    def hidden_states(self, input_ids, segment_ids=None, positions=None):
        """Final-normed hidden states (B, T, hidden) in the compute dtype."""
        c = self.config
        if segment_ids is None:
            segment_ids = jnp.ones(input_ids.shape, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        x = embed_lookup(self.embed[...], input_ids, self.compute_dtype) * c.embedding_multiplier
        backend = resolve_backend(c.attention, c.head_dim, self.compute_dtype)
        inv_freq = rope_frequencies(c)

        def attend(q, k, v):
            out = attention(q, k, v, segment_ids, scale=c.attention_scale,
                            sliding_window=c.sliding_window, backend=backend)
            return out, None

        layers, viewed_back = self.layers.arrays(), lambda w: w
        if self.lora is not None:
            # A LoRA run trains its adapters alone (`LoraParam`): the base is a constant here, so
            # it can be scanned as views (trained weights need a gradient).
            layers, viewed_back = scanned_views(jax.lax.stop_gradient(layers))

        def body(x, layer):
            w, adapters = layer
            w = layer_weights(viewed_back(w), c, self.compute_dtype)
            adapt = None if adapters is None else self.lora.adapt(adapters, self.compute_dtype)
            return decoder_layer(x, w, positions, inv_freq, c, attend, adapt)

        if REMAT[c.remat] is not None:
            body = jax.checkpoint(body, policy=REMAT[c.remat], prevent_cse=False)
        body = residuals_as_integers(body)
        adapters = None if self.lora is None else self.lora.layer_inputs()
        x, _ = jax.lax.scan(body, x, (layers, adapters))
        return rms_norm(x, self.final_norm[...], c.rms_norm_eps)

    def output_weight(self):
        """(einsum equation, weight) of the output projection: the LM head, or the embedding when
        tied. The stored weights are cast inside the matmul, so their gradient stays float32, and
        are used as laid out: a transposed tied embedding makes XLA:CPU fold the transpose into the
        gradient's matmul, a form it cannot run in bf16."""
        if self.config.tie_word_embeddings:
            return "bte,ve->btv", self.embed[...]
        return "bte,ev->btv", self.lm_head[...]

    def logits(self, hidden):
        """Float32 logits (B, T, vocab) of hidden states in the compute dtype."""
        equation, w = self.output_weight()
        return dots.einsum(equation, hidden, w, out_dtype=jnp.float32) / self.config.logits_scaling


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embed_lookup(table, ids, dtype):
    """The rows `ids` of `table`, in `dtype`. Its gradient is summed in float32 over every
    occurrence of a token (a frequent one occurs hundreds of times in a micro-batch), then
    rounded to `dtype` once, as every compute-dtype gradient is (so a float32 table and its bf16
    copy in the offloaded tiers get the same bits); the transpose of a bf16 gather would add
    them in bf16. The rows are gathered from the table's uint16 view: XLA:CPU gathers from a
    16-bit float table by converting all of it to float32 first."""
    return from_view(uint16_view(table)[ids], table.dtype).astype(dtype)


def _embed_lookup_fwd(table, ids, dtype):
    return embed_lookup(table, ids, dtype), (table, ids)


def _embed_lookup_bwd(dtype, residuals, g):
    table, ids = residuals
    grad = jnp.zeros(table.shape, jnp.float32).at[ids].add(g.astype(jnp.float32))
    return grad.astype(dtype).astype(table.dtype), None


embed_lookup.defvjp(_embed_lookup_fwd, _embed_lookup_bwd)


def decoder_layer(x, w, positions, inv_freq, c: ModelConfig, attend, adapt=None):
    """One pre-norm block. `attend(q, k, v) -> (out, aux)` is the attention (packed for training,
    with a KV cache for generation); its aux comes back as the second result. `adapt(name, x, y)`,
    when given, adds LoRA adapters to the projection `name` (input x, output y). Projections are
    matmuls accumulated in float32 and rounded to x's dtype after, forward and backward
    (`jaxsft.models.dots`)."""

    def project(equation, x, name):
        y = dots.einsum(equation, x, w[name])
        return y if adapt is None else adapt(name, x, y)

    h = rms_norm(x, w["attn_norm"], c.rms_norm_eps)
    q = project("bte,enh->btnh", h, "q")
    k = project("bte,ekh->btkh", h, "k")
    v = project("bte,ekh->btkh", h, "v")
    if c.qkv_bias:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    if c.qk_norm:
        q = rms_norm(q, w["q_norm"], c.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], c.rms_norm_eps)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    a, aux = attend(q, k, v)
    out = project("btnh,nhe->bte", a, "o")
    if c.o_bias:
        out = out + w["o_bias"]
    x = x + out * c.residual_multiplier
    h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
    mlp = jax.nn.silu(project("bte,ef->btf", h, "gate")) * project("bte,ef->btf", h, "up")
    return x + project("btf,fe->bte", mlp, "down") * c.residual_multiplier, aux


def rms_norm(x, weight, eps):
    # Statistics in float32 as transformers does, then back to the input dtype before the scale.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_frequencies(c: ModelConfig):
    """Inverse frequencies (head_dim/2,), with llama3 or linear scaling as configured."""
    inv_freq = 1.0 / (c.rope_theta ** (jnp.arange(0, c.head_dim, 2, dtype=jnp.float32) / c.head_dim))
    s = c.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: long wavelengths divided by `factor`, short ones kept, the middle band interpolated.
    factor, low, high, old_len = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                                  s["original_max_position_embeddings"])
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE (the Hugging Face layout); positions (B, T) restart per packed sample."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
