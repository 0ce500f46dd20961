"""A run's exports read by their real consumers: transformers 5.x and 4.57 (tokenizer, config,
chat template, model card), llama.cpp itself through llama-cpp-python (our GGUF, llama.cpp's own
converter's GGUF of our hf/ export, the LoRA adapter GGUF) against transformers and PEFT.

One tiny LoRA run (rsLoRA, so a wrong adapter scale shows) on a random Qwen2-shaped base with the
real Qwen2.5 tokenizer is shared by every test. The transformers 4.57 check runs where
JAXSFT_TRANSFORMERS4_PYTHON names a 4.57 interpreter (.ci/transformers4). llama-cpp-python comes
with the `test` extra (a missing one fails these tests); llama.cpp's converter is read from the
source of the same version (`llama_cpp_src`).
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pytest
import torch
import transformers as tf
from etils import epath

from gcs_server import gcs_bucket  # noqa: F401  (the session fixture)
from tests.conftest import ASSETS

CONFIGS = os.path.join(os.path.dirname(ASSETS), "..", "configs", "assets")
QWEN_TOKENIZER = str(ASSETS / "tokenizers" / "qwen2.5-0.5b-instruct")
TRANSFORMERS4 = os.environ.get("JAXSFT_TRANSFORMERS4_PYTHON")


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version; without it the llama.cpp tests fail, never skip."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        pass
    pytest.fail("llama-cpp-python is not installed: it is the judge of the GGUF exports, in the `test` "
                "extra (pip install -e '.[test]' builds llama.cpp from source: 27 min on 2 busy cores)", pytrace=False)


@pytest.fixture(scope="session")
def llama_cpp_src():
    """llama.cpp's source tree (convert_hf_to_gguf.py) of the installed llama-cpp-python's version:
    LLAMA_CPP_SRC where set, else that version's sdist, fetched from PyPI once into ~/.cache/jaxsft."""
    if os.environ.get("LLAMA_CPP_SRC"):
        return os.environ["LLAMA_CPP_SRC"]
    version = llama_cpp_version()
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxsft")
    src = os.path.join(cache, f"llama_cpp_python-{version}", "vendor", "llama.cpp")
    if not os.path.exists(os.path.join(src, "convert_hf_to_gguf.py")):
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            fetch = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                                    "llama-cpp-python", "-d", tmp, f"llama-cpp-python=={version}"],
                                   capture_output=True, text=True)
            assert fetch.returncode == 0, f"fetching llama.cpp's converter from PyPI failed (or set " \
                                          f"LLAMA_CPP_SRC to a llama.cpp source tree): {fetch.stderr[-2000:]}"
            with tarfile.open(os.path.join(tmp, f"llama_cpp_python-{version}.tar.gz")) as sdist:
                sdist.extractall(tmp, filter="data")
            os.replace(os.path.join(tmp, f"llama_cpp_python-{version}"), os.path.dirname(os.path.dirname(src)))
    return src


def prompts(n=5):
    """Real chat prompts: GSM8K questions, the first with a system message."""
    with open(ASSETS / "data" / "gsm8k" / "test.jsonl") as f:
        questions = [json.loads(line)["question"] for line in f.readlines()[:n]]
    chats = [[{"role": "user", "content": q}] for q in questions]
    chats[0].insert(0, {"role": "system", "content": "Answer step by step. Ünïcödé, 你好, 🦙."})
    return chats


