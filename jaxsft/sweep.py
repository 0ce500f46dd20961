"""`python -m jaxsft.sweep --config configs/sweep_NAME.py`: a grid of runs (global batch size x
learning rate x schedule x warmup) with early pruning by the paper's rule, and a report.

`--continue RUN` trains one (pruned) run of the sweep to the end and rewrites the report.

Every run trains on the same data for the same number of samples (`train_samples`), so a run's
progress is measured as the fraction of that budget seen, whatever its batch size. At each rung
(a fraction of training) the live runs are ranked by their early dynamics over a window before
the rung:

    score = (grad_weight * rank(mean grad_norm, lowest first)
             + loss_weight * rank(mean loss, highest first)) / (grad_weight + loss_weight) / (n - 1)

(0 = best, 1 = worst; the paper finds a lower gradient norm and a *higher* loss early in training
predict the better final model). The `prune_fraction` with the worst scores are stopped
(successive halving over the rungs); their checkpoints stay, so `--continue RUN` can finish one
later. With `action='flag'` the decision is only recorded and every run still trains to the end:
the way to check the rule.

Runs go one after another in this process; each run's `train.stop_after_steps` stops it at a rung
without changing its schedule. The sweep can be killed and started again: runs resume from their
checkpoints, decisions already taken are kept (`sweep_state.json`), finished runs are skipped.

Sweep config fields (all required unless a default is given):

| key | meaning |
|---|---|
| `base` | A run config (`jaxsft.train.default_config()` with changes); its data, model and optimizer settings are shared by all runs. |
| `output_dir` | Sweep directory, local or `gs://`: one sub-directory per run, `sweep_state.json`, `sweep_report.md`, plots. |
| `train_samples` | Training samples per run; each run does ceil(train_samples / batch size) steps. |
| `batch_sizes`, `learning_rates`, `schedules`, `warmup_fractions` | The grid. `constant` means no warmup: it runs once per batch size and learning rate, with warmup 0. |
| `rungs` | Fractions of training where runs are ranked, e.g. `[0.25, 0.5]`. |
| `window` | The ranking averages the steps in the last `window` fraction of training before the rung (at least one step). |
| `prune_fraction` | Share of the live runs stopped at each rung (at least one run always survives). Default 0.5. |
| `grad_weight`, `loss_weight` | Weights of the two ranks in the score. Default 1.0 each. |
| `action` | `stop` (pruned runs stop) or `flag` (decisions recorded, all runs finish). Default `stop`. |
"""

from __future__ import annotations

import itertools
import json
import logging
import io
import math

import ml_collections
import numpy as np
from etils import epath

from jaxsft import rundir
from jaxsft.models import ConfigError
from jaxsft.train import default_config, run, validate

log = logging.getLogger("jaxsft.sweep")

ACTIONS = ("stop", "flag")


def default_sweep_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        base=default_config(), output_dir="runs/sweep", train_samples=0, batch_sizes=[],
        learning_rates=[], schedules=["constant"], warmup_fractions=[0.0], rungs=[0.25, 0.5],
        window=0.25, prune_fraction=0.5, grad_weight=1.0, loss_weight=1.0, action="stop"))


def validate_sweep(s) -> None:
    if s.action not in ACTIONS:
        raise ConfigError(f"action={s.action!r}: choose one of {', '.join(ACTIONS)}")
    if not (s.train_samples > 0 and s.batch_sizes and s.learning_rates):
        raise ConfigError("set train_samples > 0, batch_sizes and learning_rates")
    if list(s.rungs) != sorted(s.rungs) or not all(0 < r < 1 for r in s.rungs):
        raise ConfigError(f"rungs={list(s.rungs)} must increase within (0, 1)")
    if not (0 < s.window <= 1 and 0 <= s.prune_fraction < 1):
        raise ConfigError("window must be in (0, 1], prune_fraction in [0, 1)")
    if min(s.grad_weight, s.loss_weight) < 0 or s.grad_weight + s.loss_weight <= 0:
        raise ConfigError("grad_weight and loss_weight must be >= 0, not both 0")


def plan(s) -> dict[str, ml_collections.ConfigDict]:
    """Run name -> its full run config (without stop_after_steps)."""
    runs = {}
    for batch, lr, schedule, warmup in itertools.product(
            s.batch_sizes, s.learning_rates, s.schedules, s.warmup_fractions):
        warmup = 0.0 if schedule == "constant" else warmup
        c = ml_collections.ConfigDict(s.base.to_dict())
        c.data.global_batch_size = batch
        c.optim.learning_rate = float(lr)
        c.optim.schedule = schedule
        c.optim.warmup_steps, c.optim.warmup_fraction = 0, float(warmup)
        c.train.num_steps = math.ceil(s.train_samples / batch)
        name = f"bs{batch}_lr{lr:g}_{schedule}_wu{warmup:g}"
        c.train.output_dir = rundir.join(s.output_dir, name)
        runs[name] = c
    return runs


