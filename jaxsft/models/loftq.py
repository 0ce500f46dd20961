"""LoftQ initialisation of QLoRA adapters (Li et al. 2023; PEFT's `init_lora_weights='loftq'`).

Each adapter starts as the best rank-r approximation of its weight's quantization residual
W - dequant(nf4(W)), so the NF4 base plus the adapters starts near the full-precision model instead
of at the quantized one. With the residual's SVD U S Vh (in the (in, out) kernel orientation),
A = U_r sqrt(S_r / scale) and B = sqrt(S_r / scale) Vh_r: scale * A B = U_r S_r Vh_r.

One iteration on the base bitsandbytes makes, as PEFT's default (`loftq_iter=1`) and its
`replace_lora_weights_loftq` for bitsandbytes models: the base stays `nf4.quantize(W)`, so a run's
adapter still loads in PEFT on the bitsandbytes-quantized base, and a resumed run or an export
rebuilds the same base. (More iterations quantize W - A B instead: a base no bitsandbytes loader
makes.) PEFT splits sqrt(S_r) without the scale (peft#1982), so its scale * B A starts `scale`
times the residual's approximation; here it is the approximation itself (what PEFT's PiSSA does);
the two agree when lora_alpha == r.

The full-precision weight is needed once, while the loader quantizes it (`hf_io.build_model`'s
`on_quantize`), one weight of one layer at a time; a checkpoint stored in 4-bit has none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models import nf4
from jaxsft.models.config import ModelConfig
from jaxsft.models.hf_io import WEIGHT_MAP
from jaxsft.models.lora import LoraSpec, adapter_shapes


class Residuals:
    """The loader's `on_quantize(hf_name, w, q)`: records the LoftQ factors of every adapted
    (projection, layer) of `spec` as its weight is quantized; `adapters` stacks them."""

    def __init__(self, spec: LoraSpec):
        self.spec = spec
        self.wanted = {}  # HF weight name -> (projection, layer, rank, scale)
        for t in spec.targets:
            for layer, (rank, scale) in enumerate(zip(t.ranks, spec.scales(t))):
                if rank:
                    self.wanted[WEIGHT_MAP[t.name][0].format(i=layer)] = (t.name, layer, rank, float(scale))
        self.factors = {}

    def __call__(self, hf_name: str, w: np.ndarray, q: dict) -> None:
        if hf_name in self.wanted:
            name, layer, rank, scale = self.wanted[hf_name]
            a, b = factors(np.asarray(w, np.float32).T, q, rank, scale)
            self.factors[name, layer] = np.asarray(a), np.asarray(b)

    def adapters(self, c: ModelConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name -> (A, B) stacked on layers as `lora.Adapters` holds them (zeros where there is no
        adapter or beyond a layer's rank)."""
        missing = sorted({hf for hf, (name, layer, _, _) in self.wanted.items() if (name, layer) not in self.factors})
        if missing:
            raise ValueError(f"LoftQ: the loader never quantized {missing[:3]}")
        out = {}
        for t in self.spec.targets:
            (a_shape, _), (b_shape, _) = adapter_shapes(self.spec, c)[t.name].values()
            a, b = np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)
            for layer, rank in enumerate(t.ranks):
                if rank:
                    fa, fb = self.factors[t.name, layer]
                    a[layer, ..., :rank] = fa.reshape(*a_shape[1:-1], rank)
                    b[layer, :rank] = fb.reshape(rank, *b_shape[2:])
            out[t.name] = a, b
        return out


@functools.partial(jax.jit, static_argnums=2)
def factors(kernel, q: dict, rank: int, scale: float):
    """(A (in, r), B (r, out)) of a full-precision (in, out) kernel and its NF4 arrays `q`:
    scale * A B is the rank-r SVD approximation of kernel - dequant(q), in float32."""
    u, s, vh = jnp.linalg.svd(kernel - nf4.dequantize(q), full_matrices=False)
    root = jnp.sqrt(s[:rank] / scale)
    return u[:, :rank] * root, root[:, None] * vh[:rank]
