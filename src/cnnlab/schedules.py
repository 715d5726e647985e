"""Keras's step-wise learning-rate schedules (`keras.optimizers.schedules`), as plain Python.

`learning_rate_at(schedule, initial_learning_rate, step)` is the learning rate of the update that
follows `step` updates: a Keras optimizer made with a schedule evaluates it at
`optimizer.iterations` (the updates already applied) before applying the next one. The formulas
are Keras 3's, including its edges: a piecewise boundary belongs to the value before it, a cosine
decay stays at its end value after `decay_steps` (after `warmup_steps + decay_steps` with a
warm-up), and a cosine warm-up only exists with a `warmup_target`. Keras computes in float32;
these are float64, so they agree with Keras to float32's precision (tests compare them with
Keras's own formulas evaluated in float64).

Called once per training step on the host: pure Python, no torch, no device.
`ReduceLROnPlateau` is not a function of the step (it follows the validation metric per epoch)
and is not handled here.
"""

from __future__ import annotations

import math
from bisect import bisect_left

from cnnlab.options import CosineDecay, ExponentialDecay, PiecewiseConstantDecay


def learning_rate_at(
    schedule: ExponentialDecay | PiecewiseConstantDecay | CosineDecay | None,
    initial_learning_rate: float,
    step: int,
) -> float:
    """The learning rate after `step` optimizer updates (0 for the first update); `None` keeps
    `initial_learning_rate`, and `PiecewiseConstantDecay` ignores it (its values replace it)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    if schedule is None:
        return float(initial_learning_rate)
    if isinstance(schedule, ExponentialDecay):
        # initial * decay_rate ** (step / decay_steps), the exponent floored when staircase.
        p = step / schedule.decay_steps
        if schedule.staircase:
            p = math.floor(p)
        return initial_learning_rate * schedule.decay_rate**p
    if isinstance(schedule, PiecewiseConstantDecay):
        # values[0] while step <= boundaries[0], values[i] while boundaries[i-1] < step <= boundaries[i],
        # values[-1] after the last boundary: the index is the number of boundaries below step.
        return float(schedule.values[bisect_left(schedule.boundaries, step)])
    if isinstance(schedule, CosineDecay):
        decay_steps = schedule.decay_steps
        if schedule.warmup_target is None:  # no warm-up (Keras ignores warmup_steps then)
            return _cosine(schedule.alpha, min(step, decay_steps) / decay_steps, initial_learning_rate)
        warmup_steps, target = schedule.warmup_steps, schedule.warmup_target
        step = min(step, decay_steps + warmup_steps)
        if step < warmup_steps:  # linear from initial_learning_rate (step 0) towards warmup_target
            return (target - initial_learning_rate) * (step / warmup_steps) + initial_learning_rate
        return _cosine(schedule.alpha, (step - warmup_steps) / decay_steps, target)
    raise TypeError(f"{type(schedule).__name__} is not a schedule of the step number")


def _cosine(alpha: float, completed_fraction: float, decay_from: float) -> float:
    """Keras's CosineDecay._decay_function: from `decay_from` down to `alpha * decay_from`."""
    cosine_decayed = 0.5 * (1.0 + math.cos(math.pi * completed_fraction))
    return decay_from * ((1 - alpha) * cosine_decayed + alpha)