def rung_step(fraction: float, total_steps: int) -> int:
    return max(1, math.ceil(fraction * total_steps))


def read_jsonl(path) -> dict[int, dict]:
    """step -> line of a JSONL file, local or gs://; a step logged twice (a resumed run) keeps its last line."""
    p = epath.Path(path)
    if not p.exists():
        return {}
    return {x["step"]: x for x in map(json.loads, p.read_text().splitlines())}


def early_stats(metrics: dict[int, dict], fraction: float, window: float, total_steps: int) -> dict:
    """Mean loss and gradient norm over the window of training just before `fraction`."""
    hi = rung_step(fraction, total_steps)
    lo = min(hi - 1, math.ceil((fraction - window) * total_steps))
    steps = [metrics[k] for k in range(lo + 1, hi + 1) if k in metrics]
    return {"steps": [lo + 1, hi], "loss": float(np.mean([m["loss"] for m in steps])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in steps]))}


def rank_runs(stats: dict[str, dict], grad_weight=1.0, loss_weight=1.0) -> dict[str, float]:
    """Run -> score in [0, 1], lower is better: low gradient norm and high loss rank first."""
    names = list(stats)
    n = max(len(names) - 1, 1)
    by_grad = {k: i for i, k in enumerate(sorted(names, key=lambda k: stats[k]["grad_norm"]))}
    by_loss = {k: i for i, k in enumerate(sorted(names, key=lambda k: -stats[k]["loss"]))}
    total = grad_weight + loss_weight
    return {k: (grad_weight * by_grad[k] + loss_weight * by_loss[k]) / total / n for k in names}


def decide(stats: dict[str, dict], prune_fraction: float, grad_weight=1.0, loss_weight=1.0):
    """Returns (scores, the runs to stop): the worst `prune_fraction`, ties broken by grad norm."""
    scores = rank_runs(stats, grad_weight, loss_weight)
    order = sorted(scores, key=lambda k: (scores[k], stats[k]["grad_norm"]))
    n_stop = min(int(prune_fraction * len(order)), len(order) - 1)
    return scores, order[len(order) - n_stop:]


class Sweep:
    def __init__(self, s):
        validate_sweep(s)
        self.s = s
        self.runs = plan(s)
        for c in self.runs.values():  # a bad grid point fails now, not hours into the sweep
            validate(c)
        self.state_path = rundir.join(s.output_dir, "sweep_state.json")
        self.state = {"runs": {}, "rungs": []}
        if epath.Path(self.state_path).exists():
            self.state = json.loads(epath.Path(self.state_path).read_text())
        for k in self.runs:
            self.state["runs"].setdefault(k, {"steps_done": 0})

    def save_state(self):
        rundir.write_text(self.state_path, json.dumps(self.state, indent=1))

    def pruned(self) -> dict[str, int]:
        """Run -> index of the rung that stopped it."""
        return {k: i for i, r in enumerate(self.state["rungs"]) for k in r["stopped"]}

    def train(self, name: str, fraction: float):
        c = self.runs[name]
        target = rung_step(fraction, c.train.num_steps)
        record = self.state["runs"][name]
        if record["steps_done"] >= target:
            return
        c = ml_collections.ConfigDict(c.to_dict())
        c.train.stop_after_steps = target if target < c.train.num_steps else 0
        log.info("sweep: %s to step %d of %d", name, target, c.train.num_steps)
        result = run(c)
        record.update(steps_done=result["steps"], eval_loss=result["eval_loss"],
                      train_time_s=record.get("train_time_s", 0.0) + result["train_time_s"],
                      wall_time_s=record.get("wall_time_s", 0.0) + result["wall_time_s"])
        self.save_state()

    def metrics(self, name):
        return read_jsonl(rundir.join(self.runs[name].train.output_dir, "metrics.jsonl"))

    def run(self):
        s = self.s
        for i, fraction in enumerate([*s.rungs, 1.0]):
            stopped = self.pruned()
            for name in self.runs:
                if name not in stopped or s.action == "flag":
                    self.train(name, fraction)
            if i < len(s.rungs) and i == len(self.state["rungs"]):
                live = [k for k in self.runs if k not in stopped]
                stats = {k: early_stats(self.metrics(k), fraction, s.window, self.runs[k].train.num_steps)
                         for k in live}
                scores, stop = decide(stats, s.prune_fraction, s.grad_weight, s.loss_weight)
                self.state["rungs"].append({"fraction": fraction, "stats": stats, "scores": scores,
                                            "stopped": stop})
                self.save_state()
                log.info("sweep: rung %d (%.0f%% of training) stops %s", i, 100 * fraction, stop)
            self.write_report()

    def write_report(self):
        write_report(self)


