"""Tests for cnnlab.stats: aggregation over seeds, Welch's test, the verdict sentences and NaN results.

The hand-computed example: a = [0.98, 0.99, 1.00] and b = [0.95, 0.96, 0.97] have equal sample
variances 1e-4, so the standard error of the difference is sqrt(2e-4 / 3), t^2 = 0.03^2 / (2e-4 / 3)
= 13.5, and Welch's degrees of freedom are exactly 4. The t distribution with 4 degrees of freedom
has a closed-form CDF, which gives the p-value without scipy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cnnlab.results import EpochRecord, UnitResult
from cnnlab.stats import Comparison, aggregate, arm_stats, holm, paired_equivalence, pairwise, welch
from cnnlab.tables import comparison_headers, comparison_rows

A = [0.98, 0.99, 1.00]
B = [0.95, 0.96, 0.97]
T_975_DF4 = 2.7764451051977934  # tables: two-sided 95% quantile of Student's t, 4 degrees of freedom
T_975_DF2 = 4.302652729749462


def t4_cdf(t: float) -> float:
    """CDF of Student's t with 4 degrees of freedom, in closed form."""
    x = t * t / (t * t + 4)
    return 0.5 + math.copysign(0.5, t) * math.sqrt(x) * (1 + 0.5 * (1 - x))


def unit(arm: str, seed: int, accuracy: float, loss: float = 0.1, params: int = 1000) -> UnitResult:
    history = [EpochRecord(1, 0.5, 0.9, loss, accuracy, 1.0, 0.1, 1000.0)]
    metrics = {
        "arm": arm,
        "model": arm,
        "seed": seed,
        "epochs": 1,
        "train_accuracy": 0.9,
        "train_loss": 0.5,
        "test_loss": loss,
        "test_accuracy": accuracy,
        "wall_seconds": 1.1 + seed,
        "train_seconds": 1.0,
        "seconds_per_epoch": 1.1,
        "samples_per_second": 1000.0,
        "params": params,
        "train_gflops_per_second": 2.0,
        "hardware": {
            "device": "cpu",
            "device_name": "Test CPU",
            "precision": "fp32",
            "compiled": False,
            "channels_last": False,
            "threads": 2,
        },
    }
    return UnitResult(arm, seed, history, metrics)


# ---------------------------------------------------------------------------------------------
# aggregate


def test_aggregate_matches_hand_computation() -> None:
    result = aggregate(A)
    assert result.n == 3
    assert result.mean == pytest.approx(0.99, abs=1e-12)
    assert result.std == pytest.approx(0.01, abs=1e-12)
    half = T_975_DF2 * 0.01 / math.sqrt(3)
    assert (result.ci_low, result.ci_high) == pytest.approx((0.99 - half, 0.99 + half), abs=1e-12)
    assert result.format() == "0.9900 ± 0.0100"
    assert result.format_ci() == f"[{0.99 - half:.4f}, {0.99 + half:.4f}]"


def test_aggregate_matches_scipy_interval() -> None:
    values = np.random.default_rng(3).normal(0.99, 0.002, size=7)
    result = aggregate(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=scipy_stats.sem(values))
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high), rel=1e-12)


def test_aggregate_of_one_value_has_no_spread_or_interval() -> None:
    result = aggregate([0.9912])
    assert (result.mean, result.n) == (0.9912, 1) and math.isnan(result.std)  # no spread, not 0.0
    assert math.isnan(result.ci_low) and math.isnan(result.ci_high)
    assert result.format() == "0.9912"
    assert result.format_ci() == ""


def test_aggregate_of_nothing_is_nan_without_warnings() -> None:
    with np.errstate(all="raise"):
        result = aggregate([])
    assert result.n == 0 and math.isnan(result.mean)


def test_aggregate_propagates_nan() -> None:
    result = aggregate([0.99, math.nan, 0.98])
    assert math.isnan(result.mean) and math.isnan(result.ci_low)


# ---------------------------------------------------------------------------------------------
# welch


def test_welch_matches_hand_computation() -> None:
    c = welch(A, B, "a", "b")
    standard_error = math.sqrt(2e-4 / 3)
    t = 0.03 / standard_error
    assert t * t == pytest.approx(13.5)
    assert c.p_value == pytest.approx(2 * (1 - t4_cdf(t)), rel=1e-9)
    assert c.p_value == pytest.approx(0.0213116, abs=1e-6)
    assert c.difference == pytest.approx(0.03, abs=1e-12)
    assert (c.ci_low, c.ci_high) == pytest.approx(
        (0.03 - T_975_DF4 * standard_error, 0.03 + T_975_DF4 * standard_error), rel=1e-9
    )
    assert c.significant
    assert c.sentence() == "a beats b by 3.00 pp (95% CI 0.73 to 5.27 unadjusted, p = 0.021, 3 seeds)"


