"""GGUF (llama.cpp) files out: a model, or a LoRA run's adapters, written as llama.cpp's own
converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`) write them, with the `gguf` package:
its tensor names and layouts, the architecture's metadata (RoPE with llama3 scaling as
`rope_freqs.weight`), and the tokenizer (byte-level BPE: vocabulary, merges, pre-tokenizer;
SentencePiece BPE as Llama 2 and Mistral have it: vocabulary, scores, token types; both with special
ids and chat template). llama.cpp and Ollama then run the fine-tuned model with no conversion step.

Families: Llama, Mistral (llama.cpp runs it as `llama`, which has no sliding window: a warning
says so where the window is shorter than the context), Qwen2, Qwen3, Granite. Types: f32, f16,
bf16 and q8_0 (norms, biases and RoPE factors stay f32, as the converter keeps them). The file is
written under a temporary name and renamed, so a failed export leaves nothing at the path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile

import numpy as np
from etils import epath

from jaxsft import rundir
from jaxsft.models.config import ModelConfig
from jaxsft.models.gguf import GGUF_NAMES
from jaxsft.models.hf_io import hf_arrays, hf_tensors, save_tokenizer

log = logging.getLogger(__name__)

# HF architecture -> llama.cpp architecture (its convert_hf_to_gguf.py registrations).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "GraniteForCausalLM": "granite"}
TYPES = ("f32", "f16", "bf16", "q8_0")
NAMES = {**GGUF_NAMES, "q_norm": "blk.{i}.attn_q_norm.weight", "k_norm": "blk.{i}.attn_k_norm.weight"}

# llama.cpp names a byte-level BPE pre-tokenizer by the sha256 of the token ids of this text
# (convert_hf_to_gguf.py `get_vocab_base_pre`); the hashes of the tokenizers of our families.
PRE_TOKENIZER_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",  # Granite 3.x
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


class UnsupportedForGGUF(ValueError):
    """A model, tokenizer or type llama.cpp cannot run; the message names it."""


def check_supported(config: ModelConfig, gguf_type: str, tokenizer=None) -> str:
    """llama.cpp's architecture name for `config`, or UnsupportedForGGUF naming what it cannot run
    (the family, the RoPE scaling, the type, and with `tokenizer` its vocabulary's kind)."""
    if gguf_type not in TYPES:
        raise UnsupportedForGGUF(f"GGUF type {gguf_type!r} is not written; choose one of {', '.join(TYPES)}")
    if config.architecture not in ARCHITECTURES:
        raise UnsupportedForGGUF(f"{config.architecture} has no llama.cpp architecture here; GGUF export "
                                 f"supports {', '.join(sorted(ARCHITECTURES))}")
    rope = (config.rope_scaling or {}).get("rope_type", "default")
    if rope not in ("default", "linear", "llama3"):
        raise UnsupportedForGGUF(f"RoPE scaling {rope!r} is not written to GGUF (default, linear, llama3)")
    if tokenizer is not None:
        vocab_kind(tokenizer)
    return ARCHITECTURES[config.architecture]


def vocab_kind(tokenizer) -> tuple[str, str]:
    """llama.cpp's tokenizer model and pre-tokenizer for `tokenizer`: ("gpt2", its name) for a
    byte-level BPE, ("llama", "default") for a SentencePiece BPE (byte fallback, `▁` for spaces),
    or UnsupportedForGGUF."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"] if tokenizer.is_fast else {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama", "default"
    if model.get("type") != "BPE":
        raise UnsupportedForGGUF("only BPE tokenizers are written to GGUF (byte-level: Llama 3, Qwen, SmolLM, Granite; "
                                 "SentencePiece: Llama 2, Mistral); for another, run llama.cpp's convert_hf_to_gguf.py "
                                 "on the hf/ export")
    digest = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise UnsupportedForGGUF(f"the tokenizer's pre-tokenizer (llama.cpp hash {digest[:12]}...) is not one "
                                 "llama.cpp knows for the supported families")
    return "gpt2", PRE_TOKENIZERS[digest]


def _added_token_type(tokenizer, i: int, token: str):
    """The converter's type of an added token: CONTROL if special or `<|...|>`, else USER_DEFINED."""
    import gguf

    looks_special = token.startswith("<|") and token.endswith("|>")
    return gguf.TokenType.CONTROL if tokenizer.added_tokens_decoder[i].special or looks_special \
        else gguf.TokenType.USER_DEFINED


def _bpe_vocab(tokenizer, n_vocab: int) -> tuple[list[str], list]:
    """Tokens and types as convert_hf_to_gguf.py's `_set_vocab_gpt2` writes them."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if not added[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            types.append(_added_token_type(tokenizer, i, token))
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _sentencepiece_vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[float], list]:
    """Tokens, scores and types as the converter's `_set_vocab_sentencepiece` reads them from a
    `tokenizer.model`, here from the tokenizer.json that transformers converted it into (5.x saves no
    tokenizer.model). llama.cpp merges the adjacent pair whose joined token scores highest; transformers
    applies the lowest-ranked merge: a token's score is minus the rank of its first merge (tokens that
    no merge makes, single characters and bytes, are never a pair's join: their score is not used)."""
    import gguf

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    first_merge = {}
    for rank, merge in enumerate(model["merges"]):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_merge.setdefault(left + right, rank)
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        token = reverse.get(i, f"[PAD{i}]")
        if i not in reverse:
            kind = gguf.TokenType.UNUSED
        elif i == tokenizer.unk_token_id:
            kind = gguf.TokenType.UNKNOWN
        elif i in added:
            kind = _added_token_type(tokenizer, i, token)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(token)
        scores.append(-float(first_merge.get(token, len(model["merges"]))) if kind == gguf.TokenType.NORMAL else 0.0)
        types.append(kind)
    return tokens, scores, types


def _adds_space_prefix(tokenizer) -> bool:
    """Whether a SentencePiece tokenizer puts `▁` before the text (SentencePiece's add_dummy_prefix:
    a Metaspace pre-tokenizer whose prepend_scheme is not "never", or a Prepend normalizer)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    parts = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return bool(re.search(r'"type": "Prepend"|"prepend_scheme": "(always|first)"', parts))


def add_tokenizer(writer, tokenizer, c: ModelConfig) -> None:
    """The vocabulary as convert_hf_to_gguf.py writes it (`_set_vocab_gpt2` or
    `_set_vocab_sentencepiece`), then merges (byte-level BPE), special ids and the chat template with
    the `gguf` package's SpecialVocab (the converter's own), read from the files an export holds
    (tokenizer files and the config's ids). add_bos/add_eos are what the tokenizer does: SpecialVocab
    guesses them from tokenizer.json and, where it cannot, llama.cpp's defaults apply (a BOS for
    SentencePiece, which transformers 5's LlamaTokenizer does not add without `add_bos_token`)."""
    import gguf

    kind, pre = vocab_kind(tokenizer)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    if kind == "gpt2":
        tokens, types = _bpe_vocab(tokenizer, c.vocab_size)
        writer.add_token_list(tokens)
    else:
        tokens, scores, types = _sentencepiece_vocab(tokenizer, c.vocab_size)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_adds_space_prefix(tokenizer))
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        save_tokenizer(tokenizer, folder)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
                       "pad_token_id": c.pad_token_id}, f)
        special = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=c.vocab_size)
    with_special, without = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    special.add_special_token["bos"] = with_special[:1] == [tokenizer.bos_token_id] and without[:1] != with_special[:1]
    special.add_special_token["eos"] = with_special[-1:] == [tokenizer.eos_token_id] and without[-1:] != with_special[-1:]
    special.add_to_gguf(writer, quiet=True)


