"""SFT data pipeline on the real GSM8K and OpenAssistant files with the real Llama 3.2 and Qwen 2.5 tokenizers."""

import collections
import copy
import gzip
import json
import os
import subprocess
import sys
import threading
import unicodedata

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxsft.data import DataError, DataPipeline, default_data_config, validate_data_config
from jaxsft.data import tokenize as tokenize_module
from jaxsft.data.config import SOURCE_DEFAULTS
from jaxsft.data.formats import is_hub_name, read_source
from jaxsft.data.tokenize import load_or_tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LLAMA_KWARGS = {"date_string": "26 Jul 2024"}
END_OF_TURN = {"llama": "<|eot_id|>", "qwen": "<|im_end|>"}


@pytest.fixture(scope="session")
def tokenizers(assets):
    return {
        "llama": AutoTokenizer.from_pretrained(assets / "tokenizers/llama-3.2-1b-instruct"),
        "qwen": AutoTokenizer.from_pretrained(assets / "tokenizers/qwen2.5-0.5b-instruct"),
    }


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One token cache for the whole session, so each real file is tokenized once per setting."""
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(scope="session")
def gsm8k(assets):
    return str(assets / "data/gsm8k/train.jsonl")


@pytest.fixture(scope="session")
def oasst(assets):
    return str(assets / "data/chat/oasst_en_100_tree.jsonl")


def make_cfg(cache, sources, tokenizer_name="qwen", **overrides):
    cfg = default_data_config()
    cfg.sources = [s if isinstance(s, dict) else {"path": str(s)} for s in sources]
    cfg.cache_dir = str(cache)
    if tokenizer_name == "llama":
        cfg.chat_template_kwargs = LLAMA_KWARGS
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def settings(tokenizer_name, loss_on="all_assistant", render="chat_template"):
    return dict(render=render, loss_on=loss_on, system_prompt="", on_bad_record="error",
                template_kwargs=LLAMA_KWARGS if tokenizer_name == "llama" else {})


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def nfc(text):
    return unicodedata.normalize("NFC", text)


def label_runs(tokens, mask):
    """Contiguous runs of label tokens, as lists of ids."""
    runs, current = [], []
    for t, m in zip(tokens.tolist(), mask.tolist()):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def unpacked_samples(step_or_batches):
    """(input_ids, targets, loss_mask) per packed sample, recovered from segment ids, and positions checked."""
    batches = step_or_batches.microbatches if hasattr(step_or_batches, "microbatches") else step_or_batches
    out = []
    for batch in batches:
        for row in range(len(batch["segment_ids"])):
            seg = batch["segment_ids"][row]
            used = np.flatnonzero(seg)
            if len(used):  # samples sit back to back from the row start
                assert used[-1] == len(used) - 1
            assert not batch["input_ids"][row, seg == 0].any() and not batch["loss_mask"][row, seg == 0].any()
            for s in np.unique(seg[seg > 0]):
                where = np.flatnonzero(seg == s)
                np.testing.assert_array_equal(batch["positions"][row, where], np.arange(len(where)))
                out.append(tuple(tuple(batch[k][row, where].tolist()) for k in ("input_ids", "targets", "loss_mask")))
    return out


# --- masks ---


@pytest.mark.parametrize("name", ["llama", "qwen"])
@pytest.mark.parametrize("loss_on", ["all_assistant", "last_assistant"])
def test_masks_cover_exactly_assistant_content_and_end_of_turn(name, loss_on, tokenizers, cache, gsm8k, oasst):
    tok = tokenizers[name]
    eot_id = tok.convert_tokens_to_ids(END_OF_TURN[name])
    for path, fmt, limit in ((oasst, "oasst", None), (gsm8k, "gsm8k", 300)):
        source = {**SOURCE_DEFAULTS, "path": path}
        table = load_or_tokenize(source, tok, settings(name, loss_on), cache)
        conversations = read_source(source, system_prompt="", on_bad_record="error").conversations
        assert table.info["format"] == fmt and len(table) == len(conversations)
        assert len(table) == (564 if fmt == "oasst" else 7473)
        multi_turn = 0
        for i, conv in enumerate(conversations[:limit]):
            tokens, mask = table.sample(i)
            reference = tok.apply_chat_template(conv.messages, tokenize=True, **settings(name)["template_kwargs"])
            reference = reference["input_ids"] if hasattr(reference, "keys") else reference
            assert tokens.tolist() == list(reference)
            replies = [m["content"] for m in conv.messages if m["role"] == "assistant"]
            if loss_on == "last_assistant":
                replies = replies[-1:]
            multi_turn += len(replies) > 1
            runs = label_runs(tokens, mask)
            assert len(runs) == len(replies), (i, conv.messages)
            for run, reply in zip(runs, replies):
                assert run[-1] == eot_id
                text = tok.decode(run[:-1], skip_special_tokens=False)
                # Qwen's tokenizer normalizes to NFC.
                assert nfc(text.strip()) == nfc(reply.strip()), (i, text, reply)
                assert eot_id not in run[:-1]
        if fmt == "oasst" and loss_on == "all_assistant":
            assert multi_turn > 200  # the tree paths really are multi-turn


def test_pad_equal_to_eos_does_not_hide_end_of_turn_labels(tokenizers, cache, gsm8k):
    tok = tokenizers["llama"]
    assert tok.pad_token_id == tok.eos_token_id == 128009
    pipe = DataPipeline(make_cfg(cache, [gsm8k], "llama", global_batch_size=8, prefetch=0), tok)
    step = next(pipe)
    samples = unpacked_samples(step)
    assert len(samples) == 8
    for _, targets, loss in samples:
        assert targets[-1] == 128009 and loss[-1] == 1  # the reply's <|eot_id|> is the last label


def test_raw_render_labels_completion_and_eos(tokenizers, tmp_path):
    tok = tokenizers["llama"]
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hi:", "completion": " hi there"}] * 3)
    table = load_or_tokenize({**SOURCE_DEFAULTS, "path": str(path)}, tok, settings("llama", render="raw"), tmp_path)
    tokens, mask = table.sample(0)
    prompt = tok("Say hi:", add_special_tokens=False)["input_ids"]
    completion = tok(" hi there", add_special_tokens=False)["input_ids"]
    assert tokens.tolist() == [tok.bos_token_id, *prompt, *completion, tok.eos_token_id]
    assert mask.tolist() == [0] * (1 + len(prompt)) + [1] * (len(completion) + 1)


# --- packing, steps, determinism, resume ---


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_packing_efficiency_on_gsm8k_at_2048(name, tokenizers, cache, gsm8k):
    pipe = DataPipeline(make_cfg(cache, [gsm8k], name, global_batch_size=512, micro_batch_rows=1, prefetch=0), tokenizers[name])
    summary = pipe.summary
    print(name, json.dumps(summary))
    assert summary["train_samples_per_epoch"] == 7473 and summary["steps_per_epoch"] == 15
    assert summary["packing_efficiency"] >= 0.95
    assert summary["batch_efficiency"] >= 0.95  # one row per micro-batch: no padding rows
    step = next(pipe)
    real = sum(int((b["segment_ids"] > 0).sum()) for b in step.microbatches)
    assert real == step.num_tokens and real / (len(step.microbatches) * 2048) >= 0.95


@pytest.mark.parametrize("name,path_fixture", [("qwen", "gsm8k"), ("llama", "oasst")])
def test_packed_streams_equal_unpacked_streams(name, path_fixture, tokenizers, cache, tmp_path, request):
    tok = tokenizers[name]
    # 96 GSM8K records or 39 OASST trees (208 conversations): whole steps of 16 samples.
    lines = open(request.getfixturevalue(path_fixture)).read().splitlines()[: 96 if name == "qwen" else 39]
    path = write_jsonl(tmp_path / "part.jsonl", lines)
    cfg = make_cfg(cache, [path], name, global_batch_size=16, micro_batch_rows=2, max_seq_len=1024 if name == "qwen" else 4096)
    pipe = DataPipeline(cfg, tok)
    n = pipe.samples_per_epoch
    assert n % 16 == 0 and pipe.steps_per_epoch == n // 16
    packed = [s for _ in range(pipe.steps_per_epoch) for s in unpacked_samples(next(pipe))]
    pipe.close()
    table = load_or_tokenize({**SOURCE_DEFAULTS, "path": str(path)}, tok, settings(name), cache)
    expected = []
    for i in range(len(table)):
        tokens, mask = (a.tolist() for a in table.sample(i))
        expected.append((tuple(tokens[:-1]), tuple(tokens[1:]), tuple(mask[1:])))
    assert collections.Counter(packed) == collections.Counter(expected)  # one epoch = every sample once


def test_steps_have_exact_sample_counts_and_shapes(tokenizers, cache, oasst):
    cfg = make_cfg(cache, [oasst], global_batch_size=24, micro_batch_rows=2, max_seq_len=1024)
    pipe = DataPipeline(cfg, tokenizers["qwen"], num_batch_devices=2)
    counts = set()
    for _ in range(pipe.steps_per_epoch + 2):  # crosses an epoch boundary
        step = next(pipe)
        assert step.num_samples == 24 and len(unpacked_samples(step)) == 24
        assert step.num_tokens == sum(int((b["segment_ids"] > 0).sum()) for b in step.microbatches)
        assert step.num_loss_tokens == int(sum(b["loss_mask"].sum() for b in step.microbatches)) > 0
        for b in step.microbatches:
            assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
                k: ((4, 1024), "float32" if k == "loss_mask" else "int32")
                for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
            }
            assert b["segment_ids"].max() <= 1024 and (b["segment_ids"] > 0).sum(axis=1).max() <= 1024
        counts.add(len(step.microbatches))
    pipe.close()
    assert len(counts) > 1  # the number of micro-batches per step varies with the samples' lengths
    assert step.epoch == pytest.approx((pipe.steps_per_epoch + 2) * 24 / pipe.samples_per_epoch)


def test_same_seed_same_order_reshuffled_per_epoch(tokenizers, cache, oasst):
    def first_samples(seed, steps):
        pipe = DataPipeline(make_cfg(cache, [oasst], global_batch_size=64, seed=seed, prefetch=0), tokenizers["qwen"])
        out = [unpacked_samples(next(pipe)) for _ in range(steps)]
        return out, pipe.steps_per_epoch

    a, steps_per_epoch = first_samples(0, 11)
    b, _ = first_samples(0, 11)
    c, _ = first_samples(1, 1)
    assert steps_per_epoch == 9  # 564 conversations, 64 per step
    assert a == b and a[0] != c[0]
    assert a[0] != a[steps_per_epoch + 1]  # epoch 1 starts with a different order


def test_resume_continues_at_exactly_the_next_step(tokenizers, cache, oasst):
    cfg = make_cfg(cache, [oasst], global_batch_size=64, prefetch=3)
    tok = tokenizers["qwen"]
    pipe = DataPipeline(cfg, tok)
    uninterrupted = [unpacked_samples(next(pipe)) for _ in range(12)]
    pipe.close()

    first = DataPipeline(cfg, tok)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    resumed = DataPipeline(cfg, tok)
    resumed.set_state(state)
    assert [unpacked_samples(next(resumed)) for _ in range(5)] == uninterrupted[7:]
    resumed.close()
    with pytest.raises(ValueError, match="global_batch_size"):
        DataPipeline(make_cfg(cache, [oasst], global_batch_size=32), tok).set_state(state)


def thread_allgather(count):
    """jax's allgather between processes, played by threads meeting at a barrier (the real
    multi-process exchange runs in tests/test_multihost.py)."""
    barrier, slots = threading.Barrier(count), [None] * count

    def for_process(p):
        def allgather(obj):
            slots[p] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out
        return allgather
    return for_process


def test_a_shard_decodes_only_its_own_records(tmp_path):
    records = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(records[0]), "{bad json", *map(json.dumps, records[2:])])
    source = {**SOURCE_DEFAULTS, "path": str(path)}
    first = read_source(source, system_prompt="", on_bad_record="error", shard=(0, 2))
    assert first.format == "gsm8k" and first.records == 3
    assert [(c.record, c.messages[0]["content"]) for c in first.conversations] == [(0, "q0"), (2, "q2"), (4, "q4")]
    with pytest.raises(DataError, match="d.jsonl, line 2: bad JSON"):
        read_source(source, system_prompt="", on_bad_record="error", shard=(1, 2))
    second = read_source(source, system_prompt="", on_bad_record="skip", shard=(1, 2))
    assert second.format == "gsm8k" and second.records == 2 and second.skipped == {"bad_json": 1}
    assert [c.record for c in second.conversations] == [3]


def test_each_process_reads_only_its_share_and_the_steps_match_one_process(tokenizers, cache, oasst):
    cfg = make_cfg(cache, [oasst], global_batch_size=40, micro_batch_rows=2, max_seq_len=1024, prefetch=0,
                   eval_fraction=0.1)
    whole = DataPipeline(cfg, tokenizers["qwen"], num_batch_devices=2)
    assert whole.summary["eval_samples"] > 10
    whole_steps = [next(whole) for _ in range(4)]
    exchange, parts = thread_allgather(2), [None, None]

    def build(p):
        parts[p] = DataPipeline(cfg, copy.deepcopy(tokenizers["qwen"]), num_batch_devices=2, process_index=p,
                                process_count=2, allgather=exchange(p))
    threads = [threading.Thread(target=build, args=(p,)) for p in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Process p tokenized and holds only the records numbered p mod 2: the two halves are the whole.
    held = [part._tables[0] for part in parts]
    assert [set((t.records % 2).tolist()) for t in held] == [{0}, {1}]
    assert len(held[0]) + len(held[1]) == len(whole._tables[0]) and min(len(held[0]), len(held[1])) > 200
    np.testing.assert_array_equal(np.sort(np.concatenate([t.records for t in held])), whole._tables[0].records)
    counts = ("sources", "records_read", "samples_read", "skipped", "truncated", "dropped", "train_samples_per_epoch",
              "eval_samples", "tokens_per_epoch", "loss_tokens_per_epoch", "steps_per_epoch")
    for part in parts:
        assert {k: part.summary[k] for k in counts} == {k: whole.summary[k] for k in counts}
        assert part.local_rows == 2 and whole.local_rows == 4

    with pytest.raises(ValueError, match="process 1 of 2 exchanged sample lengths with 1 process"):
        DataPipeline(cfg, tokenizers["qwen"], num_batch_devices=2, process_index=1, process_count=2)

    for step in whole_steps:
        mine = [next(part) for part in parts]
        for k in ("num_samples", "num_tokens", "num_loss_tokens"):
            assert getattr(mine[0], k) == getattr(mine[1], k) == getattr(step, k)
        assert len(mine[0].microbatches) == len(mine[1].microbatches) >= len(step.microbatches)
        assert all(b["input_ids"].shape == (2, 1024) for m in mine for b in m.microbatches)
        # Together the two processes hold exactly the step's samples, none twice.
        assert collections.Counter(unpacked_samples(mine[0]) + unpacked_samples(mine[1])) == collections.Counter(
            unpacked_samples(step))


# --- sources, mixtures, phases, eval ---


def test_epochs_and_weights_set_the_mixture(tokenizers, cache, gsm8k, oasst, tmp_path):
    tok = tokenizers["qwen"]
    small = write_jsonl(tmp_path / "small.jsonl", open(gsm8k).read().splitlines()[:100])
    pipe = DataPipeline(make_cfg(cache, [{"path": str(small), "epochs": 2.5}, {"path": oasst}], prefetch=0), tok)
    assert pipe.samples_per_epoch == 250 + 564
    order = pipe._epoch_order(0)
    small_ids = order[order < 100]
    assert len(small_ids) == 250 and sorted(collections.Counter(small_ids.tolist()).values()) == [2] * 50 + [3] * 50

    pipe = DataPipeline(make_cfg(cache, [{"path": str(small), "weight": 1.0}, {"path": oasst, "weight": 3.0}], prefetch=0), tok)
    order = pipe._epoch_order(0)
    assert pipe.samples_per_epoch == 664 and (order < 100).sum() == round(664 / 4)


def test_phased_mode_runs_phases_in_order_with_replay(tokenizers, cache, gsm8k, oasst, tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", open(gsm8k).read().splitlines()[:200])
    cfg = make_cfg(cache, [], mode="phased", prefetch=0, phases=[
        {"sources": [{"path": str(small)}]},
        {"sources": [{"path": oasst}], "epochs": 2, "replay_fraction": 0.2},
    ])
    pipe = DataPipeline(cfg, tokenizers["qwen"])
    order = pipe._epoch_order(0)
    phase_two = 2 * 564
    replay = round(phase_two * 0.2 / 0.8)
    assert pipe.samples_per_epoch == 200 + phase_two + replay
    assert (order[:200] < 200).all() and sorted(order[:200].tolist()) == list(range(200))
    assert (order[200:] < 200).sum() == replay  # earlier-phase samples mixed into phase two
    assert pipe.summary["steps_per_epoch"] == -(-pipe.samples_per_epoch // 64)


def test_eval_fraction_holds_out_whole_records_seen_exactly_once(tokenizers, cache, oasst):
    pipe = DataPipeline(make_cfg(cache, [oasst], global_batch_size=32, eval_fraction=0.1, micro_batch_rows=2, max_seq_len=1024), tokenizers["qwen"])
    records = pipe._tables[0].records
    held = set(records[pipe._eval_ids].tolist())
    train_ids = set(pipe._epoch_order(0).tolist())
    assert len(held) == 10  # 10 of the 100 conversation trees, with every path of each
    assert not train_ids & set(pipe._eval_ids.tolist()) and not held & set(records[sorted(train_ids)].tolist())
    assert pipe.summary["eval_samples"] == int(np.isin(records, sorted(held)).sum()) > 10
    assert pipe.samples_per_epoch == 564 - pipe.summary["eval_samples"]
    batches = pipe.eval_microbatches()
    assert all(b["input_ids"].shape == (2, 1024) for b in batches)
    samples = unpacked_samples(batches)
    assert len(samples) == pipe.summary["eval_samples"]  # each once (paths cut at 1024 tokens may coincide)
    assert unpacked_samples(pipe.eval_microbatches()) == samples
    pipe.close()


def test_the_held_out_records_do_not_depend_on_the_tokenizer_or_length(tokenizers, cache, gsm8k, oasst):
    held_out = {}
    for path, fraction in ((gsm8k, 0.01), (oasst, 0.1)):
        for name, max_seq_len in (("qwen", 2048), ("llama", 2048), ("qwen", 512), ("llama", 512)):
            cfg = make_cfg(cache, [path], name, eval_fraction=fraction, max_seq_len=max_seq_len, prefetch=0)
            pipe = DataPipeline(cfg, tokenizers[name])
            records = pipe._tables[0].records
            held = sorted(set(records[pipe._eval_ids].tolist()))
            assert not set(held) & set(records[pipe._epoch_order(0)].tolist())  # no record on both sides
            held_out.setdefault(path, []).append(held)
    assert len(held_out[gsm8k][0]) == 75 and len(held_out[oasst][0]) == 10
    for runs in held_out.values():
        assert all(run == runs[0] for run in runs)


def test_eval_sources(tokenizers, cache, gsm8k, assets):
    cfg = make_cfg(cache, [gsm8k], global_batch_size=512, eval_sources=[{"path": str(assets / "data/gsm8k/test.jsonl")}])
    pipe = DataPipeline(cfg, tokenizers["qwen"])
    assert pipe.summary["eval_samples"] == 1319 and pipe.samples_per_epoch == 7473
    assert len(unpacked_samples(pipe.eval_microbatches())) == 1319
    pipe.close()


def test_overlength_truncate_and_drop_are_counted(tokenizers, cache, oasst):
    tok = tokenizers["qwen"]
    lengths = np.diff(load_or_tokenize({**SOURCE_DEFAULTS, "path": oasst}, tok, settings("qwen"), cache).offsets) - 1
    over = int((lengths > 256).sum())
    truncated = DataPipeline(make_cfg(cache, [oasst], max_seq_len=256, prefetch=0), tok)
    dropped = DataPipeline(make_cfg(cache, [oasst], max_seq_len=256, on_overlength="drop", prefetch=0), tok)
    t, d = truncated.summary, dropped.summary
    assert t["truncated"] + t["dropped"]["no_loss_after_truncation"] == over > 100
    assert t["dropped"]["no_loss_after_truncation"] > 0
    assert t["train_samples_per_epoch"] == 564 - t["dropped"]["no_loss_after_truncation"]
    assert d["dropped"]["over_length"] == over and d["train_samples_per_epoch"] == 564 - over and d["truncated"] == 0
    for samples in (unpacked_samples(next(truncated)), unpacked_samples(next(dropped))):
        assert all(0 < sum(loss) and len(ids) <= 256 for ids, _, loss in samples)


def test_other_formats_files_and_globs(tokenizers, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = tokenizers["qwen"]
    write_jsonl(tmp_path / "a-1.jsonl", [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}])
    write_jsonl(tmp_path / "a-2.jsonl", [{"instruction": "Translate.", "input": "chat", "output": "cat"}])
    with gzip.open(tmp_path / "a-3.jsonl.gz", "wt") as f:
        f.write(json.dumps({"instruction": "Spell 7.", "output": "seven"}) + "\n")
    (tmp_path / "pc.json").write_text(json.dumps([{"prompt": "Capital of France?", "completion": "Paris"}]))
    pq.write_table(pa.table({"q": ["Why?"], "a": ["Because."]}), tmp_path / "qa.parquet")
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"}]}])
    cfg = make_cfg(tmp_path / "cache", [
        {"path": str(tmp_path / "a-*.jsonl*")},
        {"path": str(tmp_path / "pc.json")},
        {"path": str(tmp_path / "qa.parquet"), "format": "columns", "columns": {"prompt": "q", "completion": "a"}},
        {"path": str(tmp_path / "chat.jsonl")},
    ], global_batch_size=6, system_prompt="You are terse.", prefetch=0)
    pipe = DataPipeline(cfg, tok)
    assert [s["format"] for s in pipe.summary["sources"]] == ["alpaca", "prompt_completion", "columns", "chat"]
    assert pipe.samples_per_epoch == 6
    labels = sorted(tok.decode([t for t, m in zip(tg, lm) if m]) for _, tg, lm in unpacked_samples(next(pipe)))
    assert labels == ["5<|im_end|>", "Because.<|im_end|>", "Hello<|im_end|>Goodbye<|im_end|>", "Paris<|im_end|>",
                      "cat<|im_end|>", "seven<|im_end|>"]
    table = load_or_tokenize({**SOURCE_DEFAULTS, "path": str(tmp_path / "a-2.jsonl")}, tok, settings("qwen"), tmp_path)
    assert "You are Qwen" in tok.decode(table.tokens)  # system_prompt '' keeps the template's default
    assert "Translate.\n\nchat" in tok.decode(table.tokens)


def test_json_layouts_and_line_separators_inside_strings(tmp_path):
    record = {"prompt": "a\u2028b\x85c", "completion": "d"}
    (tmp_path / "x.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n\n" + json.dumps(record) + "\n")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [record, record]}))
    (tmp_path / "one.json").write_text(json.dumps({"messages": GOOD["messages"]}))
    read = {name: read_source({**SOURCE_DEFAULTS, "path": str(tmp_path / name)}, system_prompt="", on_bad_record="error")
            for name in ("x.jsonl", "wrapped.json", "one.json")}
    assert [len(r.conversations) for r in read.values()] == [2, 2, 1]
    assert read["x.jsonl"].conversations[1].where.endswith("x.jsonl, line 3")
    assert read["x.jsonl"].conversations[0].prompt_completion == ("a\u2028b\x85c", "d")
    assert read["one.json"].format == "chat"


def test_hub_names_are_told_from_paths(tmp_path):
    assert is_hub_name("openai/gsm8k") and is_hub_name("gsm8k")
    assert not is_hub_name("data/train.jsonl") and not is_hub_name("gs://bucket/x/*.parquet")
    assert not is_hub_name(str(tmp_path)) and not is_hub_name("data/part-*")


# --- bad input ---

BAD_RECORDS = {
    "bad_json": ('{"messages": [', None),
    "missing_field": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "messages[1].content"),
    "unknown_role": ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "messages[1].role"),
    "empty_content": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "messages[1].content"),
    "non_string_content": ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "messages[0].content"),
    "no_assistant_turn": ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
}
GOOD = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
def test_bad_record_error_names_file_line_and_field(reason, tokenizers, tmp_path):
    record, field = BAD_RECORDS[reason]
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, record, GOOD])
    with pytest.raises(DataError) as error:
        DataPipeline(make_cfg(tmp_path / "cache", [path], global_batch_size=2), tokenizers["qwen"])
    message = str(error.value)
    assert f"{path}, line 3" in message
    assert (f"field '{field}'" in message) if field else "bad JSON" in message
    assert error.value.reason == reason


def test_skip_counts_bad_records_by_reason(tokenizers, tmp_path):
    records = [GOOD] + [r for r, _ in BAD_RECORDS.values()] + [BAD_RECORDS["unknown_role"][0], GOOD]
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    pipe = DataPipeline(make_cfg(tmp_path / "cache", [path], global_batch_size=2, on_bad_record="skip"), tokenizers["qwen"])
    assert pipe.summary["skipped"] == {reason: 2 if reason == "unknown_role" else 1 for reason in BAD_RECORDS}
    assert pipe.summary["records_read"] == 9 and pipe.samples_per_epoch == 2


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.gz"])
def test_non_utf8_line_is_a_bad_record_and_a_bom_is_accepted(name, tmp_path):
    good = json.dumps(GOOD).encode() + b"\n"
    data = b"\xef\xbb\xbf" + good + b'{"messages": "caf\xe9"}\n' + good  # BOM; line 2 in Latin-1
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    source = {**SOURCE_DEFAULTS, "path": str(path)}
    with pytest.raises(DataError, match=rf"{path}, line 2: not UTF-8 text"):
        read_source(source, system_prompt="", on_bad_record="error")
    read = read_source(source, system_prompt="", on_bad_record="skip")
    assert read.format == "chat" and read.records == 3 and read.skipped == {"not_utf8": 1}
    assert [c.where.rsplit(", ", 1)[1] for c in read.conversations] == ["line 1", "line 3"]


@pytest.mark.slow
def test_a_large_jsonl_streams_in_bounded_memory(tokenizers, tmp_path, gsm8k, assets):
    """The same 200 GSM8K records, once plain (<0.1 MB) and once each padded with a 2.5 MB field
    the format ignores (500 MB): tokenizing and caching either takes the same peak memory (also
    measured at 10 MB x 200 = 2 GB: 650 MB peak for both)."""
    records = [json.loads(x) for x in open(gsm8k).read().splitlines()[:200]]
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    write_jsonl(small, records)
    padding = "x" * (5 << 19)
    with open(big, "w") as f:
        for r in records:
            f.write(json.dumps({**r, "padding": padding}) + "\n")
    assert big.stat().st_size > 5e8
    script = (
        "import json, resource, sys\n"
        "from transformers import AutoTokenizer\n"
        "from jaxsft.data.config import SOURCE_DEFAULTS\n"
        "from jaxsft.data.tokenize import load_or_tokenize\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[2])\n"
        "settings = dict(render='chat_template', loss_on='all_assistant', system_prompt='', on_bad_record='error',"
        " template_kwargs={})\n"
        "table = load_or_tokenize({**SOURCE_DEFAULTS, 'path': sys.argv[1], 'format': 'gsm8k'}, tok, settings, sys.argv[3])\n"
        "print(json.dumps({'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
        "'samples': len(table), 'tokens': int(table.offsets[-1])}))\n")
    results = {}
    for path in (small, big):
        r = subprocess.run([sys.executable, "-c", script, str(path), str(assets / "tokenizers/qwen2.5-0.5b-instruct"),
                            str(tmp_path / f"cache-{path.stem}")], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": REPO})
        assert r.returncode == 0, r.stderr[-3000:]
        results[path.stem] = json.loads(r.stdout.strip().splitlines()[-1])
    print("peak RSS (MB):", {k: round(v["rss_mb"]) for k, v in results.items()})
    assert results["big"]["samples"] == results["small"]["samples"] == 200
    assert results["big"]["tokens"] == results["small"]["tokens"]
    # One 2.5 MB line (and its decoded copy) at a time: far below the file's 500 MB.
    assert results["big"]["rss_mb"] - results["small"]["rss_mb"] < 150, results


def test_template_refusing_a_record_is_a_bad_record(assets, tmp_path):
    tok = AutoTokenizer.from_pretrained(assets / "tokenizers/qwen2.5-0.5b-instruct")
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with_system = {"messages": [{"role": "system", "content": "Hi"}, *GOOD["messages"]]}
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, with_system, GOOD])
    with pytest.raises(DataError, match=r"t.jsonl, line 2, field 'messages': the chat template refused it: no system messages"):
        DataPipeline(make_cfg(tmp_path / "cache", [path], global_batch_size=2), tok)
    pipe = DataPipeline(make_cfg(tmp_path / "cache", [path], global_batch_size=2, on_bad_record="skip"), tok)
    assert pipe.summary["skipped"] == {"template_error": 1} and pipe.samples_per_epoch == 2


def test_oasst_tree_errors_name_the_nested_field(tokenizers, tmp_path):
    tree = {"message_tree_id": "t", "prompt": {"role": "prompter", "text": "Hi", "replies": [
        {"role": "assistant", "text": "Hello", "replies": []}, {"role": "robot", "text": "x", "replies": []}]}}
    path = write_jsonl(tmp_path / "tree.jsonl", [tree])
    with pytest.raises(DataError, match=r"line 1, field 'prompt.replies\[1\].role': unknown role 'robot'"):
        DataPipeline(make_cfg(tmp_path / "cache", [path], format="oasst"), tokenizers["qwen"])


def test_config_validation_names_the_key():
    cfg = default_data_config()
    with pytest.raises(ValueError, match="data.sources is empty"):
        validate_data_config(cfg)
    cfg.sources = [{"path": "x.jsonl", "weight": 1.0, "epochs": 2}]
    with pytest.raises(ValueError, match=r"data.sources\[0\]: set weight or epochs"):
        validate_data_config(cfg)
    cfg.sources = [{"path": "x.jsonl", "colums": {}}]
    with pytest.raises(ValueError, match=r"data.sources\[0\] has unknown keys \['colums'\]"):
        validate_data_config(cfg)
    cfg.sources = [{"path": "x.parquet", "format": "columns", "columns": {"prompt": "q"}}]
    with pytest.raises(ValueError, match=r"data.sources\[0\].columns must map 'prompt' and 'completion'"):
        validate_data_config(cfg)
    cfg.sources = [{"path": "x.jsonl"}]
    cfg.loss_on = "assistant"
    with pytest.raises(ValueError, match="data.loss_on"):
        validate_data_config(cfg)
    cfg.loss_on = "all_assistant"
    cfg.micro_batch_rows = 3
    validate_data_config(cfg)
    with pytest.raises(ValueError, match="not divisible by process_count 2"):
        DataPipeline(cfg, None, process_count=2)


# --- cache ---


def test_second_build_reads_the_cache_without_tokenizing(tokenizers, tmp_path, gsm8k, monkeypatch):
    calls = []
    real = tokenize_module.tokenized
    monkeypatch.setattr(tokenize_module, "tokenized", lambda *a, **k: calls.append(1) or real(*a, **k))
    source = write_jsonl(tmp_path / "part.jsonl", open(gsm8k).read().splitlines()[:50])
    cfg = make_cfg(tmp_path / "cache", [source], global_batch_size=8, prefetch=0)
    first = DataPipeline(cfg, tokenizers["qwen"])
    assert calls == [1]
    second = DataPipeline(cfg, tokenizers["qwen"])
    assert calls == [1] and second.summary == first.summary
    assert unpacked_samples(next(first)) == unpacked_samples(next(second))
    cfg.loss_on = "last_assistant"  # a setting that changes the tokens' masks
    DataPipeline(cfg, tokenizers["qwen"])
    write_jsonl(source, open(gsm8k).read().splitlines()[:51])  # new file contents
    DataPipeline(cfg, tokenizers["qwen"])
    assert calls == [1, 1, 1]


# --- command line ---


def test_cli_prints_summary_and_marked_rows(assets, tmp_path, oasst):
    config = tmp_path / "cfg.py"
    config.write_text(f"""
