"""python -m jaxsft.train --config configs/NAME.py [--config.section.key=value ...]"""

import logging

from jaxsft.cli import UsageError, parse_args
from jaxsft.train import run


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config, _ = parse_args(argv)
    try:
        result = run(config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(summary_line(result))


def summary_line(result: dict) -> str:
    """The run's end in one line: training loss, and held-out loss and accuracy at their first and last evaluation."""
    parts = [f"{result['steps']} steps", f"training loss {result['loss']:.4g}" if "loss" in result else ""]
    for name, history in (("held-out loss", result["eval_losses"]), ("GSM8K accuracy", result["gsm8k_accuracy"])):
        if history:
            ends = [history[0], history[-1]] if len(history) > 1 else history
            parts.append(f"{name} " + " -> ".join(f"{value:.4g} (step {step})" for step, value in ends))
    return "done: " + "; ".join(p for p in parts if p)


if __name__ == "__main__":
    main()
