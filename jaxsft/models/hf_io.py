"""Hugging Face safetensors in and out.

The whole HF <-> jaxsft weight map is `WEIGHT_MAP` below: one row per weight, the same for every
supported family. Import streams tensor by tensor into the target sharding (each device shard
reads only the layers it holds); export writes one layer at a time, so neither holds two copies
of the model in host memory.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxsft import rundir
from jaxsft.models import nf4
from jaxsft.sharding import index_key
from jaxsft.models.config import ModelConfig
from jaxsft.models.decoder import Decoder, layer_shapes

logger = logging.getLogger(__name__)


# jaxsft name -> (HF name, how HF lays it out). `{i}` is the layer index.
#   vector: same layout; linear: HF (out, in) is our (in, out);
#   in_heads: HF (heads*head_dim, in) is our (in, heads, head_dim);
#   out_heads: HF (out, heads*head_dim) is our (heads, head_dim, out);
#   bias_heads: HF (heads*head_dim,) is our (heads, head_dim).
WEIGHT_MAP = {
    "embed": ("model.embed_tokens.weight", "vector"),
    "final_norm": ("model.norm.weight", "vector"),
    "lm_head": ("lm_head.weight", "linear"),
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "vector"),
    "q": ("model.layers.{i}.self_attn.q_proj.weight", "in_heads"),
    "k": ("model.layers.{i}.self_attn.k_proj.weight", "in_heads"),
    "v": ("model.layers.{i}.self_attn.v_proj.weight", "in_heads"),
    "o": ("model.layers.{i}.self_attn.o_proj.weight", "out_heads"),
    "q_bias": ("model.layers.{i}.self_attn.q_proj.bias", "bias_heads"),
    "k_bias": ("model.layers.{i}.self_attn.k_proj.bias", "bias_heads"),
    "v_bias": ("model.layers.{i}.self_attn.v_proj.bias", "bias_heads"),
    "o_bias": ("model.layers.{i}.self_attn.o_proj.bias", "vector"),
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", "vector"),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", "vector"),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "vector"),
    "gate": ("model.layers.{i}.mlp.gate_proj.weight", "linear"),
    "up": ("model.layers.{i}.mlp.up_proj.weight", "linear"),
    "down": ("model.layers.{i}.mlp.down_proj.weight", "linear"),
}

# Present in some checkpoints, never needed: transformers recomputes them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# What bitsandbytes saves beside a 4-bit weight `X.weight` (the packed bytes).
BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


def to_jaxsft(a: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    if layout in ("linear", "in_heads", "out_heads"):
        return a.T.reshape(shape)
    return a.reshape(shape)


def to_hf(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return a.T
    if layout == "in_heads":
        return a.reshape(a.shape[0], -1).T
    if layout == "out_heads":
        return a.reshape(-1, a.shape[-1]).T
    return a.reshape(-1) if layout == "bias_heads" else a


def hf_tensors(c: ModelConfig) -> dict[str, tuple[str, int | None, tuple[int, ...], tuple[int, ...]]]:
    """Every HF tensor the config needs: hf name -> (jaxsft name, layer or None, our shape, HF shape)."""
    out = {}

    def add(name, layer, shape):
        hf_name, layout = WEIGHT_MAP[name]
        hf_shape = to_hf(np.empty(shape, np.int8), layout).shape
        out[hf_name.format(i=layer)] = (name, layer, shape, hf_shape)

    add("embed", None, (c.vocab_size, c.hidden_size))
    add("final_norm", None, (c.hidden_size,))
    if not c.tie_word_embeddings:
        add("lm_head", None, (c.hidden_size, c.vocab_size))
    for name, (shape, _) in layer_shapes(c).items():
        for i in range(c.num_layers):
            add(name, i, shape)
    return out


def model_param_paths(c: ModelConfig) -> dict[str, tuple]:
    """jaxsft name -> path of that Param in the Decoder's state."""
    paths = {"embed": ("embed",), "final_norm": ("final_norm",)}
    if not c.tie_word_embeddings:
        paths["lm_head"] = ("lm_head",)
    for name in layer_shapes(c):
        paths[name] = ("layers", name)
    return paths


