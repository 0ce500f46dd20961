"""Generation with the KV cache against transformers' `generate`, and its batching and sampling."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import jaxsft
from jaxsft.generation import Sampling, State, _decode, _filtered, _grow, _new_cache, _prefill, _start
from jaxsft.models.gguf import load_gguf_tokenizer, smollm2_path
from jaxsft.sharding import make_mesh
from tests.hf_models import make_hf_model

PROMPT_LENGTHS = (5, 17, 9, 30, 1)


def load_fp32(path, **kw):
    return jaxsft.load_model(path, dtype=jnp.float32, compute_dtype=jnp.float32, remat="none", **kw)


def hf_greedy(hf, prompt, max_new_tokens, eos_token_id, **kw):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                          pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 160, n).tolist() for n in PROMPT_LENGTHS]
    return hf, str(path), load_fp32(path), prompts


def test_tiny_greedy_equals_transformers(tiny):
    # Mistral's sliding window (8) is shorter than the longer prompts, so its mask is exercised too.
    hf, _, model, prompts = tiny
    ours = jaxsft.generate(model, prompts, 20, eos_token_id=[])
    assert ours == [hf_greedy(hf, p, 20, None) for p in prompts]


def test_decode_chunks_attending_over_longer_cache_spans_equal_transformers(tiny):
    # 70 new tokens take three decode chunks, each over a longer cache (grown to prompt + 32,
    # + 64, + 128 columns: three compilations), the chunk's own columns in a separate buffer
    # until its end; the prompts are
    # prefilled in groups of 2 rows at lengths 32, 16, 8 and 8.
    hf, _, model, prompts = tiny
    before = _decode._cache_size()
    ours = jaxsft.generate(model, prompts, 70, eos_token_id=[])
    assert _decode._cache_size() - before == 3
    assert ours == [hf_greedy(hf, p, 70, None) for p in prompts]


def test_bf16_prefill_and_decode_make_no_float32_copy_of_the_weights(tiny):
    # XLA:CPU slices a bf16 stack in a loop, and gathers from a bf16 table, by converting all of it
    # to float32 first: a prefill call made a float32 copy of every stacked weight (428 MB for
    # SmolLM2-135M), each decode chunk one of the embedding. Both read uint16 views instead.
    _, path, _, prompts = tiny
    model = jaxsft.load_model(path, dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16, remat="none")
    assert jaxsft.generate(model, prompts, 4, eos_token_id=[])  # runs
    ids, pad = np.ones((3, 32), np.int32), np.zeros(3, np.int32)  # 3 rows: no activation shaped like a weight
    cache = _new_cache(model, 3, 32)
    prefill = _prefill.lower(model, ids, pad, cache, np.int32(0), np.int32(0)).compile().as_text()
    stacked = jax.tree.leaves(model.layers.arrays())
    assert stacked and all(w.dtype == jnp.bfloat16 for w in stacked)
    for w in [*stacked, model.embed[...]]:
        assert f"f32[{','.join(map(str, w.shape))}]" not in prefill, w.shape
    _, cache = _prefill(model, ids, pad, cache, np.int32(0), np.int32(0))
    sampling = Sampling(*map(np.float32, (1.0, 0, 1.0, 0.0, 1.0)))
    state = State(np.int32(1), cache=_grow(cache, 64), **_start([np.zeros((3, model.config.vocab_size), np.float32)], ids, pad,
                                                     np.ones(3, bool), np.int32([-1]), sampling, jax.random.key(0),
                                                     new_len=32, greedy=True, penalize=False))
    decode = _decode.lower(model, state, pad, np.int32(32), np.int32(8), np.int32([-1]), sampling, jax.random.key(0),
                           greedy=True, penalize=False).compile().as_text()
    assert f"f32[{','.join(map(str, model.embed[...].shape))}]" not in decode


def test_batched_equals_one_by_one_and_stops_at_eos(tiny):
    _, _, model, prompts = tiny
    free = jaxsft.generate(model, prompts, 12, eos_token_id=[])
    # Make the 4th token of the first row its end token: that row stops there, end token included.
    eos = free[0][3]
    stopped = jaxsft.generate(model, prompts, 12, eos_token_id=[eos, 159])
    for row, alone in zip(stopped, [jaxsft.generate(model, [p], 12, eos_token_id=[eos, 159]) for p in prompts]):
        assert row == alone[0]
    for full, row in zip(free, stopped):
        ends = [i for i, t in enumerate(full) if t in (eos, 159)]
        assert row == (full[:ends[0] + 1] if ends else full)
    assert stopped[0] == free[0][:free[0].index(eos) + 1]


def test_one_compilation_per_bucket(tiny):
    _, _, model, prompts = tiny
    jaxsft.generate(model, [prompts[3][:20]] * 3, 5)
    before = _prefill._cache_size(), _decode._cache_size()
    jaxsft.generate(model, [prompts[3][:18], prompts[3][:25], [1]], 7)  # same buckets: 4 x 32, 8 new
    assert (_prefill._cache_size(), _decode._cache_size()) == before


def test_sampling_is_reproducible_and_top_p_tiny_is_greedy(tiny):
    _, _, model, prompts = tiny
    sample = lambda seed, **kw: jaxsft.generate(  # noqa: E731
        model, prompts, 16, eos_token_id=[], temperature=1.0, seed=seed, **kw)
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1, top_p=1e-6) == jaxsft.generate(model, prompts, 16, eos_token_id=[])


def test_repetition_penalty_greedy_equals_transformers(tiny):
    hf, _, model, prompts = tiny
    ours = jaxsft.generate(model, prompts, 20, eos_token_id=[], repetition_penalty=1.8)
    assert ours == [hf_greedy(hf, p, 20, None, repetition_penalty=1.8) for p in prompts]
    assert ours != jaxsft.generate(model, prompts, 20, eos_token_id=[])  # the penalty changed the output


def test_top_k_one_and_min_p_one_are_greedy(tiny):
    _, _, model, prompts = tiny
    greedy = jaxsft.generate(model, prompts, 16, eos_token_id=[])
    for kw in (dict(top_k=1), dict(min_p=1.0)):
        assert jaxsft.generate(model, prompts, 16, eos_token_id=[], temperature=1.5, seed=3, **kw) == greedy


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2), (40, 0.9, 0.05),
                                               (3, 0.9, 0.6)])
def test_filters_keep_what_transformers_warpers_keep(top_k, top_p, min_p):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(top_k))
    warpers = tf.LogitsProcessorList(
        ([tf.TopKLogitsWarper(top_k)] if top_k else []) + ([tf.TopPLogitsWarper(top_p)] if top_p < 1 else [])
        + ([tf.MinPLogitsWarper(min_p)] if min_p else []))
    expected = warpers(None, logits.clone()).numpy()
    settings = Sampling(*map(np.float32, (1.0, top_k, top_p, min_p, 1.0)))
    ours = np.asarray(_filtered(jnp.asarray(logits.numpy()), settings))
    assert (np.isfinite(ours) == np.isfinite(expected)).all()
    assert 4 < np.isfinite(ours).sum() < 4 * 300  # some filtering, and not down to the top tokens alone
    np.testing.assert_array_equal(ours[np.isfinite(ours)], expected[np.isfinite(expected)])


def test_stop_strings_end_rows_like_transformers(tiny, assets):
    hf, _, model, prompts = tiny
    # Ids below 94 of the Qwen2 byte-level vocabulary are the printable ASCII characters.
    tok = tf.AutoTokenizer.from_pretrained(assets / "tokenizers" / "qwen2.5-0.5b-instruct")
    free = jaxsft.generate(model, prompts, 20, eos_token_id=[])
    row, at = next((r, i) for r, out in enumerate(free) for i in range(4, 19)
                   if out[i] < 94 and out[i + 1] < 94)
    stop = tok.decode(free[row][at:at + 2])
    ours = jaxsft.generate(model, prompts, 20, eos_token_id=[], stop_strings=[stop, "never appears"], tokenizer=tok)
    assert ours == [hf_greedy(hf, p, 20, None, stop_strings=[stop, "never appears"], tokenizer=tok)
                    for p in prompts]
    assert len(ours[row]) <= at + 2 and stop in tok.decode(ours[row]) and stop not in tok.decode(ours[row][:-1])
    assert any(len(out) == 20 for out in ours)  # rows without the string run on
    with pytest.raises(ValueError, match="tokenizer"):
        jaxsft.generate(model, prompts, 4, stop_strings=["x"])


def test_sharded_params_generate_the_same(tiny):
    _, path, model, prompts = tiny
    sharded = load_fp32(path, mesh=make_mesh(data=2, fsdp=2, tensor=2))
    assert len(sharded.layers.q[...].sharding.device_set) == 8
    assert jaxsft.generate(sharded, prompts, 10) == jaxsft.generate(model, prompts, 10)


def test_bad_arguments_are_refused(tiny):
    model = tiny[2]
    with pytest.raises(ValueError, match="empty prompt"):
        jaxsft.generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        jaxsft.generate(model, [[1]], 0)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_on_gsm8k(assets):
    path = smollm2_path()
    tok = load_gguf_tokenizer(path)
    with open(assets / "data" / "gsm8k" / "test.jsonl") as f:
        questions = [json.loads(line)["question"] for line, _ in zip(f, range(8))]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for q in questions]
    assert len({len(p) for p in prompts}) == 8
    ours = jaxsft.generate(load_fp32(path), prompts, 64)
    hf = tf.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    # One left-padded batch in transformers too (one prompt at a time is 8x slower on CPU).
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=64, do_sample=False)[:, batch["input_ids"].shape[1]:].tolist()
    for row, ref in zip(ours, out):
        ref = ref[:ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref
        assert row == ref
    # bfloat16 decoding (weights, activations and KV cache; the fast path on CPU): rounding moves
    # rows off float32's path, most late, and the CPU decides where (bf16 dot instructions or their
    # emulation round differently). Common prefixes of 64 tokens: 64, 64, 60, 64, 64, 64, 6, 64 on
    # a Zen 4 EPYC; 20, 64, 60, 19, 64, 64, ... on a Zen 3 one; 64, 20, 64, 19, 8, 60, 6, 37 on the
    # Zen 4 with XLA's bf16 dots in Eigen. So: mostly float32's path (a mean of 16 tokens at least),
    # left only where float32 itself nearly hesitated: at the first differing token, transformers'
    # float32 logit of bf16's choice is within 1 of its own choice's (measured: 0.001 and 0.026;
    # with Eigen's dots at most 0.053). bf16 rounding moves the gaps between float32's top 5 tokens
    # by up to 0.58 (p99 0.34) over these rows in transformers' bf16 forward; a broken bf16 path
    # (its cache, its masks) turns where float32 is sure, by several logits.
    bf16 = jaxsft.generate(jaxsft.load_model(path, dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16, remat="none"),
                           prompts, 64)
    prefixes = [next((i for i, (a, b) in enumerate(zip(row, ref)) if a != b), min(len(row), len(ref)))
                for row, ref in zip(bf16, ours)]
    assert sum(prefixes) >= 16 * 8, prefixes
    gaps = []
    for prompt, row, ref, p in zip(prompts, bf16, ours, prefixes):
        if p < min(len(row), len(ref)):
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + ref[:p]])).logits[0, -1]
            assert int(logits.argmax()) == ref[p]
            gaps.append(float(logits[ref[p]] - logits[row[p]]))
    print("prefixes", prefixes, "float32 logit gaps where bf16 turned", gaps)
    assert all(0 <= g < 1.0 for g in gaps), (prefixes, gaps)
