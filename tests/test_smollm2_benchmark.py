"""benchmarks/smollm2_gsm8k.py --dry-run: the full size's code path (two recipes back to back,
evals before and after, the result JSON) on a tiny model, in a subprocess as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_dry_run_writes_every_figure_per_recipe(tmp_path):
    out = tmp_path / "result.json"
    # One CPU device, as a user runs it (not the suite's 8 simulated ones).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "smollm2_gsm8k.py"), "--dry-run",
                    "--runs-dir", str(tmp_path / "runs"), "--out", str(out)],
                   check=True, cwd=tmp_path, env=env, timeout=600)
    record = json.loads(out.read_text())
    assert record["dry_run"] and record["size"] == "full"
    assert list(record["recipes"]) == ["paper", "tulu"]
    paper, tulu = record["recipes"]["paper"], record["recipes"]["tulu"]
    assert (paper["schedule"], paper["learning_rate"], paper["warmup_fraction"]) == ("constant", 2e-5, 0.0)
    assert (tulu["schedule"], tulu["warmup_fraction"]) == ("warmup_linear", 0.03)
    assert tulu["learning_rate"] > paper["learning_rate"]
    assert (paper["samples_per_step"], tulu["samples_per_step"]) == (4, 2)  # the dry run's batches
    for r in (paper, tulu):
        assert r["steps"] == 2 and r["wall_s"] > 0 and r["train_tokens_per_s"] > 0
        assert r["held_out_loss"]["before"] > 0 and r["held_out_loss"]["after"] > 0
        for when in ("base", "fine_tuned"):
            e = r[when]
            assert e["problems"] == 6 and e["primary_metric"] == "flexible-extract"
            assert e["generation_tokens_per_s"] > 0
            for metric in ("strict_match", "flexible_extract"):
                m = e[metric]
                assert m["accuracy"] == m["correct"] / 6
                lo, hi = m["ci95"]
                assert 0 <= lo <= m["accuracy"] <= hi <= 1 and hi - lo > 0.2  # 6 problems: a wide interval
    # The same random base model in both recipes: identical base answers.
    assert paper["base"] == {**tulu["base"], "generation_tokens_per_s": paper["base"]["generation_tokens_per_s"],
                             "generation_s": paper["base"]["generation_s"]}


def test_wilson_interval():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from smollm2_gsm8k import wilson_interval

    # The interval is the set of p with (13/1319 - p)^2 <= z^2 p (1 - p) / 1319; its ends, found
    # numerically (scipy's brentq on that equation), are 0.005769 and 0.016790.
    lo, hi = wilson_interval(13, 1319)
    assert abs(lo - 0.005769) < 1e-6 and abs(hi - 0.016790) < 1e-6
    assert wilson_interval(0, 6)[0] == 0 and abs(wilson_interval(0, 6)[1] - 0.390334) < 1e-6