class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message names the file and tensors."""


def local_dir(path: str | os.PathLike) -> str:
    """A local folder with the model's files: `path` itself, or a cached copy of a gs:// folder.

    A cached file is downloaded again when the object's size or modification time in the bucket
    changed since it was copied (a model re-uploaded to the same path is never read stale).
    """
    path = str(path)
    if not rundir.is_gcs(path):
        return path
    src = epath.Path(path)
    cache = os.path.join(
        os.environ.get("JAXSFT_CACHE", os.path.expanduser("~/.cache/jaxsft")), "gcs",
        path.removeprefix("gs://").rstrip("/"))
    os.makedirs(cache, exist_ok=True)
    record_path = cache + ".copied_from.json"
    copied = {}
    if os.path.exists(record_path):
        with open(record_path) as f:
            copied = json.load(f)
    for f in src.iterdir():
        if not f.is_file():
            continue
        stat = f.stat()
        version = [stat.length, stat.mtime]
        dst = os.path.join(cache, f.name)
        if copied.get(f.name) == version and os.path.exists(dst):
            continue
        # Copy to a temporary name first so an interrupted download is never taken as complete.
        tmp = f"{dst}.partial{os.getpid()}"
        with f.open("rb") as r, open(tmp, "wb") as w:
            shutil.copyfileobj(r, w, length=64 << 20)
        os.replace(tmp, dst)
        copied[f.name] = version
        with open(f"{record_path}.partial{os.getpid()}", "w") as w:
            json.dump(copied, w)
        os.replace(f"{record_path}.partial{os.getpid()}", record_path)
    return cache


def _tensor_files(folder: str) -> dict[str, str]:
    """HF tensor name -> safetensors file, from the index or the single file."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(folder, v))})
        if missing:
            raise CheckpointError(
                f"{index} lists shard files that are not in {folder}: {', '.join(missing)}. "
                "Copy the complete model folder again.")
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    if os.path.exists(single):
        with safe_open(single, framework="numpy") as f:
            return {k: single for k in f.keys()}
    raise CheckpointError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (PyTorch .bin files are "
        "not read; re-save the model with save_pretrained(safe_serialization=True))")