def render(tokenizer, chat) -> list[int]:
    """The chat template's token ids (transformers 5 returns a BatchEncoding, 4.x a list)."""
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    return ids if isinstance(ids, list) else ids["input_ids"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random Qwen2-shaped model (2 layers, the real 152k vocabulary) saved by transformers 5."""
    path = tmp_path_factory.mktemp("base")
    with open(os.path.join(CONFIGS, "tiny-qwen2", "config.json")) as f:
        config = tf.Qwen2Config(**{**json.load(f), "num_hidden_layers": 2})
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random norms, so a missing or swapped one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tf.AutoTokenizer.from_pretrained(QWEN_TOKENIZER).save_pretrained(path)
    return str(path)


RUN_CONFIG = """
from jaxsft.train import default_config

def get_config():
    c = default_config()
    c.model.path = {base!r}
    c.model.compute_dtype = "float32"
    c.model.remat = "none"
    c.data.sources = [{{"path": {train!r}, "format": "gsm8k"}}]
    c.data.max_seq_len = 128
    c.data.global_batch_size = 4
    c.data.micro_batch_rows = 2
    c.data.cache_dir = {cache!r}
    c.optim.learning_rate = 2e-2
    {method}
    c.train.num_steps = 3
    c.train.eval_at_start = False
    c.train.progress = False
    c.train.export_hf = True
    c.train.export_dtype = "float32"
    c.train.export_gguf = "f32"
    c.train.output_dir = {out!r}
    return c
"""


def train(tmp, base, name, method):
    """3 steps on 12 GSM8K problems by the CLI, with hf/ (float32) and GGUF (f32) exports at the end."""
    data = tmp / "train.jsonl"
    with open(ASSETS / "data" / "gsm8k" / "train.jsonl") as f:
        data.write_text("".join(f.readlines()[:12]))
    out = str(tmp / name)
    (tmp / "config.py").write_text(RUN_CONFIG.format(base=base, train=str(data), cache=str(tmp / "cache"), out=out,
                                                     method=method))
    result = cli("jaxsft.train", "--config", str(tmp / "config.py"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def cli(*args, **env):
    """`python -m ...` on one CPU device (the suite's 8 simulated ones multiply the logits' memory)."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd(), "XLA_FLAGS": "", **env})


@pytest.fixture(scope="module")
def run_dir(base, tmp_path_factory):
    """rsLoRA on the Qwen2 base: hf/, adapter/, model.gguf (the merged model), adapter.gguf."""
    return train(tmp_path_factory.mktemp("run"), base, "gsm8k_lora",
                 "c.lora.r, c.lora.alpha, c.lora.use_rslora = 8, 16.0, True")


def test_export_files(run_dir):
    """What transformers 4.x cannot read is gone, the model card and name are there, and
    transformers 5 renders the chat template into the base tokenizer's ids."""
    hf = os.path.join(run_dir, "hf")
    tok_config = json.load(open(os.path.join(hf, "tokenizer_config.json")))
    assert not {"backend", "is_local", "local_files_only"} & set(tok_config)
    assert tok_config["tokenizer_class"] == "Qwen2Tokenizer"
    assert "extra_special_tokens" not in tok_config and "<|im_start|>" in tok_config["additional_special_tokens"]
    assert json.load(open(os.path.join(hf, "config.json")))["_name_or_path"] == "gsm8k_lora"
    card = open(os.path.join(hf, "README.md")).read()
    assert card.startswith("---\nlibrary_name: transformers\nmodel_name: gsm8k_lora\n")
    assert "LoRA (r=8, alpha=16.0, rsLoRA; merged into the weights)" in card
    assert "train.jsonl`" in card and "- steps: 3" in card and "- train loss (last step): " in card
    ours, ref = tf.AutoTokenizer.from_pretrained(hf), tf.AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    for chat in prompts():
        assert render(ours, chat) == render(ref, chat)


TRANSFORMERS4_SCRIPT = """
import json, sys, transformers as tf
folders, chats = json.loads(sys.argv[1])
out = {"version": tf.__version__}
for folder in folders:
    tok = tf.AutoTokenizer.from_pretrained(folder)
    rendered = [tok.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    out[folder] = [r if isinstance(r, list) else r["input_ids"] for r in rendered]
print(json.dumps(out))
"""


@pytest.mark.skipif(not TRANSFORMERS4, reason="needs JAXSFT_TRANSFORMERS4_PYTHON (.ci/transformers4)")
def test_exports_read_under_transformers4(run_dir, llama_cpp_src, tmp_path):
    """Tokenizers written by transformers 5 (our export's, Llama 3.2's, SmolLM2's from its GGUF)
    give transformers 4.57 the same chat-template ids as 5.x; 4.57 loads the exported model and its
    generation config; llama.cpp's converter, under 4.57 as its requirements pin, converts hf/."""
    from jaxsft.models import load_tokenizer
    from jaxsft.models.gguf import smollm2_path
    from jaxsft.models.hf_io import save_tokenizer

    folders = [os.path.join(run_dir, "hf")]
    for name, source in (("llama", str(ASSETS / "tokenizers" / "llama-3.2-1b-instruct")), ("smollm2", smollm2_path())):
        save_tokenizer(load_tokenizer(source), str(tmp_path / name))
        folders.append(str(tmp_path / name))
    chats = prompts()
    result = subprocess.run([TRANSFORMERS4, "-c", TRANSFORMERS4_SCRIPT, json.dumps([folders, chats])],
                            capture_output=True, text=True, check=True)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["version"].startswith("4.57")
    for folder in folders:
        tok = tf.AutoTokenizer.from_pretrained(folder)
        assert got[folder] == [render(tok, c) for c in chats], folder
    load = ("import sys, transformers as tf; m = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "g = tf.GenerationConfig.from_pretrained(sys.argv[1]); print(type(m).__name__, g.eos_token_id)")
    out = subprocess.run([TRANSFORMERS4, "-c", load, folders[0]], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["Qwen2ForCausalLM", "151645"]
    subprocess.run([TRANSFORMERS4, os.path.join(llama_cpp_src, "convert_hf_to_gguf.py"), folders[0],
                    "--outtype", "f32", "--outfile", str(tmp_path / "converted.gguf")], check=True)
    assert (tmp_path / "converted.gguf").stat().st_size > 0


def test_gguf_refusals_leave_nothing(run_dir, tmp_path, monkeypatch):
    """An unknown type is refused with one line and exit status 2; a write that fails once the
    file is open leaves nothing at the path, not even its temporary file."""
    out = tmp_path / "m.gguf"
    result = cli("jaxsft.export", "--checkpoint", run_dir, "--gguf", str(out), "--gguf-type", "q4_k")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "error: GGUF type 'q4_k' is not written; choose one of f32, f16, bf16, q8_0"
    assert not out.exists()

    import jax.numpy as jnp

    import jaxsft
    from jaxsft.models import gguf_export

    model = jaxsft.load_model(os.path.join(run_dir, "hf"), dtype=jnp.float32, compute_dtype=jnp.float32)
    tokenizer = tf.AutoTokenizer.from_pretrained(os.path.join(run_dir, "hf"))

    def disk_full(*args):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_export, "add_tokenizer", disk_full)
    with pytest.raises(OSError, match="disk full"):
        gguf_export.save_gguf(model, str(out), tokenizer, "f16")
    assert os.listdir(tmp_path) == []


def test_gguf_refuses_tokenizers_llama_cpp_cannot_run(spm_base, tmp_path):
    """A tokenizer with no llama.cpp vocabulary type (WordLevel), or a byte-level BPE whose
    pre-tokenizer llama.cpp does not know, is refused with one line before the file is opened."""
    import jax.numpy as jnp
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    import jaxsft
    from jaxsft.models.gguf_export import UnsupportedForGGUF, save_gguf

    with open(ASSETS / "data" / "gsm8k" / "train.jsonl") as f:
        texts = [json.loads(line)["question"] for line in f.readlines()[:200]]
    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    byte_level.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = jaxsft.load_model(spm_base, dtype=jnp.float32)
    out = tmp_path / "m.gguf"
    for tokenizer, message in ((word_level, r"^only BPE tokenizers are written to GGUF \(byte-level: .*SentencePiece: "
                                            r"Llama 2, Mistral\); for another, run llama.cpp's convert_hf_to_gguf.py"),
                               (byte_level, r"^the tokenizer's pre-tokenizer \(llama.cpp hash [0-9a-f]{12}\.\.\.\) is "
                                            r"not one llama.cpp knows")):
        with pytest.raises(UnsupportedForGGUF, match=message) as refused:
            save_gguf(model, str(out), tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer), "f16")
        assert "\n" not in str(refused.value)
    assert os.listdir(tmp_path) == []


# ---- llama.cpp itself -------------------------------------------------------------------------

def llama(path, **kw):
    """llama.cpp with a float32 KV cache (its default f16 cache alone costs ~2e-4 relative)."""
    llama_cpp_version()
    from llama_cpp import GGML_TYPE_F32, Llama

    return Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False,
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **kw)


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[:len(ids)], np.float32)


