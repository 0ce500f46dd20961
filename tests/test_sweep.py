"""Sweeps: the grid, the early ranking rule, and a small real sweep (in a gs:// directory on the
fake GCS server) that prunes, resumes, skips finished runs, continues a pruned run by hand and
writes its report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from gcs_server import gcs_bucket  # noqa: F401  (the session fixture)
from jaxsft.sweep import decide, default_sweep_config, early_stats, plan, rank_runs, validate_sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_expands_the_grid():
    s = default_sweep_config()
    s.base.model.path = "x"
    s.output_dir = "/sweep"
    s.train_samples = 100
    s.batch_sizes, s.learning_rates = [8, 32], [1e-5, 1e-4]
    s.schedules, s.warmup_fractions = ["constant", "warmup_linear"], [0.0, 0.1]
    runs = plan(s)
    # constant never warms up: 2 x 2 x (1 constant + 2 warmup_linear)
    assert len(runs) == 12
    c = runs["bs32_lr0.0001_warmup_linear_wu0.1"]
    assert c.data.global_batch_size == 32 and c.optim.learning_rate == 1e-4
    assert c.optim.warmup_fraction == 0.1 and c.train.num_steps == 4  # ceil(100 / 32)
    assert c.train.output_dir == "/sweep/bs32_lr0.0001_warmup_linear_wu0.1"
    assert "bs8_lr1e-05_constant_wu0" in runs and "bs8_lr1e-05_constant_wu0.1" not in runs
    s.rungs = [0.5, 0.25]
    with pytest.raises(ValueError, match="rungs"):
        validate_sweep(s)


def test_early_stats_average_the_window_before_the_rung():
    metrics = {k: {"loss": 10.0 - k, "grad_norm": float(k)} for k in range(1, 21)}
    st = early_stats(metrics, fraction=0.5, window=0.25, total_steps=20)  # steps 6..10
    assert st == {"steps": [6, 10], "loss": 2.0, "grad_norm": 8.0}
    assert early_stats(metrics, 0.1, 0.01, 20)["steps"] == [2, 2]  # at least one step


def test_ranking_prefers_low_grad_norm_and_high_loss():
    stats = {"a": {"grad_norm": 1.0, "loss": 3.0},   # best on both
             "b": {"grad_norm": 2.0, "loss": 2.0},
             "c": {"grad_norm": 3.0, "loss": 2.5},
             "d": {"grad_norm": 4.0, "loss": 1.0}}   # worst on both
    scores = rank_runs(stats)
    assert scores["a"] == 0.0 and scores["d"] == 1.0 and scores["b"] == scores["c"] == 0.5
    _, stop = decide(stats, prune_fraction=0.5)
    assert stop == ["c", "d"]  # b and c tie; b has the lower gradient norm
    _, stop = decide(stats, prune_fraction=0.5, grad_weight=0.0)  # loss only
    assert stop == ["b", "d"]
    assert decide({"a": stats["a"]}, prune_fraction=0.9)[1] == []  # one run always survives


SWEEP_FILE = '''
from jaxsft.sweep import default_sweep_config

def get_config():
    s = default_sweep_config()
    b = s.base
    b.model.path = MODEL
    b.model.init = "random"
    b.model.compute_dtype = "float32"
    b.model.remat = "none"
    b.data.tokenizer = TOKENIZER
    b.data.sources = [{"path": DATA, "format": "gsm8k"}]
    b.data.eval_fraction = 0.002
    b.data.max_seq_len = 128
    b.data.micro_batch_rows = 2
    b.train.eval_at_start = False
    b.train.progress = False
    s.train_samples = 8
    s.batch_sizes = [2]
    s.learning_rates = [1e-3, 1e-2, 1e-1]
    s.rungs = [0.5]
    s.window = 0.5
    s.prune_fraction = 0.34
    return s
'''


def sweep_runner(tmp_path, *flags, out=None, hidden_size=16):
    """(out, sweep): the sweep of SWEEP_FILE on the tiny demo model (of `hidden_size`) in `out`
    (default `tmp_path/sweep`); `sweep(*args)` runs `python -m jaxsft.sweep` with `flags` and `args`
    and returns its sweep_state.json."""
    from test_metrics import tiny_model

    model, tokenizer = tiny_model(tmp_path, hidden_size)
    cfg = tmp_path / "sweep.py"
    cfg.write_text(f"MODEL = {str(model)!r}\nTOKENIZER = {tokenizer!r}\n"
                   f"DATA = {os.path.join(REPO, 'configs/assets/gsm8k/train.jsonl')!r}\n" + SWEEP_FILE)
    out = out or tmp_path / "sweep"

    def sweep(*args):
        r = subprocess.run(
            [sys.executable, "-m", "jaxsft.sweep", "--config", str(cfg), f"--config.output_dir={out}",
             f"--config.base.data.cache_dir={tmp_path / 'cache'}", *flags, *args],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(epath.Path(out / "sweep_state.json").read_text())
    return out, sweep


@pytest.mark.slow
def test_sweep_prunes_skips_finished_runs_continues_by_hand_and_reports(tmp_path, gcs_bucket):  # noqa: F811
    """In a gs:// sweep directory (the fake GCS server): runs, state, report and plots in the bucket."""
    out, sweep = sweep_runner(tmp_path, out=epath.Path(f"gs://{gcs_bucket}/{tmp_path.name}/sweep"))
    state = sweep()
    (rung,) = state["rungs"]
    assert len(rung["stopped"]) == 1 and len(rung["scores"]) == 3
    stopped = rung["stopped"][0]
    steps = {k: r["steps_done"] for k, r in state["runs"].items()}
    assert steps == {k: 2 if k == stopped else 4 for k in steps}
    assert (out / stopped / "checkpoints" / "2").exists()
    report = (out / "sweep_report.md").read_text()
    assert f"| {stopped} | 2/4 |" in report and "stopped at rung 0 (0.5): score" in report
    assert all(np.isfinite(v) for v in rung["scores"].values())  # ranked on the runs' metrics in the bucket
    goodputs = [float(x.split(" | ")[6].rstrip("%")) for x in report.splitlines() if x.startswith("| bs")]
    assert len(goodputs) == 3 and all(0 < g < 100 for g in goodputs), report
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and (out / "grad_norm.png").read_bytes()[:4] == b"\x89PNG"

    # Started again: nothing left to do, no run is touched.
    before = {k: (out / k / "metrics.jsonl").read_text() for k in steps}
    assert sweep() == state
    assert before == {k: (out / k / "metrics.jsonl").read_text() for k in steps}

    # The pruned run resumes from its checkpoint and finishes.
    state = sweep("--continue", stopped)
    assert state["runs"][stopped]["steps_done"] == 4
    lines = [json.loads(x) for x in (out / stopped / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert f"| {stopped} | 4/4 |" in (out / "sweep_report.md").read_text()


@pytest.mark.slow
def test_a_qlora_sweep_prunes_reports_and_trains_adapters_only(tmp_path):
    """The same sweep with QLoRA runs (r=4 on an NF4 base, a 2-learning-rate grid): ranked and pruned
    on the adapters' gradient norms; every run writes a PEFT adapter that loads onto the NF4 base
    model, and its merged export equals dequantized base + adapter, so the base never changed."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from jaxsft.models import load_model, peft_io
    from jaxsft.models.loading import model_for_run

    out, sweep = sweep_runner(tmp_path, "--config.base.lora.r=4", "--config.base.lora.alpha=8",
                              "--config.base.lora.base_quant=nf4", "--config.learning_rates=(0.01, 0.1)",
                              "--config.prune_fraction=0.5", "--config.base.train.export_hf=True",
                              "--config.base.train.export_dtype=float32", hidden_size=64)
    state = sweep()
    (rung,) = state["rungs"]
    assert sorted(rung["scores"]) == sorted(state["runs"]) and len(rung["stopped"]) == 1
    stopped = rung["stopped"][0]
    assert {k: r["steps_done"] for k, r in state["runs"].items()} == {k: 2 if k == stopped else 4 for k in state["runs"]}
    report = (out / "sweep_report.md").read_text()
    assert f"| {stopped} | 2/4 |" in report and "stopped at rung 0 (0.5): score" in report

    for name in state["runs"]:
        run = out / name
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(np.isfinite(x["grad_norm"]) and x["grad_norm"] > 0 for x in lines), lines
        c = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
        assert c.lora.r == 4
        base = model_for_run(c.model, seed=c.train.seed, base_quant=c.lora.base_quant)  # the run's start
        assert base.layers.q.packed[...].dtype == jnp.uint8
        with_adapter = peft_io.load_adapter(base, run / "adapter")
        b = np.asarray(with_adapter.lora.q.b[...])
        assert np.abs(b).max() > 0  # trained (B starts at zero)
        expected = jax.tree.leaves(nnx.state(peft_io.merged(with_adapter), nnx.Param))
        exported = jax.tree.leaves(nnx.state(load_model(run / "hf", dtype=jnp.float32), nnx.Param))
        assert len(expected) == len(exported)
        for e, x in zip(expected, exported):
            np.testing.assert_allclose(np.asarray(x), np.asarray(e), rtol=1e-6, atol=1e-7)
