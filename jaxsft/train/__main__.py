"""python -m jaxsft.train --config configs/NAME.py [--config.section.key=value ...]

Exit status: 0 done, 2 a config or usage mistake, 3 a checkpoint problem, 4 the run diverged,
75 preempted (the step it stopped at is saved: run the same command again), 1 anything else
(with its traceback). See `jaxsft.cli.exit_statuses`.
"""

import logging

from jaxsft.cli import exit_statuses, parse_args
from jaxsft.train import run


def main(argv=None):
    # force: importing orbax already configured the root logger (absl), which made this a no-op
    # and hid every INFO line (the data summary, "resumed from step N").
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("jaxsft").setLevel(logging.INFO)
    with exit_statuses():
        config, _ = parse_args(argv)
        result = run(config)
    print(summary_line(result))


def summary_line(result: dict) -> str:
    """The run's end in one line: training loss, and held-out loss, GSM8K accuracy and the share of
    GSM8K answers in `#### N` form at their first and last evaluation."""
    parts = [f"{result['steps']} steps", f"training loss {result['loss']:.4g}" if "loss" in result else ""]
    for name, history in (("held-out loss", result["eval_losses"]),
                          ("GSM8K accuracy (flexible-extract)", result["gsm8k_accuracy"]),
                          ("strict-match", result.get("gsm8k_strict_match", [])),
                          ("answers in `#### N` form", result.get("gsm8k_answer_form", []))):
        if history:
            ends = [history[0], history[-1]] if len(history) > 1 else history
            parts.append(f"{name} " + " -> ".join(f"{value:.4g} (step {step})" for step, value in ends))
    if "goodput" in result:
        parts.append(f"goodput {result['goodput']:.0%} ({result['train_time_s']:.0f} s training of "
                     f"{result['wall_time_s']:.0f} s)")
    return "done: " + "; ".join(p for p in parts if p)


if __name__ == "__main__":
    main()