import ml_collections
from jaxsft.data import default_data_config

def get_config():
    data = default_data_config()
    data.sources = [{{'path': {oasst!r}}}]
    data.cache_dir = {str(tmp_path / 'cache')!r}
    return ml_collections.ConfigDict({{'model': {{'path': {str(assets / 'tokenizers/qwen2.5-0.5b-instruct')!r}}}, 'data': data}})
""")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "jaxsft.data", "--config", str(config), "--config.data.global_batch_size=16"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    summary = json.loads(out[: out.index("\n}\n") + 2])
    assert summary["samples_read"] == 564 and summary["global_batch_size"] == 16
    rows = out[out.index("\n}\n") + 3 :]
    assert rows.startswith("--- row 0, sample 1") and "--- row 1, sample 1" in rows
    assert "<|im_start|>assistant\n[[" in rows and "<|im_end|>]]\n" in rows
    bad = subprocess.run(cmd + ["--config.data.loss_on=everything"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "error: data.loss_on is 'everything'" in bad.stderr


def test_cli_loads_the_tokenizer_as_training_does_gguf_quickstart(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "jaxsft.data", "--config", os.path.join(repo, "configs/smollm2_gsm8k.py"),
           f"--config.data.cache_dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True,
                         cwd=repo).stdout
    summary = json.loads(out[: out.index("\n}\n") + 2])
    assert summary["records_read"] == 2000 and summary["eval_samples"] == 40  # 2% of the records held out
    assert "<|im_start|>assistant\n[[" in out and "<|im_end|>]]" in out  # SmolLM2's ChatML, from the GGUF file
