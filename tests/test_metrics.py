"""Metrics: FLOP count by hand, MFU peak table, spike detector, health checks; and one small real
run showing that a registered metric and sink need no train-loop change and that a NaN stops the
run with the last good checkpoint intact."""

import json
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from jaxsft import metrics
from jaxsft.metrics.health import HealthMonitor, TrainingDiverged, spikes
from jaxsft.models import ModelConfig
from jaxsft.train import default_config, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flops_match_a_hand_computation():
    c = ModelConfig(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=8, intermediate_size=16,
                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    # q, k, v: 8 x (2 + 1 + 1) x 4 = 128; o: 2 x 4 x 8 = 64; gate/up/down: 3 x 8 x 16 = 384; head: 8 x 10 = 80.
    assert metrics.matmul_params(c) == 128 + 64 + 384 + 80
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2, 2, 0, 0]])  # two samples of 3 and 5 tokens, then padding
    lengths = metrics.segment_lengths(segment_ids)
    assert sorted(lengths) == [3, 5]
    # 6 FLOPs per matmul parameter per token, plus causal attention: 3 (fwd + bwd) x layers x
    # 4 x heads x head_dim per (query, key) pair; 3*4/2 + 5*6/2 = 21 pairs.
    assert metrics.step_flops(c, lengths) == 6 * 656 * 8 + 3 * 1 * 4 * 2 * 4 * 21


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("cpu", None)])
def test_mfu_peak_table(kind, peak):
    assert metrics.peak_flops_per_device(types.SimpleNamespace(device_kind=kind)) == peak


def test_spike_detector_on_a_synthetic_series():
    rng = np.random.default_rng(0)
    series = list(3.0 - 0.01 * np.arange(60) + 0.05 * rng.standard_normal(60))
    series[30], series[45] = 6.0, 4.0  # a spike (2x), and a bump under the 1.5x ratio
    series[2] = 9.0  # too early to judge: fewer than 5 values of history
    flags = spikes(series, window=20, ratio=1.5)
    assert [i for i, f in enumerate(flags) if f] == [30]
    assert not any(spikes([float("nan"), 1.0, 1.0, 1.0, 1.0, 1.0, 1.2], window=5, ratio=1.5))


def health(**changes):
    h = default_config().health
    h.update(changes)
    return h


def line(loss=2.0, grad_norm=1.0, param_norm=10.0):
    return {"loss": loss, "grad_norm": grad_norm, "param_norm": param_norm}


def test_health_monitor_flags_or_stops():
    m = HealthMonitor(health())
    for step in range(1, 7):
        assert "alerts" not in m.check(step, line())
    assert m.check(7, line(loss=5.0))["alerts"] == ["loss_spike"]
    assert m.check(8, line(grad_norm=50.0))["alerts"] == ["grad_norm_spike"]
    with pytest.raises(TrainingDiverged, match=r"step 9: not finite: loss=nan .*health.on_nan='stop'"):
        m.check(9, line(loss=float("nan")))
    with pytest.raises(TrainingDiverged, match="param_norm=inf"):
        m.check(9, line(param_norm=float("inf")))
    m = HealthMonitor(health(on_nan="warn", on_grad_spike="stop"))
    assert m.check(1, line(grad_norm=float("inf")))["alerts"] == ["nan"]
    for step in range(2, 8):
        m.check(step, line())
    with pytest.raises(TrainingDiverged, match="grad_norm spike 20 > 10 x median 1"):
        m.check(8, line(grad_norm=20.0))


