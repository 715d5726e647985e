"""Statistics over seeds: mean, spread, confidence intervals, and whether a difference is real.

A model trained with several seeds gives a sample of test accuracies. We report the mean, the
sample standard deviation and a 95% Student-t confidence interval of the mean. Two models are
compared with Welch's t-test (unequal variances) on their per-seed test accuracies; the interval
of the difference uses the Welch-Satterthwaite degrees of freedom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

from cnnlab.runs import UnitResult


@dataclass(frozen=True)
class Aggregate:
    """Mean, sample standard deviation and 95% confidence interval of a sample (n >= 1)."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int

    def format(self, scale: float = 1.0, digits: int = 4) -> str:
        """'0.9912' for one value, '0.9912 ± 0.0011' for several."""
        if self.n < 2:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"

    def format_ci(self, scale: float = 1.0, digits: int = 4) -> str:
        """'[0.9890, 0.9934]', or '' for one value."""
        if self.n < 2:
            return ""
        return f"[{self.ci_low * scale:.{digits}f}, {self.ci_high * scale:.{digits}f}]"


def aggregate(values: Sequence[float], confidence: float = 0.95) -> Aggregate:
    """Mean, std (ddof 1) and the t-interval of the mean; one value has no spread or interval."""
    sample = np.asarray(values, dtype=float)
    n = len(sample)
    if n == 0:
        return Aggregate(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(sample.mean())
    if n < 2:
        return Aggregate(mean, 0.0, math.nan, math.nan, n)
    std = float(sample.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Aggregate(mean, std, mean - half, mean + half, n)


@dataclass(frozen=True)
class ModelStats:
    """One row of the comparison table: a model's results over its seeds."""

    model: str
    seeds: tuple[int, ...]
    params: int
    train_accuracy: Aggregate
    test_loss: Aggregate
    test_accuracy: Aggregate
    wall_seconds: float          # mean over seeds
    seconds_per_epoch: float     # mean over seeds
    samples_per_second: float    # mean over seeds
    train_gflops_per_second: float
    precision: str
    device: str
    train_flops_per_sample: int | None = None  # forward + backward; inference is a third of it


def model_stats(units: Sequence[UnitResult]) -> list[ModelStats]:
    """Group finished runs by model (in order of first appearance) and aggregate over seeds."""
    by_model: dict[str, list[UnitResult]] = {}
    for unit in units:
        by_model.setdefault(unit.model, []).append(unit)
    rows = []
    for model, group in by_model.items():
        metric = lambda key: [u.metrics[key] for u in group]  # noqa: E731
        hardware = group[0].metrics["hardware"]
        rows.append(ModelStats(
            model=model, seeds=tuple(u.seed for u in group), params=group[0].metrics["params"],
            train_accuracy=aggregate(metric("train_accuracy")), test_loss=aggregate(metric("test_loss")),
            test_accuracy=aggregate(metric("test_accuracy")),
            wall_seconds=float(np.mean(metric("wall_seconds"))),
            seconds_per_epoch=float(np.mean(metric("seconds_per_epoch"))),
            samples_per_second=float(np.mean(metric("samples_per_second"))),
            train_gflops_per_second=float(np.mean(metric("train_gflops_per_second"))),
            precision=hardware["precision"], device=hardware["device_name"],
            train_flops_per_sample=group[0].metrics.get("train_flops_per_sample"),
        ))
    return rows


@dataclass(frozen=True)
class Comparison:
    """Model `a` minus model `b` in mean test accuracy, with Welch's test."""

    a: str
    b: str
    difference: float      # mean accuracy of a minus b (fraction, not percent)
    ci_low: float
    ci_high: float
    p_value: float
    n_a: int
    n_b: int
    alpha: float = 0.05

    @property
    def testable(self) -> bool:
        return self.n_a >= 2 and self.n_b >= 2 and not math.isnan(self.p_value)

    @property
    def untestable_reason(self) -> str:
        """Why no test was made ('' when one was): too few seeds, or a NaN result (a diverged run)."""
        if self.testable:
            return ""
        if self.n_a < 2 or self.n_b < 2:
            return "needs at least 2 seeds per model, e.g. --seeds 3"
        return "a test accuracy is NaN; a run may have diverged"

    @property
    def significant(self) -> bool:
        return self.testable and self.p_value < self.alpha

    def sentence(self) -> str:
        """The verdict in plain words."""
        seeds = f"{self.n_a} seeds" if self.n_a == self.n_b else f"{self.n_a} and {self.n_b} seeds"
        if not self.testable:
            return (f"{self.a} vs {self.b}: {self.difference * 100:+.2f} pp in test accuracy; "
                    f"not tested ({self.untestable_reason})")
        detail = f"95% CI {self.ci_low * 100:.2f} to {self.ci_high * 100:.2f}, {_format_p(self.p_value)}, {seeds}"
        if not self.significant:
            return f"{self.a} vs {self.b}: no significant difference ({self.difference * 100:+.2f} pp, {detail})"
        winner, loser = (self.a, self.b) if self.difference > 0 else (self.b, self.a)
        low, high = sorted((abs(self.ci_low), abs(self.ci_high)))
        if self.difference < 0:
            detail = f"95% CI {low * 100:.2f} to {high * 100:.2f}, {_format_p(self.p_value)}, {seeds}"
        return f"{winner} beats {loser} by {abs(self.difference) * 100:.2f} pp ({detail})"


def _format_p(p: float) -> str:
    """'p = 0.021', or 'p < 0.001' where three decimals would show zero."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def welch(a: Sequence[float], b: Sequence[float], name_a: str = "a", name_b: str = "b",
          alpha: float = 0.05) -> Comparison:
    """Welch's t-test and the (1 - alpha) interval of mean(a) - mean(b)."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    difference = float(xa.mean() - xb.mean())
    if len(xa) < 2 or len(xb) < 2:
        return Comparison(name_a, name_b, difference, math.nan, math.nan, math.nan, len(xa), len(xb), alpha)
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    standard_error = math.sqrt(va + vb)
    if standard_error == 0:  # identical results on every seed: a difference is certain, none is impossible
        p_value = 1.0 if difference == 0 else 0.0
        return Comparison(name_a, name_b, difference, difference, difference, p_value, len(xa), len(xb), alpha)
    df = (va + vb) ** 2 / (va ** 2 / (len(xa) - 1) + vb ** 2 / (len(xb) - 1))
    half = float(scipy_stats.t.ppf(1 - alpha / 2, df)) * standard_error
    p_value = float(scipy_stats.ttest_ind(xa, xb, equal_var=False).pvalue)
    return Comparison(name_a, name_b, difference, difference - half, difference + half, p_value,
                      len(xa), len(xb), alpha)


def pairwise(units: Sequence[UnitResult], alpha: float = 0.05) -> list[Comparison]:
    """Every pair of models compared on test accuracy, best model first in each pair."""
    accuracies: dict[str, list[float]] = {}
    for unit in units:
        accuracies.setdefault(unit.model, []).append(unit.test_accuracy)
    means = {model: float(np.mean(values)) for model, values in accuracies.items()}
    ranked = sorted(means, key=lambda m: (math.isnan(means[m]), -means[m]))  # NaN (diverged) last
    return [welch(accuracies[a], accuracies[b], a, b, alpha) for a, b in combinations(ranked, 2)]
