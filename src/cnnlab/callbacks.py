"""Keras's per-epoch callback decisions, as Keras 3.15 makes them: `EarlyStopper`
(keras.callbacks.EarlyStopping), `BestTracker` (ModelCheckpoint(save_best_only=True)) and
`PlateauScheduler` (ReduceLROnPlateau). The engine calls each once per epoch with the epoch's logs;
every decision is Keras's, checked against the real callbacks in tests/test_callbacks.py
(fixtures: tests/fixtures/keras_training/callbacks.json).

What Keras does, where it is easy to get wrong (keras/src/callbacks/*.py):

- An improvement is `monitor_op(current - min_delta, best)` with `min_delta` made negative for
  "min" (so `current + |min_delta| < best` or `current - |min_delta| > best`, strictly), and the
  comparison runs on backend tensors: both sides are float32, so values that differ only below
  float32 precision are ties. The first monitored value is always an improvement (best is None),
  even NaN, after which no value compares better than NaN: the run never improves again.
- EarlyStopping counts `wait` up before the comparison and resets it only when the epoch beats
  both its best and `baseline`. An epoch that beats its best never stops training, so with a
  baseline that is never beaten, a metric that keeps improving runs to the end. `baseline` is not
  the initial best. Nothing happens before `start_from_epoch`. With `restore_best_weights` the best
  weights are taken at each improvement and restored at the end of training whether or not it
  stopped early.
- ReduceLROnPlateau counts the cooldown down at the start of an epoch and counts `wait` in that
  same epoch once the counter reaches 0, so `cooldown=1` is the same as `cooldown=0`. The learning
  rate is a float32 variable: reducing reads it (float32), multiplies in float64, clamps to
  `min_lr` and stores float32; it reduces only while `lr > float32(min_lr)`. At `min_lr`, `wait`
  keeps growing and no cooldown starts.
- ModelCheckpoint(save_best_only=True) has no min_delta, starts from `initial_value_threshold`
  and saves on a strict improvement only.

A metric missing from the logs makes Keras warn and do nothing; cnnlab's monitors always exist,
so a missing one is a programming error here (ValueError).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cnnlab.options import BestCheckpoint, EarlyStopping, ReduceLROnPlateau, monitor_mode


def float32(value: float) -> float:
    """`value` rounded to the nearest float32, as a Python float (beyond float32's range: +-inf)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _number(value: float) -> str:
    return f"{value:.4g}"


class _Monitor:
    """A monitored metric and Keras's `MonitorCallback._is_improvement` for it."""

    def __init__(self, monitor: str, mode: str, min_delta: float) -> None:
        self.monitor = monitor
        self.maximise = monitor_mode(monitor, mode) == "max"
        # Keras: `self.min_delta = abs(min_delta)`, negated when the monitor op is `less`.
        self.min_delta = abs(min_delta) if self.maximise else -abs(min_delta)

    def value(self, logs: Mapping[str, float]) -> float:
        value = logs.get(self.monitor)
        if value is None:
            raise ValueError(f"monitor {self.monitor!r} is not in the logs (keys: {', '.join(logs) or 'none'})")
        return float(value)

    def improves(self, current: float, reference: float | None) -> bool:
        """Keras's `monitor_op(current - min_delta, reference)` on float32 tensors."""
        if reference is None:
            return True
        left, right = float32(current - self.min_delta), float32(reference)
        return left > right if self.maximise else left < right


def _check_monitor(state: Mapping[str, Any], monitor: str, what: str) -> None:
    if state.get("monitor") != monitor:
        raise ValueError(f"{what} state monitors {state.get('monitor')!r}, not {monitor!r}")


class EarlyStopper:
    """Keras's EarlyStopping: call `on_epoch_end` after every epoch (epochs 0-based, as Keras's)
    and stop when it returns True; at the end of training, load `restore()`'s weights when it
    returns some."""

    def __init__(self, options: EarlyStopping) -> None:
        self.options = options
        self._monitor = _Monitor(options.monitor, options.mode, options.min_delta)
        self.best: float | None = None
        self.best_epoch = 0
        self.best_weights: Any = None
        self.wait = 0
        self.stopped_epoch = 0  # the epoch that stopped training; 0 while it has not (Keras never stops at epoch 0)

    @property
    def stopped(self) -> bool:
        return self.stopped_epoch > 0

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float], weights: Callable[[], Any]) -> bool:
        """Whether training stops after `epoch`. `weights()` returns a copy of the current weights;
        it is called at most once an epoch, in the epochs in which Keras calls `get_weights`
        (Keras calls it twice in the first monitored epoch, for the same weights)."""
        current = self._monitor.value(logs)
        if epoch < self.options.start_from_epoch:
            return False
        restore = self.options.restore_best_weights
        taken: list[Any] = []  # the weights of this epoch, once taken
        if restore and self.best_weights is None:
            taken.append(weights())
            self.best_weights, self.best_epoch = taken[0], epoch
        self.wait += 1
        if self._monitor.improves(current, self.best):
            self.best, self.best_epoch = current, epoch
            if restore:
                self.best_weights = taken[0] if taken else weights()
            baseline = self.options.baseline
            if baseline is None or self._monitor.improves(current, baseline):
                self.wait = 0
            return False
        if self.wait >= self.options.patience and epoch > 0:
            self.stopped_epoch = epoch
            return True
        return False

    def restore(self) -> Any | None:
        """The weights Keras's `on_train_end` loads (the best epoch's, stopped early or not), or None."""
        if self.options.restore_best_weights and self.best_weights is not None:
            return self.best_weights
        return None

    def reason(self) -> str:
        """One line for the history and the report: why training stopped, or that it did not."""
        o = self.options
        monitor = o.monitor
        restored = self.restore() is not None
        tail = f"; restoring the weights of epoch {self.best_epoch + 1}" if restored else ""
        if self.best is None:
            return f"no early stop: {monitor} was not monitored (start_from_epoch {o.start_from_epoch})"
        best = f"best {_number(self.best)} at epoch {self.best_epoch + 1}"
        if not self.stopped:
            return f"no early stop: {best}{tail}"
        epochs = f"{self.wait} epoch{'s' if self.wait != 1 else ''}"
        by = f" by more than {_number(abs(o.min_delta))}" if o.min_delta else ""
        if o.baseline is not None and not self._monitor.improves(self.best, o.baseline):
            return (
                f"{monitor} did not improve{by} on the baseline {_number(o.baseline)} in {epochs} "
                f"(stopped after epoch {self.stopped_epoch + 1}; {best}){tail}"
            )
        return (
            f"{monitor} did not improve{by} for {epochs} after epoch {self.best_epoch + 1} "
            f"(best {_number(self.best)}){tail}"
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to go on identically after an interruption (the weights as given)."""
        return {
            "monitor": self.options.monitor,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_monitor(state, self.options.monitor, "early stopping")
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.best_weights = state["best_weights"]
        self.wait = state["wait"]
        self.stopped_epoch = state["stopped_epoch"]


class BestTracker:
    """Keras's ModelCheckpoint(save_best_only=True): `on_epoch_end` is True when Keras would save."""

    def __init__(self, options: BestCheckpoint) -> None:
        self.options = options
        self._monitor = _Monitor(options.monitor, options.mode, 0.0)
        self.best: float | None = options.initial_value_threshold
        self.best_epoch: int | None = None  # None until an epoch is saved

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float]) -> bool:
        current = self._monitor.value(logs)
        if self._monitor.improves(current, self.best):
            self.best, self.best_epoch = current, epoch
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.options.monitor, "best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_monitor(state, self.options.monitor, "best checkpoint")
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]