def llama_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def torch_run(model, ids, n=8):
    """transformers' logits over `ids` and its n greedy tokens after them (with its KV cache)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits, past, tokens = out.logits[0].numpy(), out.past_key_values, [int(out.logits[0, -1].argmax())]
        for _ in range(n - 1):
            out = model(torch.tensor([tokens[-1:]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
    return logits, tokens


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def chat_ids(run_dir):
    tok = tf.AutoTokenizer.from_pretrained(os.path.join(run_dir, "hf"))
    return tok, [render(tok, c) for c in prompts()]


@pytest.mark.slow
def test_gguf_runs_in_llama_cpp_like_transformers(run_dir, chat_ids, llama_cpp_src, tmp_path):
    """llama.cpp on our f32 GGUF and on its own converter's GGUF of hf/: transformers' logits
    (<= 1e-4 relative) and greedy tokens, its tokenization of the rendered prompts, the chat
    template; our q8_0 GGUF (the CLI's) keeps the greedy tokens on most prompts. model.gguf is
    written after hf/ from the same merged model: merging a LoRA run twice must not add the
    adapters twice (it did)."""
    tok, ids = chat_ids
    hf = tf.AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "hf"), dtype=torch.float32).eval()
    reference = [torch_run(hf, prompt) for prompt in ids]
    files = {"ours": os.path.join(run_dir, "model.gguf"), "converter": str(tmp_path / "converted.gguf")}
    subprocess.run([sys.executable, os.path.join(llama_cpp_src, "convert_hf_to_gguf.py"),
                    os.path.join(run_dir, "hf"), "--outtype", "f32", "--outfile", files["converter"]],
                   check=True, capture_output=True)
    for label, path in files.items():
        llm = llama(path)
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template, label
        for prompt, (logits, greedy) in zip(ids, reference):
            assert rel_err(llama_logits(llm, prompt), logits) <= 1e-4, label
            assert llama_greedy(llm, prompt, 8) == greedy, label
            assert llm.tokenize(tok.decode(prompt).encode(), add_bos=False, special=True) == prompt, label

    q8 = tmp_path / "q8.gguf"
    result = cli("jaxsft.export", "--checkpoint", run_dir, "--gguf", str(q8), "--gguf-type", "q8_0")
    assert result.returncode == 0, result.stderr[-3000:]
    llm = llama(q8)
    same = sum(llama_greedy(llm, prompt, 8) == greedy for prompt, (_, greedy) in zip(ids, reference))
    print(f"q8_0: the same 8 greedy tokens as transformers on {same}/{len(ids)} prompts")
    assert same >= len(ids) - 1


@pytest.mark.slow
def test_gguf_adapter_applies_like_peft(base, run_dir, chat_ids, tmp_path):
    """llama.cpp with adapter.gguf on the base model's GGUF gives PEFT's logits (<= 1e-4 relative,
    while the adapter moves them far more) and greedy tokens: rsLoRA's alpha / sqrt(r) is folded in."""
    import jax.numpy as jnp
    from peft import PeftModel

    import jaxsft
    from jaxsft.models.gguf_export import save_gguf

    base_gguf = tmp_path / "base.gguf"
    save_gguf(jaxsft.load_model(base, dtype=jnp.float32), str(base_gguf), tf.AutoTokenizer.from_pretrained(base), "f32")
    _, ids = chat_ids
    plain = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(plain, os.path.join(run_dir, "adapter")).eval()
    llm = llama(base_gguf, lora_path=os.path.join(run_dir, "adapter.gguf"))
    for prompt in ids:
        logits, greedy = torch_run(peft, prompt)
        with peft.disable_adapter(), torch.no_grad():
            without = peft(torch.tensor([prompt])).logits[0].numpy()
        assert rel_err(without, logits) > 1e-2
        assert rel_err(llama_logits(llm, prompt), logits) <= 1e-4
        assert llama_greedy(llm, prompt, 8) == greedy


@pytest.mark.slow
def test_llama_family_gguf_runs_in_llama_cpp_like_transformers(chat_ids, tmp_path):
    """The `llama` architecture's own paths: q/k rows permuted for llama.cpp's RoPE, llama3 RoPE
    scaling as rope_freqs.weight, GQA, head_dim != hidden / heads, an untied head (checked by hand
    the same way, not in the suite: Mistral, Qwen3 and Granite, all within 6e-7)."""
    import jax.numpy as jnp

    import jaxsft
    from jaxsft.models.gguf_export import save_gguf

    tok, ids = chat_ids
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})).eval()
    hf.save_pretrained(tmp_path / "llama")
    save_gguf(jaxsft.load_model(tmp_path / "llama", dtype=jnp.float32), str(tmp_path / "llama.gguf"), tok, "f32")
    llm = llama(tmp_path / "llama.gguf")
    logits, greedy = torch_run(hf, ids[0])
    assert rel_err(llama_logits(llm, ids[0]), logits) <= 1e-4
    assert llama_greedy(llm, ids[0], 8) == greedy


