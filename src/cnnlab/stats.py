"""Statistics over seeds: mean, spread, confidence intervals, and whether a difference is real.

An arm trained with several seeds gives a sample of test accuracies. We report the mean, the
sample standard deviation (none for one seed) and a 95% Student-t confidence interval of the mean.
Two arms are compared with Welch's t-test (unequal variances) on their per-seed test accuracies;
the interval of the difference uses the Welch-Satterthwaite degrees of freedom. Every pairwise
comparison of a run is one family: a verdict needs its Holm-adjusted p-value below alpha, so the
chance of any false verdict stays at alpha however many arms there are. The intervals shown are
each pair's own (unadjusted) 95% intervals. When every seed of both arms scores the same, the
seeds do not vary and no test is possible. In a sweep, each model's best setting is also tested
against each of that model's runners-up (`against_best`): those tests form one family per model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np

# Student's t from its special functions (what scipy.stats.t calls), not scipy.stats: the same
# numbers, and a third of a second less to start every command (BENCHMARKS.md).
from scipy.special import stdtr, stdtrit

from cnnlab.results import UnitResult


@dataclass(frozen=True)
class Aggregate:
    """Mean, sample standard deviation and 95% confidence interval of a sample (n >= 1)."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int

    def format(self, scale: float = 1.0, digits: int = 4) -> str:
        """'0.9912' for one value, '0.9912 ± 0.0011' for several, '–' for none (e.g. untrained)."""
        if math.isnan(self.mean):
            return "–"
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
        return Aggregate(mean, math.nan, math.nan, math.nan, n)  # one value has no spread
    std = float(sample.std(ddof=1))
    half = float(stdtrit(n - 1, 0.5 + confidence / 2)) * std / math.sqrt(n)
    return Aggregate(mean, std, mean - half, mean + half, n)


@dataclass(frozen=True)
class ArmStats:
    """One row of the comparison table: an arm's results over its seeds."""

    arm: str
    seeds: tuple[int, ...]
    params: int
    train_accuracy: Aggregate
    test_loss: Aggregate
    test_accuracy: Aggregate
    wall_seconds: float  # mean over seeds
    seconds_per_epoch: float  # mean over seeds
    samples_per_second: float  # mean over seeds
    train_gflops_per_second: float
    precision: str
    device: str
    train_flops_per_sample: int | None = None  # forward + backward; inference is a third of it


def group_by_arm(units: Sequence[UnitResult]) -> dict[str, list[UnitResult]]:
    """Finished units grouped by arm, arms in order of first appearance."""
    groups: dict[str, list[UnitResult]] = {}
    for unit in units:
        groups.setdefault(unit.arm, []).append(unit)
    return groups


def arm_stats(units: Sequence[UnitResult]) -> list[ArmStats]:
    """Aggregate each arm's finished units over their seeds (arms in order of first appearance)."""
    rows = []
    for arm, group in group_by_arm(units).items():
        metric = lambda key, group=group: [u.metrics[key] for u in group]
        hardware = group[0].metrics["hardware"]
        rows.append(
            ArmStats(
                arm=arm,
                seeds=tuple(u.seed for u in group),
                params=group[0].metrics["params"],
                train_accuracy=aggregate(metric("train_accuracy")),
                test_loss=aggregate(metric("test_loss")),
                test_accuracy=aggregate(metric("test_accuracy")),
                wall_seconds=float(np.mean(metric("wall_seconds"))),
                seconds_per_epoch=float(np.mean(metric("seconds_per_epoch"))),
                samples_per_second=float(np.mean(metric("samples_per_second"))),
                train_gflops_per_second=float(np.mean(metric("train_gflops_per_second"))),
                precision=hardware["precision"],
                device=hardware["device_name"],
                train_flops_per_sample=group[0].metrics.get("train_flops_per_sample"),
            )
        )
    return rows


