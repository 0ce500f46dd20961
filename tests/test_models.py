"""The decoder against transformers' PyTorch models, for every supported family (fp32, CPU)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers as tf
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jaxsft
from jaxsft.models import hf_io
from jaxsft.models.hf_io import hf_arrays
from jaxsft.sharding import make_mesh
from tests.hf_models import FAMILIES, make_hf_model

IDS = np.random.RandomState(0).randint(0, 160, (2, 37))  # batch > 1, odd length > sliding window


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, str(path)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


def load_fp32(path, **kw):
    return jaxsft.load_model(path, dtype=jnp.float32, compute_dtype=jnp.float32, remat="none", **kw)


def assert_logits_close(ours, ref):
    scale = np.abs(ref).max()
    err = np.abs(np.asarray(ours) - ref).max()
    assert err <= 1e-4 * scale, f"max abs diff {err} > 1e-4 * {scale}"


def test_logits_match_transformers(family):
    _, hf, path = family
    model = load_fp32(path)
    assert_logits_close(model(jnp.asarray(IDS)), hf_logits(hf, IDS))


def test_loss_and_gradients_match_transformers(family):
    _, hf, path = family
    labels = np.random.RandomState(1).randint(0, 160, IDS.shape)
    labels[0, :5] = -100  # ignored positions, as an SFT mask makes them
    hf.zero_grad()
    out = hf(torch.tensor(IDS), labels=torch.tensor(labels))
    out.loss.backward()
    ref_grads = {n: p.grad.numpy() for n, p in hf.named_parameters()}

    model = load_fp32(path)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(IDS))[:, :-1]
        targets = jnp.asarray(labels)[:, 1:]
        mask = targets != -100
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, targets, 0))
        return jnp.sum(losses * mask) / jnp.sum(mask)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    np.testing.assert_allclose(loss, out.loss.item(), rtol=1e-5)
    ours = dict(hf_arrays(nnx.to_pure_dict(grads), model.config))
    if model.config.tie_word_embeddings:
        ref_grads.pop("lm_head.weight", None)
    assert sorted(ours) == sorted(ref_grads)
    for name, g in ours.items():
        rel = np.linalg.norm(g - ref_grads[name]) / np.linalg.norm(ref_grads[name])
        assert rel <= 1e-3, f"{name}: relative gradient error {rel}"


def test_export_round_trip(family, tmp_path):
    _, hf, path = family
    model = load_fp32(path)
    out = tmp_path / "export"
    jaxsft.save_hf(model, out, dtype=jnp.float32)
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(reloaded) is type(hf)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_logits_close(hf_logits(reloaded.eval(), IDS), hf_logits(hf, IDS))
    # And back into jaxsft once more.
    assert_logits_close(load_fp32(out)(jnp.asarray(IDS)), hf_logits(hf, IDS))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_export_is_read_by_legacy_rope_keys_alone(family, tmp_path):
    """transformers 4.x, vLLM and llama.cpp's converter read rope_theta / rope_scaling, not
    transformers 5's rope_parameters: an export whose config.json has only the legacy keys gives
    the same logits (llama: llama3 scaling and theta 5e5; qwen2: theta 1e6)."""
    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path / "src")
    model = load_fp32(tmp_path / "src")
    out = tmp_path / "export"
    jaxsft.save_hf(model, out, dtype=jnp.float32)
    config = json.loads((out / "config.json").read_text())
    del config["rope_parameters"]
    (out / "config.json").write_text(json.dumps(config))
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert_logits_close(hf_logits(reloaded, IDS), np.asarray(model(jnp.asarray(IDS))))
    assert config["rope_theta"] == {"llama": 500000.0, "qwen2": 1e6}[family]
    assert config["rope_scaling"] == ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
                                      if family == "llama" else None)


def test_bf16_sharded_export_loads_in_transformers(tmp_path):
    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path / "src")
    model = load_fp32(tmp_path / "src")
    out = tmp_path / "export"
    jaxsft.save_hf(model, out, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).exists() for f in files)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "generation_config.json").exists()
    # dtype='auto' (the default from transformers 5 on) takes the dtype config.json names.
    reloaded, info = tf.AutoModelForCausalLM.from_pretrained(out, dtype="auto", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert reloaded.dtype == torch.bfloat16
    ref = hf_logits(hf, IDS)
    got = hf_logits(reloaded.float().eval(), IDS)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()  # bf16 weights


def test_tokenizer_is_exported(tmp_path, assets):
    hf = make_hf_model("qwen2")
    hf.save_pretrained(tmp_path / "src")
    tok = tf.AutoTokenizer.from_pretrained(assets / "tokenizers" / "qwen2.5-0.5b-instruct")
    jaxsft.save_hf(load_fp32(tmp_path / "src"), tmp_path / "out", tokenizer=tok)
    again = tf.AutoTokenizer.from_pretrained(tmp_path / "out")
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert again.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def _packed_row(lengths, total, rng):
    ids = rng.randint(0, 160, total)
    segment_ids = np.zeros(total, np.int32)
    positions = np.zeros(total, np.int32)
    start = 0
    for i, n in enumerate(lengths):
        segment_ids[start:start + n] = i + 1
        positions[start:start + n] = np.arange(n)
        start += n
    return ids, segment_ids, positions


@pytest.mark.parametrize("backend,total", [("xla", 64), ("splash", 128)])
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_packed_row_equals_samples_one_by_one(tmp_path, backend, total, name):
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path)
    model = load_fp32(tmp_path, attention=backend)
    lengths = [total // 4, total // 2 - 3, total // 8]  # the rest of the row is padding
    ids, seg, pos = _packed_row(lengths, total, np.random.RandomState(2))
    packed = np.asarray(model(jnp.asarray(ids[None]), jnp.asarray(seg[None]), jnp.asarray(pos[None])))[0]
    start = 0
    for n in lengths:
        alone = hf_logits(hf, ids[None, start:start + n])[0]
        assert_logits_close(packed[start:start + n], alone)
        start += n


def test_sharded_load_on_8_devices_reads_each_tensor_once_and_gives_same_logits(tmp_path, monkeypatch):
    assert jax.device_count() == 8
    hf = make_hf_model("qwen2")
    hf.save_pretrained(tmp_path)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    reads = []

    class CountingSlice:  # a tensor's part: read when indexed
        def __init__(self, name, tensor):
            self.name, self.tensor = name, tensor

        def __getitem__(self, box):
            reads.append(self.name)
            return self.tensor[box]

        def __getattr__(self, attr):
            return getattr(self.tensor, attr)

    class CountingSafeOpen:  # safetensors' handle, with every tensor read recorded
        def __init__(self, *args, **kw):
            self.handle = safe_open(*args, **kw)

        def get_tensor(self, name):
            reads.append(name)
            return self.handle.get_tensor(name)

        def get_slice(self, name):
            return CountingSlice(name, self.handle.get_slice(name))

        def __getattr__(self, attr):
            return getattr(self.handle, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(hf_io, "safe_open", CountingSafeOpen)
    model = load_fp32(tmp_path, mesh=mesh)
    # 8 devices, 4 distinct shards of every layer weight: each tensor is still read once.
    assert sorted(reads) == sorted(load_file(tmp_path / "model.safetensors"))
    q = model.layers.q[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda m, x: m(x))(model, jnp.asarray(IDS))
    assert_logits_close(logits, hf_logits(hf, IDS))


@pytest.mark.parametrize("layout,shape", [("linear", (6, 10)), ("in_heads", (6, 4, 3)), ("out_heads", (4, 3, 6)),
                                          ("bias_heads", (4, 3)), ("vector", (10, 6))])
def test_a_process_reads_only_the_hf_rows_and_columns_of_its_shards(layout, shape):
    """A host of a pod reads the part of each HF tensor its devices hold, in the HF layout."""
    ours = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    hf = hf_io.to_hf(ours, layout)
    assert np.array_equal(hf_io.to_jaxsft(hf, layout, shape), ours)
    rng = np.random.default_rng(0)
    for _ in range(20):
        box = tuple(slice(int(a), int(b) + 1) for a, b in (sorted(rng.integers(0, n, 2)) for n in shape))
        read = []
        part = hf_io._read_our_box(lambda hf_box: read.append(hf[hf_box].size) or hf[hf_box], layout, shape, box)
        assert np.array_equal(part, ours[box])
        # Whole heads are read (a head's dimensions are never sharded), nothing else.
        head_dim_axis = {"in_heads": 2, "out_heads": 1, "bias_heads": 1}.get(layout)
        covering = tuple(slice(None) if d == head_dim_axis else s for d, s in enumerate(box))
        assert read == [ours[covering].size], (box, read)


def test_remat_policies_give_same_gradients(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    grads = []
    for remat in ("none", "full", "dots", "dots_no_batch"):
        model = jaxsft.load_model(tmp_path, compute_dtype=jnp.float32, remat=remat)
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(jnp.asarray(IDS)) ** 2)  # noqa: E731
        grads.append(jax.tree.leaves(jax.grad(loss)(params)))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# Malformed folders: each gives an error that names the problem.

@pytest.fixture()
def saved(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path / "m", max_shard_size="50KB")
    return tmp_path / "m"


def test_missing_shard_is_named(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(jaxsft.CheckpointError, match=shard.name):
        load_fp32(saved)


def test_wrong_shape_is_named(saved):
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    file = saved / index["weight_map"][name]
    tensors = load_file(file)
    tensors[name] = tensors[name][:, :10]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(jaxsft.CheckpointError, match=r"model.layers.1.mlp.up_proj.weight .* shape \(96, 10\)"):
        load_fp32(saved)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(jaxsft.CheckpointError) as e:
        load_fp32(tmp_path)
    assert "missing tensors: model.layers.0.self_attn.k_proj.weight" in str(e.value)
    assert "unexpected tensors: model.layers.0.self_attn.extra.weight" in str(e.value)


def test_unknown_architecture_lists_supported(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(jaxsft.ConfigError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM"):
        load_fp32(tmp_path)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(jaxsft.CheckpointError, match="no config.json"):
        load_fp32(tmp_path)
    make_hf_model("llama").save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(jaxsft.CheckpointError, match="no model.safetensors"):
        load_fp32(tmp_path)


def test_cudnn_packed_layout():
    from jaxsft.models.attention import packed_layout

    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0, 0], [1] * 8, [0] * 8])
    seqlens, offsets = packed_layout(seg)
    np.testing.assert_array_equal(seqlens[:, :3], [[3, 2, 3], [8, -1, -1], [8, -1, -1]])
    assert (seqlens[:, 3:] == -1).all() and seqlens.shape == (3, 8)
    np.testing.assert_array_equal(offsets[:, :3], [[0, 3, 5], [0, -1, -1], [0, -1, -1]])
    assert (offsets[:, 3:] == -1).all() and offsets.shape == (3, 9)


def test_splash_attention_sharded_over_a_mesh_matches_xla():
    """On a TPU pod slice the kernel runs per shard (shard_map); here in interpret mode."""
    from jaxsft.models.attention import splash_attention, xla_attention

    b, t, n, k, h = 4, 128, 4, 2, 32
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    kk = jax.random.normal(keys[1], (b, t, k, h))
    v = jax.random.normal(keys[2], (b, t, k, h))
    seg = jnp.asarray(np.repeat([[1] * 50 + [2] * 60 + [0] * 18], b, axis=0))
    ref = xla_attention(q, kk, v, seg, scale=0.2, sliding_window=None)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: splash_attention(*a, scale=0.2, sliding_window=None))(q, kk, v, seg)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=2e-6)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("sliding_window", [None, 7])
def test_xla_attention_gradients_equal_autodiff_and_keep_no_scores(dtype, tolerance, sliding_window):
    """The attention's own VJP (log-sum-exp kept, probabilities recomputed) against autodiff of
    float32 softmax attention, on packed rows with padding; what its backward keeps holds nothing
    of size seq x seq (autodiff kept the scores, the mask's choice and the probabilities)."""
    from jaxsft.models.attention import attention_mask, xla_attention

    b, t, n, k, h = 2, 64, 6, 2, 16
    rng = np.random.default_rng(0)
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), dtype) for heads in (n, k, k))
    seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 30 + [3] * 10 + [0] * 4], b, axis=0))
    weights = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)

    def reference(q, kk, v):
        q = q.reshape(b, t, k, n // k, h)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, kk, precision="highest") * 0.25
        scores = jnp.where(attention_mask(seg, sliding_window)[:, None, None], scores, jnp.finfo(jnp.float32).min)
        out = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(scores, axis=-1), v, precision="highest")
        return jnp.sum(out.reshape(b, t, n, h) * weights)

    ours = lambda q, kk, v: jnp.sum(
        xla_attention(q, kk, v, seg, scale=0.25, sliding_window=sliding_window).astype(jnp.float32) * weights)
    got = jax.grad(ours, (0, 1, 2))(q, kk, v)
    want = jax.grad(reference, (0, 1, 2))(*(x.astype(jnp.float32) for x in (q, kk, v)))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        error = float(np.abs(np.asarray(g, np.float32) - np.asarray(w)).max() / np.abs(np.asarray(w)).max())
        assert error < tolerance, error
    _, pullback = jax.vjp(ours, q, kk, v)
    kept = [x.shape for x in jax.tree.leaves(pullback)]
    assert kept and all(shape.count(t) < 2 for shape in kept), kept