# ---- SentencePiece tokenizers (Llama 2, Mistral), a full fine-tune's exports ------------------

MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
                    "{{ ' ' + m['content'] + eos_token }}{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                    "{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def spm_base(tmp_path_factory):
    """A tiny random Mistral with a SentencePiece BPE tokenizer as Llama 2 and Mistral v0.1 have it:
    tokenizer.model (byte fallback, `▁` for spaces; trained here on GSM8K's text, 1000 pieces, ~1 s)
    and a tokenizer_config.json with `legacy` (a space prefix also after special tokens), which
    transformers converts on load (with sentencepiece)."""
    import io

    import sentencepiece

    with open(ASSETS / "data" / "gsm8k" / "train.jsonl") as f:
        texts = [text for line in f for text in json.loads(line).values()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=1000, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("mistral")
    (path / "tokenizer.model").write_bytes(model.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": MISTRAL_TEMPLATE}))
    torch.manual_seed(0)
    hf = tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def spm_run(spm_base, tmp_path_factory):
    """A full fine-tune of the Mistral: hf/, model.gguf and its last checkpoint."""
    return train(tmp_path_factory.mktemp("spm_run"), spm_base, "mistral_sft", "c.lora.r = 0")


@pytest.mark.slow
def test_sentencepiece_gguf_runs_in_llama_cpp_like_transformers(spm_base, spm_run, llama_cpp_src, tmp_path):
    """llama.cpp on the run's model.gguf (a SentencePiece vocabulary: tokenizer.ggml.model "llama",
    scores, token types) and on its converter's GGUF of hf/: the base tokenizer's token ids for real
    chat prompts (byte fallback included) and plain questions, which the exported tokenizer keeps, and
    transformers' logits (<= 1e-4 relative) and greedy tokens on hf/."""
    base_tok = tf.AutoTokenizer.from_pretrained(spm_base)
    tok = tf.AutoTokenizer.from_pretrained(os.path.join(spm_run, "hf"))
    hf = tf.AutoModelForCausalLM.from_pretrained(os.path.join(spm_run, "hf"), dtype=torch.float32).eval()
    files = {"ours": os.path.join(spm_run, "model.gguf"), "converter": str(tmp_path / "converted.gguf")}
    subprocess.run([sys.executable, os.path.join(llama_cpp_src, "convert_hf_to_gguf.py"),
                    os.path.join(spm_run, "hf"), "--outtype", "f32", "--outfile", files["converter"]],
                   check=True, capture_output=True)
    texts = [base_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in prompts()]
    ids = [base_tok(text, add_special_tokens=False)["input_ids"] for text in texts]
    questions = [chat[-1]["content"] for chat in prompts()]
    assert [tok(text, add_special_tokens=False)["input_ids"] for text in texts] == ids
    reference = [torch_run(hf, prompt) for prompt in ids]
    for label, path in files.items():
        llm = llama(path)
        assert llm.metadata["tokenizer.ggml.model"] == "llama", label
        assert llm.metadata["tokenizer.chat_template"] == MISTRAL_TEMPLATE, label
        for text, prompt, question, (logits, greedy) in zip(texts, ids, questions, reference):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt, label
            assert llm.tokenize(question.encode()) == base_tok(question)["input_ids"], label  # both add the BOS
            assert rel_err(llama_logits(llm, prompt), logits) <= 1e-4, label
            assert llama_greedy(llm, prompt, 8) == greedy, label


@pytest.mark.slow
def test_full_finetune_gguf_from_its_checkpoint_to_gcs(spm_run, gcs_bucket, tmp_path):  # noqa: F811
    """`python -m jaxsft.export --gguf gs://...` from a full fine-tune's checkpoint (the local fake GCS
    server) writes the run's own model.gguf byte for byte, and leaves no temporary file behind."""
    out = f"gs://{gcs_bucket}/{tmp_path.name}/model.gguf"
    result = cli("jaxsft.export", "--checkpoint", spm_run, "--gguf", out, "--gguf-type", "f32", TMPDIR=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(spm_run, "model.gguf"), "rb") as f:
        assert epath.Path(out).read_bytes() == f.read()
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_gguf_of_a_sliding_window_mistral_says_llama_cpp_ignores_the_window(spm_base, tmp_path, caplog):
    """llama.cpp's `llama` architecture has no sliding window (the converter writes none either): a
    Mistral whose window (8) is shorter than its context gets transformers' logits in llama.cpp up
    to the window and others past it, and the export warns so."""
    import jax.numpy as jnp

    import jaxsft
    from jaxsft.models.gguf_export import save_gguf

    torch.manual_seed(0)
    hf = tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, max_position_embeddings=256)).eval()
    hf.save_pretrained(tmp_path / "mistral")
    with caplog.at_level("WARNING"):
        save_gguf(jaxsft.load_model(tmp_path / "mistral", dtype=jnp.float32), str(tmp_path / "m.gguf"),
                  tf.AutoTokenizer.from_pretrained(spm_base), "f32")
    assert "llama.cpp's llama architecture has no sliding window: past 8 tokens of context" in caplog.text
    ids = np.random.RandomState(0).randint(3, 1000, 16).tolist()
    logits, _ = torch_run(hf, ids, n=1)
    got = llama_logits(llama(tmp_path / "m.gguf"), ids)
    assert rel_err(got[:8], logits[:8]) <= 1e-4
    assert rel_err(got[8:], logits[8:]) > 1e-2