@pytest.mark.parametrize("n_a, n_b, seed", [(3, 3, 0), (5, 3, 1), (2, 8, 2), (10, 10, 3)])
def test_welch_matches_scipy(n_a: int, n_b: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.991, 0.002, n_a), rng.normal(0.989, 0.004, n_b)
    c = welch(a, b)
    reference = scipy_stats.ttest_ind(a, b, equal_var=False)
    interval = reference.confidence_interval(0.95)
    assert c.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    assert (c.ci_low, c.ci_high) == pytest.approx((interval.low, interval.high), rel=1e-9)
    assert c.difference == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    assert (c.n_a, c.n_b) == (n_a, n_b)


def test_seeds_that_do_not_vary_allow_no_test() -> None:
    """Identical scores on every seed say nothing about how much another seed would move them."""
    different = welch([0.99, 0.99], [0.98, 0.98], "a", "b")
    assert not different.testable and not different.significant and not different.seeds_vary
    assert math.isnan(different.p_value) and math.isnan(different.ci_low)
    assert different.sentence() == (
        "a vs b: +1.00 pp in test accuracy; not tested (every seed of both gives the "
        "same accuracy: the seeds do not vary, so no test is possible)"
    )
    same = welch([0.99, 0.99], [0.99, 0.99], "a", "b")
    assert not same.testable and "seeds do not vary" in same.sentence()
    one_varies = welch([0.99, 0.99, 0.99], [0.97, 0.98, 0.96], "a", "b")
    assert one_varies.testable  # one arm's spread is enough for Welch's test


# ---------------------------------------------------------------------------------------------
# The verdict in words


def test_sentence_when_the_second_model_wins() -> None:
    c = welch(B, A, "convnet7", "convnet3")
    assert c.difference < 0 and c.significant
    assert c.sentence() == "convnet3 beats convnet7 by 3.00 pp (95% CI 0.73 to 5.27 unadjusted, p = 0.021, 3 seeds)"


def test_sentence_when_not_significant() -> None:
    c = welch([0.990, 0.992, 0.988], [0.989, 0.991, 0.990], "convnet3", "convnet5")
    assert c.testable and not c.significant
    assert c.sentence() == (
        f"convnet3 vs convnet5: no significant difference (+0.00 pp, 95% CI "
        f"{c.ci_low * 100:.2f} to {c.ci_high * 100:.2f} unadjusted, p = {c.p_value:.3f}, 3 seeds)"
    )


def test_sentence_with_unequal_seed_counts() -> None:
    c = welch([0.99, 0.991, 0.992, 0.993], [0.95, 0.951, 0.952], "a", "b")
    assert c.sentence().endswith("p < 0.001, 4 and 3 seeds)")


def test_sentence_when_not_testable_with_one_seed() -> None:
    c = welch([0.99], [0.98, 0.97], "convnet3", "convnet7")
    assert not c.testable and not c.significant
    assert math.isnan(c.p_value) and math.isnan(c.ci_low)
    assert c.sentence() == (
        "convnet3 vs convnet7: +1.50 pp in test accuracy; not tested (needs at least 2 seeds per arm, e.g. --seeds 3)"
    )


def test_sentence_when_a_result_is_nan() -> None:
    c = welch([0.99, math.nan, 0.98], [0.97, 0.96, 0.95], "diverged", "b")
    assert not c.testable and not c.significant
    assert c.sentence().endswith("not tested (a test accuracy is NaN; a run may have diverged)")


def test_comparison_p_value_threshold_is_strict() -> None:
    at_alpha = Comparison("a", "b", 0.01, 0.0, 0.02, 0.05, 3, 3)
    assert at_alpha.testable and not at_alpha.significant


# ---------------------------------------------------------------------------------------------
# Over run results


def test_model_stats_groups_by_model_in_order() -> None:
    units = [unit("convnet7", s, a) for s, a in enumerate([0.97, 0.98, 0.99])]
    units += [unit("convnet3", s, a, params=2000) for s, a in enumerate([0.99, 0.995])]
    rows = arm_stats(units)
    assert [r.arm for r in rows] == ["convnet7", "convnet3"]
    assert rows[0].seeds == (0, 1, 2) and rows[1].params == 2000
    assert rows[0].test_accuracy.mean == pytest.approx(0.98)
    assert rows[0].wall_seconds == pytest.approx(2.1)  # the mean of 1.1, 2.1 and 3.1
    assert "Test acc 95% CI" in comparison_headers(rows) and "Seeds" in comparison_headers(rows)
    cells = dict(zip(comparison_headers(rows), comparison_rows(rows)[0]))
    assert cells["Test acc"] == "0.9800 ± 0.0100" and cells["Seeds"] == "3"


def test_table_hides_intervals_when_every_model_has_one_seed() -> None:
    rows = arm_stats([unit("a", 0, 0.9), unit("b", 0, 0.8)])
    assert "Test acc 95% CI" not in comparison_headers(rows) and "Seeds" not in comparison_headers(rows)
    assert len(comparison_rows(rows)[0]) == len(comparison_headers(rows))


def test_pairwise_puts_the_better_model_first() -> None:
    units = [unit("worse", s, a) for s, a in enumerate(B)] + [unit("better", s, a) for s, a in enumerate(A)]
    (c,) = pairwise(units)
    assert (c.a, c.b) == ("better", "worse") and c.difference > 0


