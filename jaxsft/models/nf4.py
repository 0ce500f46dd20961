"""NF4: 4-bit NormalFloat weights exactly as bitsandbytes stores them (QLoRA's base weights).

A weight is quantized in blocks of 64 consecutive values of its flattened Hugging Face (out, in)
tensor: each block keeps its absolute maximum (float32) and each value the index of the nearest
of 16 NF4 levels (in [-1, 1]) to value / absmax, two indices per byte, the first in the high
nibble. With double quantization the block maxima are stored again, quantized: their mean is
subtracted (`offset`), and they are quantized with bitsandbytes' 8-bit dynamic code in blocks of
256, each with its own float32 maximum (`nested_absmax`).

`quantize` runs on the host (numpy; weights are quantized while they are read) and gives the
bytes and statistics `bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type='nf4',
compress_statistics=...)` gives; `dequantize` runs in JAX inside the decoder, one layer at a time.
Weights are kept 2-D and transposed, (in // 2, out) bytes and (in // 64, out) maxima: bitsandbytes'
(out, in // 2) and (out, in // 64) matrices, stored in the (in, out) orientation of the jaxsft
kernel they dequantize to. Stored as bitsandbytes lays them out, XLA's TPU compiler transposed every
stacked weight's bytes ahead of the layer scan (the matmuls want the kernel's orientation), a second
copy of the NF4 base (3.4 GiB of Llama 3.1 8B's). They shard like the kernel; this needs in % 64 == 0
(true of every supported model family's sizes).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BLOCK = 64
NESTED_BLOCK = 256

# bitsandbytes.functional.get_4bit_type('nf4').
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

# bitsandbytes.functional.create_dynamic_map() (signed, 8 bits) as float32 little-endian bytes. (It is
# built with torch.linspace, whose float32 rounding numpy does not repeat.) A loaded checkpoint brings
# its own copy (`nested_code`).
DYNAMIC_CODE = np.frombuffer(bytes.fromhex(
    "33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf9a9956bf"
    "000053bf66664fbfcdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf00002fbf66662bbf"
    "cdcc27bf343324bf9a9920bf00001dbf666619bfcdcc15bf343312bf9a990ebf00000bbf666607bfcccc03bf333300bf"
    "3233f9be0000f2becccceabe9a99e3be6666dcbe3333d5be0000cebeccccc6be9a99bfbe6666b8be3333b1be0000aabe"
    "cccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbecdcc60be666652be000044be9a9935be333327be"
    "cdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd6766bebdd7a3b8bd48e1b2bdb81eadbd2a5ca7bd9a99a1bd"
    "0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bdc3f538bd"
    "a3702dbd85eb21bd676616bd48e10abd52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc"
    "643b1fbc180416bccdcc0cbc819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb"
    "5c8f42bb2db21dbbfca9f1ba9defa7baff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b9"
    "4b1fbab8b3ef8ab8348037b80642b2b7ff0502b7941a5ab6b7a313b500000000b7a31335941a5a36ff0502370642b237"
    "34803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a806a3c3a3ee8593aff65773a9defa73a"
    "fca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3bd34de23b6abcf43b8195033c"
    "cdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c15aee73c52b8fe3c48e10a3d"
    "6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d5d8f723d7b147e3dcdcc843d5d8f8a3d"
    "eb51903d7b14963d0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23dd7a3b83d6766be3df728c43d85ebc93d3433db3d"
    "0000f83d66660a3ecdcc183e3333273e9a99353e0000443e6666523ecdcc603e33336f3e99997d3e0000863e34338d3e"
    "6666943e9a999b3ecccca23e0000aa3e3333b13e6666b83e9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33e"
    "ccccea3e0000f23e3233f93e3333003fcccc033f6666073f00000b3f9a990e3f3433123fcdcc153f6666193f00001d3f"
    "9a99203f3433243fcdcc273f66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f0000413f9a99443f3333483f"
    "cdcc4b3f66664f3f0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f6666733f"
    "0000773f9a997a3f33337e3f0000803f"
), "<f4").astype(np.float32)


def quantize(w: np.ndarray, double_quant: bool = True) -> dict[str, np.ndarray]:
    """NF4 of a Hugging Face (out, in) weight: {'packed' (in // 2, out) uint8, 'absmax' (in // 64, out)}
    (bitsandbytes' matrices transposed) with float32 absmax, or with double quantization uint8 absmax
    plus 'nested_absmax' (ceil(blocks / 256),), 'offset' () and 'nested_code' (256,) float32."""
    out_features, in_features = w.shape
    if in_features % BLOCK:
        raise ValueError(f"NF4 needs input features divisible by {BLOCK}, got a weight of shape {w.shape}")
    blocks = w.astype(np.float32).reshape(-1, BLOCK)
    absmax = np.abs(blocks).max(axis=1)
    # As bitsandbytes: multiply by the reciprocal, then the level whose midpoint interval holds the value.
    scaled = np.clip(blocks * (np.float32(1) / np.maximum(absmax, np.float32(1e-38)))[:, None], -1, 1)
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    index = np.searchsorted(midpoints, scaled, side="left").astype(np.uint8).reshape(-1)
    packed = (index[0::2] << 4) | index[1::2]
    result = {"packed": packed.reshape(out_features, in_features // 2)}
    if not double_quant:
        return stored({**result, "absmax": absmax.reshape(out_features, -1)})
    offset = _torch_mean(absmax)
    codes, nested_absmax = _quantize_blockwise_8bit(absmax - offset)
    return stored({**result, "absmax": codes.reshape(out_features, -1), "nested_absmax": nested_absmax,
                   "offset": np.asarray(offset), "nested_code": DYNAMIC_CODE.copy()})


def stored(q: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """bitsandbytes' NF4 arrays of one weight (packed (out, in // 2), absmax (out, in // 64)) as
    jaxsft stores them: those two transposed, contiguous."""
    return {k: np.ascontiguousarray(v.T) if k in ("packed", "absmax") else v for k, v in q.items()}


def _quantize_blockwise_8bit(x: np.ndarray):
    # bitsandbytes' CPU quantize_blockwise: value * (1 / block absmax), rounded onto 65536 points of
    # [-1, 1], each mapped to the nearest code by a table built from the codes' midpoints.
    n = x.size
    padded = np.pad(x, (0, -n % NESTED_BLOCK)).reshape(-1, NESTED_BLOCK)
    absmax = np.abs(padded).max(axis=1)
    inverse = np.float32(1) / np.where(absmax == 0, np.float32(1), absmax)
    normed = np.clip(padded * inverse[:, None], np.float32(-1), np.float32(1))
    point = ((normed + np.float32(1)) * np.float32(0.5) * np.float32(LUT_POINTS - 1) + np.float32(0.5)).astype(np.uint16)
    codes = np.where(absmax[:, None] == 0, np.uint8(0), _dynamic_lut()[point])
    return codes.reshape(-1)[:n], absmax.astype(np.float32)


LUT_POINTS = 65536


def _torch_mean(x: np.ndarray) -> np.float32:
    """torch.mean of a float32 vector, bit for bit: the sum in torch's CPU order (8-lane vectors,
    4 interleaved accumulators, a 4-level cascade), then / n. Exact against torch on one thread;
    torch splits a reduction of 32768+ values (a weight of 2M+ values) over its threads, and there
    bitsandbytes' own offset depends on the thread count."""
    lanes, ilp, levels = 8, 4, 4
    n = x.size
    vectors = x[:n // lanes * lanes].reshape(-1, lanes)
    rows = vectors[:len(vectors) // ilp * ilp].reshape(-1, ilp, lanes)
    size = len(rows)
    level_power = max(4, (math.ceil(math.log2(size)) if size > 1 else 0) // levels)
    step, mask = 1 << level_power, (1 << level_power) - 1
    acc = np.zeros((levels, ilp, lanes), np.float32)
    i = 0
    while i + step <= size:  # each level-0 run is a sequential sum from zero
        acc[0] = np.add.accumulate(rows[i:i + step], axis=0)[-1]
        i += step
        for j in range(1, levels):
            acc[j] += acc[j - 1]
            acc[j - 1] = 0
            if i & (mask << (j * level_power)):
                break
    if i < size:
        acc[0] = np.add.accumulate(rows[i:], axis=0)[-1]
    for j in range(1, levels):
        acc[0] += acc[j]
    partial = acc[0]
    for v in vectors[size * ilp:]:
        partial[0] += v
    for k in range(1, ilp):
        partial[0] += partial[k]
    total = np.float32(0)
    for value in (*x[len(vectors) * lanes:], *partial[0]):
        total = np.float32(total + value)
    return np.float32(total / np.float32(n))


@functools.cache
def _dynamic_lut() -> np.ndarray:
    points = np.float32(-1) + np.float32(2) * np.arange(LUT_POINTS, dtype=np.float32) / np.float32(LUT_POINTS - 1)
    midpoints = np.float32(0.5) * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    return np.searchsorted(midpoints, points, side="left").astype(np.uint8)


def dequantize(q: dict, dtype=jnp.float32):
    """The (..., in, out) kernel (the Hugging Face weight transposed) of NF4 arrays `q` (as
    `quantize` gives them, with any leading axes), computed in float32 as bitsandbytes does and
    returned in `dtype`."""
    absmax = q["absmax"]
    if "nested_absmax" in q:
        absmax = _dequantize_absmax(q)
    packed = q["packed"]
    *lead, half, out_features = packed.shape
    # Byte j of an output's row holds its inputs 2j (high nibble) and 2j + 1.
    index = jnp.stack([packed >> 4, packed & 0xF], axis=-2).reshape(*lead, -1, BLOCK, out_features)
    values = _levels(index) * absmax[..., None, :]
    return values.reshape(*lead, 2 * half, out_features).astype(dtype)


def _levels(index):
    # NF4_CODE[index] as 15 elementwise selects, which XLA fuses into the dequantization: a gather
    # from the table is not fused, and materialized int32 indices and float32 levels of the whole
    # weight (224 MiB each for an 8B model's MLP weight).
    values = jnp.full(index.shape, NF4_CODE[0])
    for i in range(1, len(NF4_CODE)):
        values = jnp.where(index == i, NF4_CODE[i], values)
    return values


def _dequantize_absmax(q: dict):
    # The nested blocks run along bitsandbytes' (out, in // 64) order: the maxima transposed back
    # (1/64 of the weight's size) and forth.
    codes = jnp.swapaxes(q["absmax"], -1, -2)
    lead = codes.shape[:-2]
    flat = codes.reshape(*lead, -1).astype(jnp.int32)
    values = jnp.take_along_axis(q["nested_code"], flat, axis=-1)
    scale = jnp.repeat(q["nested_absmax"], NESTED_BLOCK, axis=-1,
                       total_repeat_length=q["nested_absmax"].shape[-1] * NESTED_BLOCK)[..., :flat.shape[-1]]
    absmax = values * scale + q["offset"][..., None]
    return jnp.swapaxes(absmax.reshape(codes.shape), -1, -2)


def hf_shape(shape: tuple[int, ...], input_axes: int) -> tuple[int, int]:
    """The Hugging Face (out, in) shape of a jaxsft kernel whose first `input_axes` axes are inputs."""
    return math.prod(shape[input_axes:]), math.prod(shape[:input_axes])


def arrays_shapes(out_features: int, in_features: int, double_quant: bool = True) -> dict[str, tuple]:
    """key -> (shape, dtype) of one weight's NF4 arrays (what `quantize` returns)."""
    blocks = out_features * in_features // BLOCK
    shapes = {"packed": ((in_features // 2, out_features), np.uint8),
              "absmax": ((in_features // BLOCK, out_features), np.uint8 if double_quant else np.float32)}
    if double_quant:
        shapes.update(nested_absmax=((-(-blocks // NESTED_BLOCK),), np.float32), offset=((), np.float32),
                      nested_code=((len(DYNAMIC_CODE),), np.float32))
    return shapes


class NF4(nnx.Module):
    """One stacked NF4 weight of the decoder: the arrays of `quantize` for every layer, stacked on a
    leading 'layers' axis. `packed` and `absmax` carry the (in, out) kernel's logical axes, so they
    shard like it; the small nested statistics are replicated. Frozen (QLoRA trains adapters only)."""

    def __init__(self, arrays: dict, out_axis: str, in_axis: str):
        for key, value in arrays.items():
            axes = {"packed": (in_axis, out_axis), "absmax": (in_axis, out_axis)}.get(key, (None,) * (value.ndim - 1))
            setattr(self, key, nnx.Param(value, logical_axes=("layers", *axes)))

    def arrays(self) -> dict[str, jax.Array]:
        return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}

    @classmethod
    def zeros(cls, num_layers: int, out_features: int, in_features: int, out_axis: str, in_axis: str,
              double_quant: bool = True) -> "NF4":
        """Placeholder arrays of the right shapes (filled by the loaders)."""
        return cls({k: jnp.zeros((num_layers, *shape), dtype)
                    for k, (shape, dtype) in arrays_shapes(out_features, in_features, double_quant).items()},
                   out_axis, in_axis)