def hf_model_config(folder: str, **run_options) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder, local or gs:// (config.json and
    generation_config.json, read where they are: nothing else is copied)."""
    root = epath.Path(folder)
    if not (root / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json; is this a Hugging Face model folder?")
    config = ModelConfig.from_json_file(str(root / "config.json"), **run_options)
    if (root / "generation_config.json").exists():
        config = config.replace(hf_generation_config=json.loads((root / "generation_config.json").read_text()))
    return config


def load_hf(path: str | os.PathLike, dtype=jnp.float32, compute_dtype=jnp.bfloat16, mesh=None,
            rules=None, on_quantize=None, **run_options) -> Decoder:
    """Load a Hugging Face model folder (local or gs://) into a sharded Decoder.

    dtype: parameter dtype; compute_dtype: matmul dtype; mesh/rules: where the parameters go
    (default: the first device); on_quantize: `build_model`'s; run_options: ModelConfig run-time
    fields (remat, attention). Every kind of model source is dispatched by `jaxsft.models.loading.load_model`.
    """
    folder = local_dir(path)
    config = hf_model_config(folder, **run_options)
    files = _tensor_files(folder)
    _check_tensors(folder, files, hf_tensors(config), config)
    handles = {f: safe_open(f, framework="numpy") for f in set(files.values())}
    read_bytes = 0

    def read(name, box=None):
        nonlocal read_bytes
        handle = handles[files[name]]
        value = handle.get_tensor(name) if box is None else handle.get_slice(name)[box]
        read_bytes += value.nbytes
        return value
    read_nf4 = None
    if "quantization_config" in config.hf_config:  # saved 4-bit by transformers + bitsandbytes
        read_nf4 = functools.partial(_read_bnb_nf4, read, files, config)
    model = build_model(config, read, dtype, compute_dtype, mesh, rules, read_nf4, on_quantize, read_box=read)
    total = sum(os.path.getsize(f) for f in handles)
    # On a pod each host should read only its devices' share: the figure to check when loading is slow.
    logger.info("process %d read %.1f MB of the checkpoint's %.1f MB", jax.process_index(), read_bytes / 1e6, total / 1e6)
    return model


def _read_bnb_nf4(read, files, config: ModelConfig, hf_name: str) -> dict[str, np.ndarray]:
    """One weight of a bitsandbytes 4-bit checkpoint as `nf4.quantize`'s arrays (no full-precision
    copy is made); a weight the checkpoint kept in full precision is quantized here."""
    state_name = hf_name + ".quant_state.bitsandbytes__nf4"
    if state_name not in files:
        return nf4.quantize(read(hf_name), config.base_double_quant)
    state = json.loads(bytes(read(state_name).tolist()).decode())
    quant_map = read(hf_name + ".quant_map")
    out_features, in_features = state["shape"]
    if state.get("blocksize") != nf4.BLOCK or not np.array_equal(quant_map, nf4.NF4_CODE) or (
            "nested_absmax" in state and state.get("nested_blocksize") != nf4.NESTED_BLOCK):
        raise CheckpointError(f"{hf_name}: bitsandbytes 4-bit with blocksize {state.get('blocksize')}, "
                              f"nested blocksize {state.get('nested_blocksize')} or a quant_map other than "
                              f"NF4's; jaxsft reads NF4 in blocks of {nf4.BLOCK} (nested {nf4.NESTED_BLOCK})")
    q = {"packed": read(hf_name).reshape(out_features, in_features // 2),
         "absmax": read(hf_name + ".absmax").reshape(out_features, -1)}
    if config.base_double_quant:
        q.update(nested_absmax=read(hf_name + ".nested_absmax"), offset=np.float32(state["nested_offset"]),
                 nested_code=read(hf_name + ".nested_quant_map"))
    return nf4.stored(q)


def build_model(config: ModelConfig, read_hf_tensor, dtype, compute_dtype, mesh=None, rules=None,
                read_nf4=None, on_quantize=None, read_box=None) -> Decoder:
    """A Decoder whose parameters are read with `read_hf_tensor(hf_name) -> np.ndarray` (HF layout),
    straight into their target sharding: each process reads each tensor its devices hold once, and
    with `read_box(hf_name, slices)` (a reader that can read part of a tensor) only the part of it
    they hold.
    With `config.base_quant='nf4'` the linear projections are quantized as they are read, one layer
    at a time, or come from `read_nf4(hf_name)` (a checkpoint stored as NF4). `on_quantize(hf_name,
    w, nf4_arrays)` sees each weight this quantizes, in full precision (LoftQ's initialisation)."""
    from jaxsft.sharding import param_shardings

    abstract = nnx.eval_shape(lambda: Decoder(config, param_dtype=dtype, compute_dtype=compute_dtype))
    graphdef, state = nnx.split(abstract)
    shardings = nnx.to_pure_dict(param_shardings(state, mesh, rules))
    hf_names = {}
    for hf_name, (name, layer, _, _) in hf_tensors(config).items():
        hf_names.setdefault(name, {})[layer] = hf_name

    if read_box is None:
        def read_box(hf_name, box):
            return read_hf_tensor(hf_name)[box]

    pure = nnx.to_pure_dict(state)
    if config.base_quant:
        if read_nf4 is not None and on_quantize is not None:
            raise CheckpointError("LoftQ (lora.init='loftq') needs the full-precision weights: this checkpoint "
                                  "is stored in 4-bit; give its full-precision model as model.path")

        def quantize(hf_name):
            w = read_hf_tensor(hf_name)
            q = nf4.quantize(w, config.base_double_quant)
            if on_quantize is not None:
                on_quantize(hf_name, w, q)
            return q
        # Each part of an NF4 weight (packed, absmax, ...) asks for every layer: quantize each once.
        read_nf4 = functools.lru_cache(maxsize=config.num_layers + 1)(read_nf4 or quantize)
    for name, path_in_state in model_param_paths(config).items():
        leaf = _get(pure, path_in_state)
        layers = hf_names[name]
        sharding = _get(shardings, path_in_state)
        if isinstance(leaf, dict):  # an NF4 weight: its arrays, each stacked over the layers
            for key, part in leaf.items():
                def read_part(i, box, key=key, part=part, layers=layers):
                    return np.asarray(read_nf4(layers[i])[key][box], part.dtype)
                leaf[key] = _sharded(part, sharding[key], read_part, stacked=True)
            read_nf4.cache_clear()
        else:
            def read_part(i, box, name=name, leaf=leaf, layers=layers):
                shape = leaf.shape[1:] if i is not None else leaf.shape
                part = _read_our_box(functools.partial(read_box, layers[i]), WEIGHT_MAP[name][1], shape, box)
                return np.asarray(part, dtype=leaf.dtype)
            _set(pure, path_in_state, _sharded(leaf, sharding, read_part, stacked=None not in layers))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _read_our_box(read_hf_box, layout: str, shape: tuple[int, ...], box: tuple[slice, ...]) -> np.ndarray:
    """`box` (a slice per dimension of our `shape`) of a tensor in our layout, reading only the HF
    rows and columns that hold it (`read_hf_box(hf_slices)`); heads are read whole."""
    def rows(heads, head_dim):
        return slice(heads.start * head_dim, heads.stop * head_dim)
    if layout == "linear":
        return read_hf_box((box[1], box[0])).T
    if layout == "in_heads":
        (inputs, heads, dims), head_dim = box, shape[2]
        return read_hf_box((rows(heads, head_dim), inputs)).T.reshape(
            inputs.stop - inputs.start, heads.stop - heads.start, head_dim)[:, :, dims]
    if layout == "out_heads":
        (heads, dims, outputs), head_dim = box, shape[1]
        return read_hf_box((outputs, rows(heads, head_dim))).T.reshape(
            heads.stop - heads.start, head_dim, outputs.stop - outputs.start)[:, dims]
    if layout == "bias_heads":
        (heads, dims), head_dim = box, shape[1]
        return read_hf_box((rows(heads, head_dim),)).reshape(-1, head_dim)[:, dims]
    return read_hf_box(box)  # vector: the same layout


def _sharded(leaf, sharding, read_part, stacked: bool) -> jax.Array:
    """The global array `leaf` (shape, dtype) in `sharding`, from `read_part(layer, box)` (`box`: a
    slice per dimension after the layer axis of a weight stacked over layers (`stacked`; `layer` is
    None otherwise), in our layout). Each layer this process's devices hold is read once (not once
    per device, as `jax.make_array_from_callback` would), only the box covering their shards, and
    sliced for each of them."""
    indices = sharding.addressable_devices_indices_map(leaf.shape)
    # Replicas share one buffer; slices with explicit bounds.
    distinct = {index_key(index): tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, leaf.shape))
                for index in indices.values()}
    inner = 1 if stacked else 0
    box = tuple(slice(min(ix[d].start for ix in distinct.values()), max(ix[d].stop for ix in distinct.values()))
                for d in range(inner, leaf.ndim))
    shards = {k: np.empty([s.stop - s.start for s in index], leaf.dtype) for k, index in distinct.items()}
    layers = sorted({i for index in distinct.values() for i in range(index[0].start, index[0].stop)}) if stacked else [None]
    for i in layers:
        part = read_part(i, box)
        for k, index in distinct.items():
            local = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(index[inner:], box))
            if not stacked:
                shards[k] = part[local]
            elif index[0].start <= i < index[0].stop:
                shards[k][i - index[0].start] = part[local]
    return jax.make_array_from_single_device_arrays(
        leaf.shape, sharding, [jax.device_put(shards[index_key(index)], device) for device, index in indices.items()])


