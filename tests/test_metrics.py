"""Metrics: FLOP count by hand, MFU peak table, spike detector, health checks; and one small real
run showing that a registered metric and sink need no train-loop change and that a NaN stops the
run with the last good checkpoint intact."""

import json
import os
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


def tiny_model(tmp_path):
    """The demo model's files with a much smaller body (the 152k vocabulary dominates anyway)."""
    src = os.path.join(REPO, "configs/assets/tiny-qwen2")
    model = tmp_path / "model"
    shutil.copytree(src, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
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