def llama3_rope_factors(c: ModelConfig) -> np.ndarray:
    """`rope_freqs.weight`: llama.cpp's form of llama3 RoPE scaling (convert_hf_to_gguf.py)."""
    s = c.rope_scaling
    freqs = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float32) / c.head_dim))
    low, high, old = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0), s.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(s.get("factor", 8.0))
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / s.get("factor", 8.0) + smooth))
    return np.asarray(factors, np.float32)


def add_hparams(writer, c: ModelConfig, arch: str) -> None:
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    if arch in ("llama", "granite"):
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(c.head_dim)
    if (c.rope_scaling or {}).get("rope_type") == "linear":
        import gguf
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_scaling["factor"])
    if arch == "granite":
        writer.add_attention_scale(c.attention_multiplier)
        writer.add_embedding_scale(c.embedding_multiplier)
        writer.add_residual_scale(c.residual_multiplier)
        writer.add_logit_scale(c.logits_scaling)


def ggml_type(name: str, shape: tuple[int, ...], gguf_type: str):
    """The converter's choice: 1-D tensors and norms f32, the rest `gguf_type` (q8_0 falls back
    to f16 for a row length its 32-value blocks do not divide)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return T.F32
    qtype = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[gguf_type]
    if qtype == T.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
        return T.F16
    return qtype


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`: each head's q/k rows from rotate-half to the
    interleaved pairs of llama.cpp's `llama` RoPE (the inverse of gguf.py's `_unpermute`)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_names(c: ModelConfig) -> dict[str, tuple[str, str, int | None]]:
    """HF tensor name -> (GGUF name, jaxsft weight name, heads to permute by or None)."""
    permuted = {"q": c.num_heads, "k": c.num_kv_heads, "q_bias": c.num_heads, "k_bias": c.num_kv_heads} \
        if ARCHITECTURES[c.architecture] in ("llama", "granite") else {}
    return {hf: (NAMES[name].format(i=layer), name, permuted.get(name))
            for hf, (name, layer, _, _) in hf_tensors(c).items()}


class _Writer:
    """A GGUFWriter whose file appears at `path` (local or gs://) only once complete."""

    def __init__(self, path: str, arch: str):
        import gguf

        self.path = str(path)
        fd, self.tmp = tempfile.mkstemp(suffix=".gguf.partial", dir=None if rundir.is_gcs(self.path)
                                        else os.path.dirname(os.path.abspath(self.path)))
        os.close(fd)
        self.writer = gguf.GGUFWriter(self.tmp, arch)

    def __enter__(self):
        return self.writer

    def __exit__(self, exc_type, *_):
        try:
            self.writer.close()
            if exc_type is None:
                if rundir.is_gcs(self.path):
                    epath.Path(self.path).write_bytes(epath.Path(self.tmp).read_bytes())
                else:
                    os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def _stream(writer, infos: list, arrays) -> None:
    """Tensor infos first, then the data tensor by tensor (never the whole model in memory)."""
    from gguf.quants import quant_shape_to_byte_shape, quantize
    import gguf

    T = gguf.GGMLQuantizationType
    for name, shape, qtype in infos:
        if qtype in (T.F32, T.F16):
            dtype = np.dtype(np.float32 if qtype == T.F32 else np.float16)
            writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        else:
            byte_shape = quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (_, shape, qtype), array in zip(infos, arrays):
        assert array.shape == tuple(shape), (array.shape, shape)
        writer.write_tensor_data(quantize(np.asarray(array, np.float32), qtype))


def save_gguf(model, path: str, tokenizer, gguf_type: str = "bf16", name: str | None = None) -> None:
    """Write `model` (a Decoder) and its tokenizer as one GGUF file. Every process must call it
    (gathering shards is collective); only process 0 writes."""
    import gguf
    import jax
    from flax import nnx

    c = model.config
    arch = check_supported(c, gguf_type, tokenizer)
    if c.sliding_window and c.sliding_window < c.max_position_embeddings:  # Mistral v0.1; so does the converter
        log.warning("llama.cpp's %s architecture has no sliding window: past %d tokens of context it attends "
                    "further back than the model does", arch, c.sliding_window)
    names = _gguf_names(c)
    infos = [(g, shape, ggml_type(g, shape, gguf_type)) for hf, (g, _, _) in names.items()
             for shape in [hf_tensors(c)[hf][3]]]
    extra = []
    if (c.rope_scaling or {}).get("rope_type") == "llama3":
        extra = [("rope_freqs.weight", llama3_rope_factors(c))]
        infos.append(("rope_freqs.weight", extra[0][1].shape, gguf.GGMLQuantizationType.F32))

    def arrays():
        for hf, array in hf_arrays(nnx.to_pure_dict(nnx.state(model, nnx.Param)), c, np.float32):
            _, _, heads = names[hf]
            yield _permute(array, heads) if heads else array
        for _, array in extra:
            yield array

    if jax.process_index() != 0:
        for _ in arrays():  # the gathers are collective
            pass
        return
    with _Writer(path, arch) as writer:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or "jaxsft model")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
        add_hparams(writer, c, arch)
        add_tokenizer(writer, tokenizer, c)
        _stream(writer, infos, arrays())


