"""Online health checks of a run: NaN or Inf in the loss, gradients or parameters, loss spikes and
gradient-norm blow-ups. What each check does when it fires is set in the config's `health`
section: `stop` (raise `TrainingDiverged`), `warn` (flag the step in the metrics and on the
console) or `off`.

A spike is a value above `ratio` times the median of the previous `window` finite values; the
median, unlike a mean, is not dragged up by the spike's own neighbours.
"""

from __future__ import annotations

import collections
import logging
import math

import numpy as np

log = logging.getLogger("jaxsft.health")

ACTIONS = ("stop", "warn", "off")
# A median of one or two values is noise: judge only with this much history.
MIN_HISTORY = 5


class TrainingDiverged(ValueError):
    """Stops a run; the message names the step, the check and the values."""


def is_spike(value: float, history, ratio: float) -> bool:
    return len(history) >= MIN_HISTORY and value > ratio * float(np.median(history))


def spikes(series, window: int, ratio: float) -> list[bool]:
    """Which values of a series are spikes against the rolling median of the ones before."""
    history = collections.deque(maxlen=window)
    flags = []
    for x in series:
        flags.append(math.isfinite(x) and is_spike(x, history, ratio))
        if math.isfinite(x):
            history.append(x)
    return flags


class HealthMonitor:
    """`check(step, metrics)` after every step, in order; returns the metrics with an `alerts`
    list added when a check fired, or raises `TrainingDiverged` for a check set to `stop`."""

    def __init__(self, health):
        self.health = health
        self.history = {k: collections.deque(maxlen=health.spike_window) for k in ("loss", "grad_norm")}

    def check(self, step: int, metrics: dict) -> dict:
        h = self.health
        alerts = []
        # The parameter norm is of the params this step produced: a step whose update blows them
        # up is caught before they are checkpointed, not one step later through the loss.
        values = {k: metrics[k] for k in ("loss", "grad_norm", "param_norm")}
        if h.on_nan != "off" and not all(map(math.isfinite, values.values())):
            shown = " ".join(f"{k}={v}" for k, v in values.items())
            self._fire(h.on_nan, "nan", alerts,
                       f"step {step}: not finite: {shown} (health.on_nan='{h.on_nan}'); this step's "
                       "parameters were not saved, the newest checkpoint holds the last good state")
        for key, field, ratio in (("loss", "on_loss_spike", h.loss_spike_ratio),
                                  ("grad_norm", "on_grad_spike", h.grad_spike_ratio)):
            value, history, action = metrics[key], self.history[key], h[field]
            if action != "off" and math.isfinite(value) and is_spike(value, history, ratio):
                self._fire(action, f"{key}_spike", alerts,
                           f"step {step}: {key} spike {value:.4g} > {ratio:g} x median "
                           f"{np.median(history):.4g} of the previous {len(history)} steps "
                           f"(health.{field}='{action}')")
            if math.isfinite(value):
                history.append(value)
        return {**metrics, "alerts": alerts} if alerts else metrics

    @staticmethod
    def _fire(action, name, alerts, message):
        if action == "stop":
            raise TrainingDiverged(message)
        log.warning(message)
        alerts.append(name)