def test_layer_residuals_are_stacked_as_integers_with_the_same_gradients():
    """The decoder's scan keeps each layer's bf16 residuals as uint16 (XLA:CPU updates bf16 stacks
    by rewriting them whole); the gradients are those of the plain layer, bit for bit."""
    from jaxsft.models.decoder import residuals_as_integers

    def layer(x, w):
        y = jnp.einsum("te,ef->tf", x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        return jnp.einsum("tf,fe->te", jax.nn.silu(y), w.T, preferred_element_type=jnp.float32).astype(x.dtype), None

    def loss(body, ws, x):
        return jnp.sum(jax.lax.scan(body, x, ws)[0].astype(jnp.float32) ** 2)

    keys = jax.random.split(jax.random.key(0))
    ws = (jax.random.normal(keys[0], (4, 16, 48)) * 0.2).astype(jnp.bfloat16)
    x = jax.random.normal(keys[1], (8, 16)).astype(jnp.bfloat16)
    plain = jax.jit(jax.grad(lambda ws, x: loss(layer, ws, x), (0, 1)))(ws, x)
    stored = jax.jit(jax.grad(lambda ws, x: loss(residuals_as_integers(layer), ws, x), (0, 1)))(ws, x)
    for a, b in zip(plain, stored):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert np.abs(np.asarray(plain[0], np.float32)).max() > 0
    forward = str(jax.make_jaxpr(lambda ws, x: jax.vjp(lambda ws: loss(residuals_as_integers(layer), ws, x), ws)[1])(ws, x))
    assert "u16[4,8,48]" in forward and "bf16[4,8,48]" not in forward, forward