def save_gguf_adapter(model, path: str, name: str | None = None) -> None:
    """Write the LoRA adapters of `model` (a Decoder with adapters) as a llama.cpp LoRA adapter,
    as convert_lora_to_gguf.py does: `<weight>.lora_a` (r, in) and `.lora_b` (out, r) in float32,
    B's q/k rows permuted like the weights. llama.cpp scales every adapter by
    `adapter.lora.alpha / r` and knows no rsLoRA or per-module alpha, so the file's alpha is the
    most common module's scale times its rank, and a module with another scale has the ratio folded
    into its B: each module gets exactly the scale PEFT gives it. Every process must call it."""
    import gguf
    import jax
    from collections import Counter

    from jaxsft.models.hf_io import _gather

    spec, c = model.lora.spec, model.config
    arch = check_supported(c, "f32")
    modules = [(t, i) for t in spec.targets for i, r in enumerate(t.ranks) if r]
    scale = {(t.name, i): float(spec.scales(t)[i]) for t, i in modules}
    common = Counter((t.ranks[i], scale[t.name, i]) for t, i in modules).most_common(1)[0][0]
    alpha = common[0] * common[1]
    permuted = {"q": c.num_heads, "k": c.num_kv_heads} if arch in ("llama", "granite") else {}
    tensors = []
    for t in spec.targets:
        adapter = getattr(model.lora, t.name)
        a, b = np.asarray(_gather(adapter.a[...]), np.float32), np.asarray(_gather(adapter.b[...]), np.float32)
        for i, rank in enumerate(t.ranks):
            if not rank:
                continue
            lora_a = a[i, ..., :rank].reshape(-1, rank).T
            lora_b = b[i, :rank].reshape(rank, -1).T * (scale[t.name, i] / (alpha / rank))
            if t.name in permuted:
                lora_b = _permute(lora_b, permuted[t.name])
            base = NAMES[t.name].format(i=i)
            tensors += [(base + ".lora_a", np.ascontiguousarray(lora_a)), (base + ".lora_b", np.ascontiguousarray(lora_b))]
    if jax.process_index() != 0:
        return
    with _Writer(path, arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name or "jaxsft adapter")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, array in tensors:
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