class PlateauScheduler:
    """Keras's ReduceLROnPlateau: `on_epoch_end` returns the learning rate for the next epoch."""

    def __init__(self, options: ReduceLROnPlateau) -> None:
        self.options = options
        self._monitor = _Monitor(options.monitor, options.mode, options.min_delta)
        self.best: float | None = None
        self.wait = 0
        self.cooldown_counter = 0

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float], learning_rate: float) -> float:
        """The learning rate after `epoch`: `learning_rate` itself when Keras leaves it, else the
        float32 value Keras stores (`learning_rate` is read as Keras's float32 variable holds it)."""
        current = self._monitor.value(logs)
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self._monitor.improves(current, self.best):
            self.best = current
            self.wait = 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.options.patience:
                old = float32(learning_rate)
                if old > float32(self.options.min_lr):
                    self.cooldown_counter = self.options.cooldown
                    self.wait = 0
                    return float32(max(old * self.options.factor, self.options.min_lr))
        return learning_rate

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.options.monitor,
            "best": self.best,
            "wait": self.wait,
            "cooldown_counter": self.cooldown_counter,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_monitor(state, self.options.monitor, "plateau schedule")
        self.best = state["best"]
        self.wait = state["wait"]
        self.cooldown_counter = state["cooldown_counter"]


__all__ = ["BestTracker", "EarlyStopper", "PlateauScheduler", "float32"]