def _check_tensors(folder, files, expected, config):
    problems = []
    missing = [k for k in expected if k not in files]
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    quantized = "quantization_config" in config.hf_config
    unexpected = [k for k in files if k not in expected and not k.endswith(IGNORED_SUFFIXES)
                  and not (k == "lm_head.weight" and config.tie_word_embeddings)
                  and not (quantized and k.endswith(BNB_SUFFIXES))]
    if unexpected:
        problems.append(f"unexpected tensors: {_short(unexpected)}")
    for name, file in sorted(files.items()):
        if name in expected:
            with safe_open(file, framework="numpy") as f:
                shape = tuple(f.get_slice(name).get_shape())
            want = expected[name][3]
            if f"{name}.quant_state.bitsandbytes__nf4" in files:  # bitsandbytes' packed bytes
                want = (int(np.prod(want)) // 2, 1)
            if shape != want:
                problems.append(
                    f"{name} in {os.path.basename(file)} has shape {shape}, config.json implies {want}")
    if problems:
        raise CheckpointError(
            f"{folder} does not match its config.json ({config.architecture}):\n  " + "\n  ".join(problems))


def _short(names, most=8):
    names = sorted(names)
    return ", ".join(names[:most]) + (f" ... and {len(names) - most} more" if len(names) > most else "")


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def hf_config_dict(c: ModelConfig, dtype) -> dict[str, Any]:
    """config.json for export: the original keys, with ours laid over them."""
    hf = dict(c.hf_config)
    hf.update({
        "architectures": [c.architecture],
        "model_type": {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                       "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                       "GraniteForCausalLM": "granite"}[c.architecture],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "dtype": jnp.dtype(dtype).name,
    })
    hf.pop("torch_dtype", None)
    # Both spellings: transformers 5 reads `rope_parameters`; transformers 4.x, vLLM and llama.cpp's
    # converter read `rope_theta` and `rope_scaling` (without them they silently use theta 10000).
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})}
    hf["rope_theta"] = c.rope_theta
    hf["rope_scaling"] = dict(c.rope_scaling) if c.rope_scaling else None
    return hf


