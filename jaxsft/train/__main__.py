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
    print({k: v for k, v in result.items() if k in ("steps", "loss", "eval_loss", "grad_norm")})


if __name__ == "__main__":
    main()
