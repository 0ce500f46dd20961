"""One config for every supported decoder family, read from a Hugging Face `config.json`.

Per-family differences are fields here (biases, q/k norms, Granite multipliers, sliding window);
the model code reads only these fields, never the architecture name.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GraniteForCausalLM",
)

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "splash")


class ConfigError(ValueError):
    """A model config that jaxsft cannot run; the message says which key and what to do."""


class ModelNotFound(ConfigError, FileNotFoundError):
    """`model.path` names no model that can be found (a missing file or folder, a Hub id neither
    cached nor reachable): a usage mistake (exit 2), with what to run in the message."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or a dict with rope_type 'llama3' / 'linear' and its parameters.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    # Granite's multipliers; 1.0 (and attention_multiplier None = 1/sqrt(head_dim)) elsewhere.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Run-time choices, not part of the checkpoint.
    remat: str = "full"
    attention: str = "auto"
    # '' or 'nf4': the linear projections stored as bitsandbytes NF4 (QLoRA's frozen base; set by
    # lora.base_quant, or by a checkpoint saved 4-bit by transformers + bitsandbytes).
    base_quant: str = ""
    base_double_quant: bool = True  # NF4 block maxima quantized again (bitsandbytes' compress_statistics)
    # The untouched HF config, written back on export so nothing the user had is lost.
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    hf_generation_config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={self.remat!r}: choose one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention={self.attention!r}: choose one of {ATTENTION_BACKENDS}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")

    @property
    def attention_scale(self) -> float:
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        return self.head_dim ** -0.5

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json", **run_options) -> "ModelConfig":
        """Build from a HF config dict; `source` names the file in error messages."""
        architectures = hf.get("architectures") or []
        arch = architectures[0] if architectures else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: architecture {arch!r} is not supported; jaxsft supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")

        def need(key):
            if key not in hf:
                raise ConfigError(f"{source}: required key {key!r} is missing for {arch}")
            return hf[key]

        if hf.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported (no released model uses it)")
        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = hf.get("head_dim") or hidden // num_heads
        attention_bias = bool(hf.get("attention_bias", False))
        sliding_window = None
        if arch == "MistralForCausalLM":
            sliding_window = hf.get("sliding_window")
        elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and hf.get("use_sliding_window"):
            raise ConfigError(
                f"{source}: use_sliding_window=true (per-layer sliding windows) is not supported; "
                "set it to false, as every released Qwen2/2.5/3 checkpoint does")
        granite = arch == "GraniteForCausalLM"
        if hf.get("quantization_config"):
            run_options = {**run_options, "base_quant": "nf4",
                           "base_double_quant": _bnb_nf4_double_quant(hf["quantization_config"], source)}
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(hf),
            rope_scaling=_rope_scaling(hf, source),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and never an o bias; Mistral has none; the others
            # follow `attention_bias` for all four projections (as transformers does).
            qkv_bias=arch == "Qwen2ForCausalLM" or (attention_bias and arch != "MistralForCausalLM"),
            o_bias=attention_bias and arch not in ("MistralForCausalLM", "Qwen2ForCausalLM"),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=sliding_window,
            embedding_multiplier=hf.get("embedding_multiplier", 1.0) if granite else 1.0,
            residual_multiplier=hf.get("residual_multiplier", 1.0) if granite else 1.0,
            attention_multiplier=hf.get("attention_multiplier", 1.0) if granite else None,
            logits_scaling=hf.get("logits_scaling", 1.0) if granite else 1.0,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            hf_config=dict(hf),
            **run_options,
        )

    @classmethod
    def from_json_file(cls, path, **run_options) -> "ModelConfig":
        """From a config.json, local or gs://."""
        from etils import epath

        try:
            hf = json.loads(epath.Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(hf, source=str(path), **run_options)


def _bnb_nf4_double_quant(q: dict, source: str) -> bool:
    """Whether a quantized checkpoint's NF4 statistics are double-quantized; any quantization but
    bitsandbytes NF4 4-bit (stored as uint8) is refused by name."""
    method = str(q.get("quant_method", "unknown"))
    kind = method
    if method == "bitsandbytes":
        kind = ("bitsandbytes int8 (load_in_8bit)" if q.get("load_in_8bit") else
                f"bitsandbytes 4-bit {q.get('bnb_4bit_quant_type', 'fp4')}" if q.get("load_in_4bit") else
                "bitsandbytes (neither 4 nor 8 bit)")
        if q.get("load_in_4bit") and q.get("bnb_4bit_quant_type") == "nf4":
            if q.get("bnb_4bit_quant_storage", "uint8") != "uint8":
                kind = f"bitsandbytes NF4 stored as {q['bnb_4bit_quant_storage']}"
            else:
                return bool(q.get("bnb_4bit_use_double_quant", False))
    raise ConfigError(f"{source}: quantization {kind} is not supported; jaxsft reads full-precision "
                      "checkpoints and bitsandbytes NF4 4-bit ones (load_in_4bit, bnb_4bit_quant_type='nf4')")


def _rope_params(hf: dict) -> dict:
    # transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in rope_theta/rope_scaling.
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def _rope_theta(hf: dict) -> float:
    return float(_rope_params(hf).get("rope_theta", hf.get("rope_theta", 10000.0)))


def _rope_scaling(hf: dict, source: str) -> dict | None:
    params = dict(_rope_params(hf))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in params]
        if missing:
            raise ConfigError(f"{source}: rope type 'llama3' needs {missing}")
        return {"rope_type": "llama3", **{k: params[k] for k in keys}}
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": params["factor"]}
    raise ConfigError(
        f"{source}: rope type {rope_type!r} is not supported; jaxsft supports default, llama3, linear")