def hf_arrays(params, config: ModelConfig, dtype=None):
    """Yield (HF name, numpy array in HF layout) for a pure-dict tree shaped like the Decoder's
    parameters (the parameters themselves, or their gradients), one tensor at a time."""
    paths = model_param_paths(config)
    for hf_name, (name, layer, _, _) in hf_tensors(config).items():
        value = _get(params, paths[name])
        value = value if layer is None else value[layer]
        if dtype is not None:
            value = value.astype(dtype)
        yield hf_name, np.ascontiguousarray(to_hf(np.asarray(_gather(value)), WEIGHT_MAP[name][1]))


# tokenizer_config.json keys transformers 5 writes that no reader needs: `backend` and the
# run-time `is_local` / `local_files_only` (how the files were loaded, not what they are).
RUNTIME_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only")


def save_tokenizer(tokenizer, folder: str) -> None:
    """`tokenizer.save_pretrained(folder)`, in the form transformers 4.57 and 5.x both read (and with
    them llama.cpp's converter, which pins 4.x): 5.x's generic `TokenizersBackend` class is written as
    `PreTrainedTokenizerFast` (the same tokenizer.json), and its list of `extra_special_tokens` as
    `additional_special_tokens` (4.x reads `extra_special_tokens` as a dict of named tokens).

    A SentencePiece tokenizer (Llama 2, Mistral) keeps what 5.x's save drops: `legacy` (5.x rebuilds
    the pre-tokenizer from it on load; without it a `legacy` tokenizer comes back putting `▁` before
    the text only at its start, not after special tokens too: other token ids) and its
    `tokenizer.model` (llama.cpp's converter reads the pieces' scores from it; without it, it gives
    every piece the same score and tokenizes differently)."""
    tokenizer.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    for key in RUNTIME_TOKENIZER_KEYS:
        config.pop(key, None)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    if isinstance(getattr(tokenizer, "legacy", None), bool):
        config["legacy"] = tokenizer.legacy
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"] if tokenizer.is_fast else {}
    vocab_file = getattr(tokenizer, "vocab_file", None) or ""
    if model.get("byte_fallback") and os.path.basename(vocab_file) == "tokenizer.model" \
            and os.path.isfile(vocab_file) and not os.path.exists(os.path.join(folder, "tokenizer.model")):
        shutil.copyfile(vocab_file, os.path.join(folder, "tokenizer.model"))  # (Llama 3's is tiktoken's: no byte fallback)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def save_hf(model: Decoder, out_dir: str | os.PathLike, tokenizer=None, dtype=jnp.bfloat16,
            max_shard_bytes: int = 5 << 30, name: str | None = None, model_card: str | None = None) -> None:
    """Write a Hugging Face folder: safetensors (sharded with an index above max_shard_bytes),
    config.json, generation_config.json and, if given, the tokenizer files (`save_tokenizer`) and a
    model card (README.md). `name` becomes config.json's `_name_or_path`, as in folders that
    transformers saves (llama.cpp's converter names the model after it).

    Every process must call it (gathering shards is collective); only process 0 writes.
    """
    c = model.config
    out_dir = str(out_dir)
    tensors = hf_tensors(c)
    itemsize = jnp.dtype(dtype).itemsize
    shard_of, sizes = {}, [0]
    for hf_name, (_, _, shape, _) in tensors.items():
        nbytes = int(np.prod(shape)) * itemsize
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            sizes.append(0)
        shard_of[hf_name] = len(sizes) - 1
        sizes[-1] += nbytes
    if len(sizes) == 1:
        file_names = ["model.safetensors"]
    else:
        file_names = [f"model-{i + 1:05d}-of-{len(sizes):05d}.safetensors" for i in range(len(sizes))]

    writer = jax.process_index() == 0
    local = tempfile.mkdtemp(prefix="jaxsft-export-") if rundir.is_gcs(out_dir) else out_dir
    if writer:
        os.makedirs(local, exist_ok=True)
    pending, current = {}, 0
    for hf_name, array in hf_arrays(nnx.to_pure_dict(nnx.state(model, nnx.Param)), c, dtype):
        if shard_of[hf_name] != current:
            if writer:
                save_file(pending, os.path.join(local, file_names[current]), metadata={"format": "pt"})
            pending, current = {}, shard_of[hf_name]
        pending[hf_name] = array
    if not writer:
        return
    save_file(pending, os.path.join(local, file_names[current]), metadata={"format": "pt"})
    if len(file_names) > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {k: file_names[i] for k, i in shard_of.items()}}
        with open(os.path.join(local, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    config = hf_config_dict(c, dtype)
    if name:
        config["_name_or_path"] = name
    with open(os.path.join(local, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    generation = dict(c.hf_generation_config) or {
        k: v for k, v in (("bos_token_id", c.bos_token_id), ("eos_token_id", c.eos_token_id),
                          ("pad_token_id", c.pad_token_id)) if v is not None}
    with open(os.path.join(local, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    if tokenizer is not None:
        save_tokenizer(tokenizer, local)
    if model_card is not None:
        with open(os.path.join(local, "README.md"), "w") as f:
            f.write(model_card)
    if local != out_dir:
        rundir.copy_folder(local, out_dir)
        shutil.rmtree(local)


def _gather(x: jax.Array):
    if x.is_fully_addressable:
        return jax.device_get(x)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(x, tiled=True)