@dataclass(frozen=True)
class Comparison:
    """Arm `a` minus arm `b` in mean test accuracy, with Welch's test, Holm-adjusted over the run's family."""

    a: str
    b: str
    difference: float  # mean accuracy of a minus b (fraction, not percent)
    ci_low: float  # the pair's own 95% interval (unadjusted)
    ci_high: float
    p_value: float  # Welch's two-sided p, unadjusted
    n_a: int
    n_b: int
    alpha: float = 0.05
    p_adjusted: float = math.nan  # Holm-adjusted over `family` comparisons: the verdict's p
    family: int = 1
    seeds_vary: bool = True  # False when every seed of both arms scores the same

    @property
    def testable(self) -> bool:
        return self.n_a >= 2 and self.n_b >= 2 and self.seeds_vary and not math.isnan(self.p_value)

    @property
    def untestable_reason(self) -> str:
        """Why no test was made ('' when one was): too few seeds, seeds that do not vary, a NaN result."""
        if self.testable:
            return ""
        if self.n_a < 2 or self.n_b < 2:
            return "needs at least 2 seeds per arm, e.g. --seeds 3"
        if not self.seeds_vary:
            return "every seed of both gives the same accuracy: the seeds do not vary, so no test is possible"
        return "a test accuracy is NaN; a run may have diverged"

    @property
    def significant(self) -> bool:
        return self.testable and self.p_adjusted < self.alpha

    def p_text(self) -> str:
        """The verdict's p-value in words: Holm-adjusted when the family has more than one test."""
        if self.family > 1:
            return f"Holm-adjusted {_format_p(self.p_adjusted)} over {self.family} comparisons"
        return _format_p(self.p_adjusted)

    def sentence(self) -> str:
        """The verdict in plain words."""
        seeds = f"{self.n_a} seeds" if self.n_a == self.n_b else f"{self.n_a} and {self.n_b} seeds"
        if not self.testable:
            return (
                f"{self.a} vs {self.b}: {self.difference * 100:+.2f} pp in test accuracy; "
                f"not tested ({self.untestable_reason})"
            )
        low, high = self.ci_low, self.ci_high
        if self.significant and self.difference < 0:
            low, high = -high, -low
        detail = f"95% CI {low * 100:.2f} to {high * 100:.2f} unadjusted, {self.p_text()}, {seeds}"
        if not self.significant:
            return f"{self.a} vs {self.b}: no significant difference ({self.difference * 100:+.2f} pp, {detail})"
        winner, loser = (self.a, self.b) if self.difference > 0 else (self.b, self.a)
        return f"{winner} beats {loser} by {abs(self.difference) * 100:.2f} pp ({detail})"


def _format_p(p: float) -> str:
    """'p = 0.021', or 'p < 0.001' where three decimals would show zero."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def welch(
    a: Sequence[float], b: Sequence[float], name_a: str = "a", name_b: str = "b", alpha: float = 0.05
) -> Comparison:
    """Welch's t-test and the (1 - alpha) interval of mean(a) - mean(b), as a family of one."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    difference = float(xa.mean() - xb.mean())
    untested = Comparison(name_a, name_b, difference, math.nan, math.nan, math.nan, len(xa), len(xb), alpha)
    if len(xa) < 2 or len(xb) < 2:
        return untested
    va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
    standard_error = math.sqrt(va + vb)
    if standard_error == 0:  # every seed scores the same: no spread to test a difference against
        return replace(untested, seeds_vary=False)
    df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    half = float(stdtrit(df, 1 - alpha / 2)) * standard_error
    # Welch's two-sided p from its definition (scipy's ttest_ind warns when one arm has no spread).
    p_value = float(2 * stdtr(df, -abs(difference) / standard_error))
    return Comparison(
        name_a,
        name_b,
        difference,
        difference - half,
        difference + half,
        p_value,
        len(xa),
        len(xb),
        alpha,
        p_adjusted=p_value,
    )


@dataclass(frozen=True)
class Equivalence:
    """A paired equivalence test (two one-sided t-tests, TOST) of mean(a - b) against +-margin.

    `verdict` is "equivalent" when both one-sided tests reject at alpha (the 1 - 2 alpha interval lies
    inside +-margin), "different" when that interval lies wholly outside it, and otherwise
    "unresolved": more pairs are needed to tell."""

    difference: float  # mean of the paired differences a - b
    ci_low: float  # the 1 - 2 alpha interval of the mean difference (90% at alpha 0.05)
    ci_high: float
    p_value: float  # TOST's p: the larger of the two one-sided p-values (NaN below two pairs)
    margin: float
    n: int
    alpha: float = 0.05

    @property
    def verdict(self) -> str:
        if self.p_value < self.alpha:
            return "equivalent"
        if self.ci_low > self.margin or self.ci_high < -self.margin:
            return "different"
        return "unresolved"