def run_summary(sweep: Sweep, name: str) -> dict:
    c, record = sweep.runs[name], sweep.state["runs"][name]
    metrics = sweep.metrics(name)
    evals = read_jsonl(rundir.join(c.train.output_dir, "eval.jsonl"))
    last = metrics[max(metrics)] if metrics else {}
    wall = record.get("wall_time_s", 0.0)
    return {"steps": record["steps_done"], "total": c.train.num_steps, "loss": last.get("loss"),
            "eval_loss": evals[max(evals)]["eval_loss"] if evals else None,
            "tokens": sum(m["tokens"] for m in metrics.values()),
            # The steps' own time (no evals, saves or compiles) and its share of the runs' wall time.
            "time_s": record.get("train_time_s", 0.0), "goodput": record.get("train_time_s", 0.0) / wall if wall else None}


def write_report(sweep: Sweep):
    """sweep_report.md (a table and the rule check) and loss.png / grad_norm.png."""
    s, out = sweep.s, sweep.s.output_dir
    stopped = sweep.pruned()
    rungs = sweep.state["rungs"]
    summaries = {k: run_summary(sweep, k) for k in sweep.runs}
    rows = []
    for k, r in summaries.items():
        if k in stopped:
            rung = rungs[stopped[k]]
            st = rung["stats"][k]
            verb = "would stop" if s.action == "flag" else "stopped"
            decision = (f"{verb} at rung {stopped[k]} ({rung['fraction']:g}): score {rung['scores'][k]:.2f}, "
                        f"grad_norm {st['grad_norm']:.3g}, loss {st['loss']:.3g} over steps {st['steps'][0]}-{st['steps'][1]}")
        else:
            decision = "survives" + "".join(
                f"; rung {i} score {x['scores'][k]:.2f}" for i, x in enumerate(rungs) if k in x["scores"])
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        goodput = "-" if r["goodput"] is None else f"{r['goodput']:.0%}"
        rows.append(f"| {k} | {r['steps']}/{r['total']} | {fmt(r['loss'])} | {fmt(r['eval_loss'])} | "
                    f"{r['tokens']} | {r['time_s']:.0f} | {goodput} | {decision} |")
    lines = [f"# Sweep report: {out}", "",
             f"Runs: {len(sweep.runs)}; {s.train_samples} training samples each; rungs {list(s.rungs)} of "
             f"training; window {s.window:g}; prune fraction {s.prune_fraction:g}; score weights grad "
             f"{s.grad_weight:g}, loss {s.loss_weight:g}; action `{s.action}`.", "",
             "| run | steps | final train loss | eval loss | tokens | training time (s) | goodput | decision and evidence |",
             "|---|---|---|---|---|---|---|---|", *rows, ""]
    finished = {k: r["eval_loss"] for k, r in summaries.items()
                if r["steps"] == r["total"] and r["eval_loss"] is not None}
    if len(finished) == len(sweep.runs) and rungs:
        best = min(finished, key=finished.get)
        survivors = [k for k in sweep.runs if k not in stopped]
        lines += ["## Rule check", "",
                  f"Every run finished. Best final eval loss: {best} ({finished[best]:.4f}). "
                  f"Survivors: {', '.join(survivors)}. Do they include the best run? "
                  f"**{'yes' if best in survivors else 'no'}**.", ""]
    lines += ["![loss](loss.png)", "", "![grad norm](grad_norm.png)", ""]
    rundir.write_text(rundir.join(out, "sweep_report.md"), "\n".join(lines))
    plot_curves(sweep, stopped)


def plot_curves(sweep: Sweep, stopped: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key in ("loss", "grad_norm"):
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, c in sweep.runs.items():
            m = sweep.metrics(name)
            steps = sorted(m)
            x = [k / c.train.num_steps for k in steps]
            pruned = name in stopped
            ax.plot(x, [m[k][key] for k in steps], "--" if pruned else "-", label=name + (" (pruned)" if pruned else ""))
        for r in sweep.s.rungs:
            ax.axvline(r, color="grey", lw=0.5)
        ax.set(xlabel="fraction of training (samples seen)", ylabel=key, yscale="log" if key == "grad_norm" else "linear")
        ax.legend(fontsize=7)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        epath.Path(rundir.join(sweep.s.output_dir, f"{key}.png")).write_bytes(png.getvalue())
        plt.close(fig)


def main(argv=None):
    from jaxsft.cli import UsageError, exit_statuses, parse_args
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with exit_statuses():  # the statuses of python -m jaxsft.train
        s, flags = parse_args(argv, extra_flags=("continue",))
        sweep = Sweep(s)
        if "continue" in flags:  # a pruned run, trained to the end by hand
            if flags["continue"] not in sweep.runs:
                raise UsageError(f"--continue {flags['continue']}: no such run; runs: {', '.join(sweep.runs)}")
            sweep.train(flags["continue"], 1.0)
            sweep.write_report()
        else:
            sweep.run()
    print(rundir.join(s.output_dir, "sweep_report.md"))


if __name__ == "__main__":
    main()