def visible_scalars(logdir, tag):
    """(step, value) of `tag` as TensorBoard shows it: events read file by file in name order, and
    a SessionLog START at step N hides the earlier events at steps >= N."""
    import struct

    from tensorboardX.proto import event_pb2

    shown = {}
    for f in sorted(os.listdir(logdir)):
        data, i = open(os.path.join(logdir, f), "rb").read(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += n + 16
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                shown = {k: v for k, v in shown.items() if k[0] < event.step}
            for value in event.summary.value:
                if value.tag == tag:
                    shown[(event.step, len(shown))] = value.simple_value
    return [(step, value) for (step, _), value in sorted(shown.items())]


def test_a_resumed_run_replaces_the_tensorboard_steps_logged_after_its_checkpoint(tmp_path):
    first = metrics.standard_logger(str(tmp_path), 4, progress=False)
    for step in (1, 2, 3):  # killed after step 3 was logged, with its newest checkpoint at step 2
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = metrics.standard_logger(str(tmp_path), 4, progress=False, resumed_from=2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    assert visible_scalars(tmp_path / "tensorboard", "loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    # A fresh start over an old run directory shows only its own steps.
    again = metrics.standard_logger(str(tmp_path), 4, progress=False)
    again.log(1, {"loss": 7.0})
    again.close()
    assert visible_scalars(tmp_path / "tensorboard", "loss") == [(1, 7.0)]


class Clock:
    """Stands in for time.time in tqdm: each step takes 2 s."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_bar_shows_eta_and_latest_figures_from_a_resumed_step(monkeypatch):
    import io

    clock = Clock()
    monkeypatch.setattr("tqdm.std.time", clock)
    out = io.StringIO()  # not a terminal: one line per logged step
    bar = metrics.ConsoleSink(40, stream=out)
    bar.write(20, {"eval_loss": 3.25})  # a run resumed from step 20 evaluates first
    for step in (21, 22, 23):
        clock.now += 2.0
        bar.write(step, {"loss": 2.0 - step / 100, "tokens_per_s": 1500.0, "learning_rate": 1e-4,
                         **({"alerts": ["loss_spike"]} if step == 22 else {})})
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue()
    assert lines[0].startswith(" 50%|") and "20/40 [00:00<?, ?step/s, eval_loss=3.25]" in lines[0]
    # 2 s per step since the bar started at step 20: the 19 steps after step 21 take 38 s.
    assert "21/40 [00:02<00:38,  2.00s/step, loss=1.79 eval_loss=3.25 learning_rate=0.0001 tokens_per_s=1500]" in lines[1]
    assert lines[2].endswith("22/40 [00:04<00:36,  2.00s/step, loss=1.78 eval_loss=3.25 learning_rate=0.0001 "
                             "tokens_per_s=1500 alerts=LOSS_SPIKE]")
    assert "23/40 [00:06<00:34,  2.00s/step, loss=1.77 eval_loss=3.25 " in lines[3] and "alerts" not in lines[3]


def test_progress_bar_on_a_terminal_rewrites_one_line(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock = Clock()
    monkeypatch.setattr("tqdm.std.time", clock)
    out = Terminal()
    bar = metrics.ConsoleSink(3, stream=out)
    bar.write(0, {"eval_loss": 4.0})  # before the first step: no bar yet, its figure is kept
    assert out.getvalue() == ""
    for step in (1, 2, 3):
        clock.now += 1.0
        bar.write(step, {"loss": 1.0 / step})
    bar.close()
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("100%|") and "3/3 [00:02<00:00" in last and "loss=0.3333 eval_loss=4]" in last


def wandb_history(run_dir):
    """The history rows of an offline W&B run, read by W&B's own reader of its .wandb log."""
    r = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in r.stdout.splitlines()]
    [run] = [x["run"] for x in records if x["type"] == "run"]
    rows = [x["history"]["item"] for x in records if x["type"] == "history"]
    return run, [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


def test_wandb_offline_run_is_read_back_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    c = default_config()
    c.metrics.wandb.update(project="jaxsft-test", name="tiny", mode="offline")
    c.optim.learning_rate = 3e-4

    def logger(resumed_from=0):
        return metrics.standard_logger(str(tmp_path), 4, progress=False, resumed_from=resumed_from, config=c)

    first = logger()
    first.log_eval(0, {"eval_loss": 3.5})
    for step in (1, 2, 3):  # killed after step 3 was logged, with its newest checkpoint at step 2
        first.log(step, {"loss": 3.0 - step / 4, "grad_norm": 1.5, "alerts": ["loss_spike"]})
    first.close()
    resumed = logger(resumed_from=2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.log_eval(4, {"eval_loss": 2.25, "gsm8k_accuracy": 0.5})
    resumed.close()

    run_id = (tmp_path / "wandb_run_id").read_text()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # wandb names a run's folder offline-run-<second>-<id>, adding -1 when both runs start in one second.
    assert [bool(re.fullmatch(rf"offline-run-[\d_]+-{run_id}(-1)?", p.name)) for p in runs] == [True, True]
    run, rows = wandb_history(runs[0])
    assert run["run_id"] == run_id and run["project"] == "jaxsft-test" and run["display_name"] == "tiny"
    assert run["config"]["update"]["optim"]["learning_rate"] == 3e-4
    assert rows == [{"step": 0, "eval_loss": 3.5}, *({"step": s, "loss": 3.0 - s / 4, "grad_norm": 1.5} for s in (1, 2, 3))]
    run, rows = wandb_history(runs[1])
    assert run["run_id"] == run_id and run["resume"] is True
    assert rows == [{"step": 3, "loss": 30.0}, {"step": 4, "loss": 40.0},
                    {"step": 4, "eval_loss": 2.25, "gsm8k_accuracy": 0.5}]
    # A fresh start over the same directory is a new W&B run.
    logger().close()
    assert (tmp_path / "wandb_run_id").read_text() != run_id


def test_ecosystem_config_is_documented_and_validated():
    import jaxsft.train.config as module
    c = default_config()
    for key in ["compile_cache_dir", "push_to_hub", *(f"wandb.{k}" for k in c.metrics.wandb)]:
        assert f"`{key}`" in module.__doc__, key
    assert c.train.compile_cache_dir.endswith("/jaxsft/jax_compile") and c.metrics.wandb.mode == "online"
    c.model.path = "x"
    c.data.sources = [{"path": "train.jsonl"}]
    c.train.export_hf, c.train.push_to_hub = True, "me/tiny-sft"
    validate(c)
    for key, value, message in [
            ("metrics.wandb.mode", "cloud", "metrics.wandb.mode='cloud': choose one of online, offline, disabled"),
            ("train.push_to_hub", "my model", "train.push_to_hub='my model': give a Hub repo id 'owner/name'"),
            ("train.push_to_hub", "me/tiny-sft", "train.push_to_hub uploads the hf/ export: set train.export_hf=True")]:
        bad = default_config()
        bad.model.path = "x"
        section, *parents, leaf = key.split(".")
        node = bad[section]
        for p in parents:
            node = node[p]
        node[leaf] = value
        with pytest.raises(ValueError, match=re.escape(message)):
            validate(bad)


def test_health_config_is_documented_and_validated():
    import jaxsft.train.config as module
    c = default_config()
    for key in [*c.health, "stop_after_steps"]:
        assert f"`{key}`" in module.__doc__, key
    c.model.path = "x"
    c.health.on_loss_spike = "panic"
    with pytest.raises(ValueError, match="health.on_loss_spike='panic': choose one of stop, warn, off"):
        validate(c)


CONFIG_FILE = '''
import json, os
from jaxsft import metrics
from jaxsft.train import default_config

@metrics.register_metric
def tokens_per_sample(info):
    return {"tokens_per_sample": info.batch.num_tokens / info.batch.num_samples}

class FileSink:
    def __init__(self, path):
        self.file = open(path, "a")
    def write(self, step, m):
        self.file.write(json.dumps({"step": step, **m}) + "\\n")
    def close(self):
        self.file.close()

metrics.register_sink(lambda out, total, progress: FileSink(os.path.join(out, "custom.jsonl")))

def get_config():
    c = default_config()
    c.model.path = MODEL
    c.model.init = "random"
    c.model.compute_dtype = "float32"
    c.model.remat = "none"
    c.data.tokenizer = TOKENIZER
    c.data.sources = [{"path": DATA, "format": "gsm8k", "epochs": 0.01}]
    c.data.max_seq_len = 128
    c.data.global_batch_size = 2
    c.data.micro_batch_rows = 2
    c.optim.learning_rate = 1e-3
    c.train.num_steps = 6
    c.train.eval_at_start = False
    c.train.progress = False
    c.checkpoint.every_steps = 1
    return c
'''


def tiny_model(tmp_path, hidden_size=16):
    """The demo model's files with a much smaller body (the 152k vocabulary dominates anyway);
    `hidden_size=64` makes every projection's input a multiple of NF4's 64-value blocks (QLoRA)."""
    src = os.path.join(REPO, "configs/assets/tiny-qwen2")
    model = tmp_path / "model"
    shutil.copytree(src, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
    (model / "config.json").write_text(json.dumps(config))
    return model, src


@pytest.mark.slow
def test_registered_metric_and_sink_and_nan_stop_with_good_checkpoint(tmp_path):
    model, tokenizer = tiny_model(tmp_path)
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"MODEL = {str(model)!r}\nTOKENIZER = {tokenizer!r}\n"
                   f"DATA = {os.path.join(REPO, 'configs/assets/gsm8k/train.jsonl')!r}\n" + CONFIG_FILE)
    out = tmp_path / "run"

    def train(*args):
        return subprocess.run(
            [sys.executable, "-m", "jaxsft.train", "--config", str(cfg), f"--config.train.output_dir={out}",
             f"--config.data.cache_dir={tmp_path / 'cache'}", *args],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})

    # Stop at step 3 of 6: a registered metric and sink, no train-loop change.
    r = train("--config.train.stop_after_steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    first = (out / "metrics.jsonl").read_text().splitlines()
    lines = [json.loads(x) for x in first]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(x["tokens_per_sample"] == x["tokens"] / 2 for x in lines)
    custom = [json.loads(x) for x in (out / "custom.jsonl").read_text().splitlines()]
    assert [x["step"] for x in custom if "loss" in x] == [1, 2, 3] and "eval_loss" not in custom[-1]

    # An infinite learning rate poisons the params of step 4: the run stops there, unsaved.
    r = train("--config.optim.learning_rate=1e999")
    assert r.returncode != 0
    assert "step 4: not finite" in r.stderr and "last good state" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())[-1] == 3

    # The last good checkpoint restores and the run finishes (steps 1-3 are not run again).
    r = train()
    assert r.returncode == 0, r.stderr[-3000:]
    text = (out / "metrics.jsonl").read_text().splitlines()
    assert text[:3] == first
    lines = [json.loads(x) for x in text]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(x["loss"]) for x in lines)