def paired_equivalence(a: Sequence[float], b: Sequence[float], margin: float, alpha: float = 0.05) -> Equivalence:
    """Is mean(a - b) within +-margin? Two one-sided paired t-tests (Schuirmann's TOST) on the pairs
    (a[i], b[i]), e.g. one seed trained two ways; the pairs' spread decides how many are needed."""
    differences = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(differences)
    mean = float(differences.mean()) if n else math.nan
    if n < 2:
        return Equivalence(mean, math.nan, math.nan, math.nan, margin, n, alpha)
    standard_error = float(differences.std(ddof=1)) / math.sqrt(n)
    if standard_error == 0:  # identical pairs: the difference is known exactly
        inside = abs(mean) < margin
        return Equivalence(mean, mean, mean, 0.0 if inside else 1.0, margin, n, alpha)
    lower = float(stdtr(n - 1, -(mean + margin) / standard_error))  # H0: mean <= -margin
    upper = float(stdtr(n - 1, (mean - margin) / standard_error))  # H0: mean >= +margin
    half = float(stdtrit(n - 1, 1 - alpha)) * standard_error
    return Equivalence(mean, mean - half, mean + half, max(lower, upper), margin, n, alpha)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: the adjusted p-values, in the input's order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def pairwise(units: Sequence[UnitResult], alpha: float = 0.05) -> list[Comparison]:
    """Every pair of arms compared on test accuracy, best arm first in each pair; the testable
    comparisons form one family whose p-values are Holm-adjusted."""
    accuracies = {arm: [u.test_accuracy for u in group] for arm, group in group_by_arm(units).items()}
    means = {arm: float(np.mean(values)) for arm, values in accuracies.items()}
    ranked = sorted(means, key=lambda m: (math.isnan(means[m]), -means[m]))  # NaN (diverged) last
    raw = [welch(accuracies[a], accuracies[b], a, b, alpha) for a, b in combinations(ranked, 2)]
    tested = [i for i, c in enumerate(raw) if c.testable]
    adjusted = holm([raw[i].p_value for i in tested])
    out = list(raw)
    for i, p in zip(tested, adjusted):
        out[i] = replace(raw[i], p_adjusted=p, family=len(tested))
    return out


def confusion_matrix(
    labels: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray, num_classes: int
) -> np.ndarray:
    """Counts of (true class, predicted class) pairs; rows are true classes."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predictions, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Accuracy on each true class of a confusion matrix (NaN for a class with no images)."""
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(confusion) / totals, np.nan)


@dataclass(frozen=True)
class Choice:
    """The best arm, chosen by the rule against choosing on the test set."""

    arm: str
    metric: str  # "validation accuracy" or "test accuracy"
    value: float  # its mean over the arm's seeds
    on_test: bool
    # Why the test set was used although some arms held out validation images ('' when it was not).
    reason: str = ""

    def sentence(self, subject: str | None = None) -> str:
        """The choice in words; `subject` replaces 'Best: <arm>' (e.g. a model's best setting)."""
        subject = subject or f"Best: {self.arm}"
        if self.on_test:
            why = self.reason or "with --val-split the choice is made on held-out training images instead"
            return f"{subject}, by mean test accuracy {self.value:.4f}: chosen on the test set (optimistic; {why})"
        return (
            f"{subject}, by mean validation accuracy {self.value:.4f} on held-out training images "
            "(its test accuracy was not used to choose it)"
        )


def choose_best(units: Sequence[UnitResult], on_validation: bool, reason: str = "") -> Choice | None:
    """The arm with the best mean accuracy: validation accuracy when the run held out validation
    images, otherwise test accuracy, labelled as chosen on the test set (`reason`: why, when the run
    did hold out images). None with one arm."""
    groups = group_by_arm(units)
    if len(groups) < 2:
        return None

    def score(unit: UnitResult) -> float:
        if not on_validation:
            return unit.test_accuracy
        return unit.metrics.get("val_accuracy", unit.history[-1].val_accuracy)

    means = {arm: float(np.mean([score(u) for u in group])) for arm, group in groups.items()}
    valid = {arm: value for arm, value in means.items() if not math.isnan(value)}
    if not valid:
        return None
    best = max(valid, key=lambda arm: valid[arm])
    metric = "validation accuracy" if on_validation else "test accuracy"
    return Choice(best, metric, valid[best], on_test=not on_validation, reason="" if on_validation else reason)


def against_best(units: Sequence[UnitResult], best: str, alpha: float = 0.05) -> list[Comparison]:
    """The arm `best` against every other arm of `units` (its runners-up, by mean test accuracy), each
    by Welch's test on per-seed test accuracy; the testable comparisons form one family of their own,
    whose p-values are Holm-adjusted."""
    accuracies = {arm: [u.test_accuracy for u in group] for arm, group in group_by_arm(units).items()}
    means = {arm: float(np.mean(values)) for arm, values in accuracies.items()}
    others = sorted((a for a in accuracies if a != best), key=lambda m: (math.isnan(means[m]), -means[m]))
    raw = [welch(accuracies[best], accuracies[other], best, other, alpha) for other in others]
    tested = [i for i, c in enumerate(raw) if c.testable]
    out = list(raw)
    for i, p in zip(tested, holm([raw[i].p_value for i in tested])):
        out[i] = replace(raw[i], p_adjusted=p, family=len(tested))
    return out