def test_pairwise_ranks_nan_models_last() -> None:
    units = [unit("diverged", s, a) for s, a in enumerate([math.nan, 0.5, 0.5])]
    units += [unit("low", s, a) for s, a in enumerate([0.90, 0.91, 0.92])]
    units += [unit("high", s, a) for s, a in enumerate([0.98, 0.99, 0.97])]
    comparisons = pairwise(units)
    assert [(c.a, c.b) for c in comparisons] == [("high", "low"), ("high", "diverged"), ("low", "diverged")]
    assert comparisons[0].significant
    assert all("NaN" in c.sentence() for c in comparisons[1:])


# ---------------------------------------------------------------------------------------------
# The family of pairwise comparisons


def test_holm_matches_its_definition() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.4, 0.6]) == pytest.approx([0.8, 0.8])  # monotone: never below an earlier step
    assert holm([]) == []


def test_pairwise_verdicts_use_holm_over_the_runs_family() -> None:
    # Three arms: a beats b on its own (p = 0.021) but not after adjusting over three comparisons.
    units = [unit("a", s, acc) for s, acc in enumerate(A)] + [unit("b", s, acc) for s, acc in enumerate(B)]
    units += [unit("c", s, acc) for s, acc in enumerate([0.96, 0.99, 0.975])]
    comparisons = {(c.a, c.b): c for c in pairwise(units)}
    a_b = comparisons[("a", "b")]
    assert a_b.family == 3 and a_b.p_value == pytest.approx(0.0213116, abs=1e-6)
    raw = sorted(c.p_value for c in comparisons.values())
    assert a_b.p_adjusted == pytest.approx(holm(raw)[raw.index(a_b.p_value)])
    assert a_b.p_adjusted > 0.05 and not a_b.significant
    assert "Holm-adjusted p = " in a_b.sentence() and "over 3 comparisons" in a_b.sentence()


def test_untestable_pairs_are_not_part_of_the_family() -> None:
    units = [unit("a", s, acc) for s, acc in enumerate(A)] + [unit("b", s, acc) for s, acc in enumerate(B)]
    units += [unit("one-seed", 0, 0.5)]
    comparisons = pairwise(units)
    tested = [c for c in comparisons if c.testable]
    assert len(tested) == 1 and tested[0].family == 1 and tested[0].p_adjusted == tested[0].p_value


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_three_equal_arms_give_a_false_verdict_at_most_5_percent_of_the_time(seeds) -> None:
    """A seeded simulation: three arms with the same true accuracy and seed-to-seed spread; a run
    with any "X beats Y" verdict is a false verdict. Holm keeps that rate at or below 5%."""
    rng = np.random.default_rng(seeds)
    trials = 2000  # without the adjustment the same simulation gives 6-11% (measured)
    false_verdicts = 0
    for _ in range(trials):
        units = [
            unit(arm, s, float(acc)) for arm in ("a", "b", "c") for s, acc in enumerate(rng.normal(0.99, 0.002, seeds))
        ]
        false_verdicts += any(c.significant for c in pairwise(units))
    assert false_verdicts / trials <= 0.05


# ---------------------------------------------------------------------------------------------
# Paired equivalence (TOST)


@pytest.mark.parametrize("shift, seed", [(0.0, 0), (0.001, 1), (-0.002, 2), (0.004, 3)])
def test_paired_equivalence_is_two_one_sided_t_tests(shift: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    b = rng.normal(0.985, 0.002, 12)
    a = b + shift + rng.normal(0, 0.001, 12)
    result = paired_equivalence(a, b, margin=0.0015)
    d = a - b
    below = scipy_stats.ttest_1samp(d, -0.0015, alternative="greater").pvalue
    above = scipy_stats.ttest_1samp(d, 0.0015, alternative="less").pvalue
    assert result.p_value == pytest.approx(max(below, above), rel=1e-9)
    interval = scipy_stats.t.interval(0.90, len(d) - 1, loc=d.mean(), scale=scipy_stats.sem(d))
    assert (result.ci_low, result.ci_high) == pytest.approx(interval, rel=1e-9)
    assert result.n == 12 and result.difference == pytest.approx(d.mean())


def test_paired_equivalence_verdicts() -> None:
    base = np.array([0.980, 0.984, 0.986, 0.982, 0.985, 0.983])
    noise = np.array([1, -1, 2, -2, 1, -1]) * 1e-4
    assert paired_equivalence(base + noise, base, margin=0.0015).verdict == "equivalent"
    assert paired_equivalence(base + 0.004 + noise, base, margin=0.0015).verdict == "different"
    wide = np.array([1, -1, 2, -2, 1, -1]) * 3e-3
    assert paired_equivalence(base + wide, base, margin=0.0015).verdict == "unresolved"  # too spread to tell
    one = paired_equivalence([0.98], [0.98], margin=0.0015)
    assert one.verdict == "unresolved" and one.p_value != one.p_value  # one pair: no test
    same = paired_equivalence(base, base, margin=0.0015)
    assert same.verdict == "equivalent" and same.difference == 0.0
