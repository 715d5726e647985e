"""The tables a run shows, as text cells, and the one Markdown table writer.

The comparison table (one row per arm, statistics over its seeds) appears in the terminal (Rich),
in Markdown, CSV and JSON; the pairwise, settings (a sweep's best setting per model), cost and
per-class tables appear in the report.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from rich.table import Table
from rich.text import Text

from cnnlab.analysis import ArmDetails, ModelSettings, SettingArm
from cnnlab.models import format_flops
from cnnlab.stats import Aggregate, ArmStats, Choice, Comparison

Rows = list[list[str]]


def format_duration(seconds: float) -> str:
    """'0:01:42' style, as the notebook's table, with tenths under a minute."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: Sequence[int] = (0,)) -> str:
    """A GitHub Markdown table; `text_columns` are left-aligned, the rest right-aligned."""
    escape = lambda cell: str(cell).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        "| " + " | ".join(escape(h) or " " for h in headers) + " |",
        "| " + " | ".join("---" if i in text_columns else "---:" for i in range(len(headers))) + " |",
    ]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The comparison table


def _flops(row: ArmStats) -> str:
    if row.train_flops_per_sample is None:
        return ""
    return f"{format_flops(row.train_flops_per_sample)} / {format_flops(row.train_flops_per_sample / 3)}"


# (header, cell, shown only with several seeds)
_COLUMNS: list[tuple[str, Callable[[ArmStats], str], bool]] = [
    ("Model", lambda r: r.arm, False),
    ("Params", lambda r: f"{r.params:,}", False),
    ("FLOPs/sample train / infer", _flops, False),
    ("Train acc", lambda r: r.train_accuracy.format(), False),
    ("Test loss", lambda r: r.test_loss.format(), False),
    ("Test loss 95% CI", lambda r: r.test_loss.format_ci(), True),
    ("Test acc", lambda r: r.test_accuracy.format(), False),
    ("Test acc 95% CI", lambda r: r.test_accuracy.format_ci(), True),
    ("Seeds", lambda r: str(len(r.seeds)), True),
    ("Wall time", lambda r: format_duration(r.wall_seconds), False),
    ("s/epoch", lambda r: f"{r.seconds_per_epoch:.1f}", False),
    ("Samples/s", lambda r: f"{r.samples_per_second:,.0f}", False),
    ("Precision", lambda r: r.precision, False),
]
TEXT_COLUMNS = ("Model", "Precision")


def _shown(rows: Sequence[ArmStats]) -> list[tuple[str, Callable[[ArmStats], str], bool]]:
    multi = any(r.test_accuracy.n > 1 for r in rows)
    return [column for column in _COLUMNS if multi or not column[2]]


def comparison_headers(rows: Sequence[ArmStats]) -> list[str]:
    """Column headers of the comparison table; spread and intervals appear when an arm has several seeds."""
    return [header for header, _, _ in _shown(rows)]


def comparison_rows(rows: Sequence[ArmStats]) -> Rows:
    """The comparison table's cells as text, one row per arm."""
    shown = _shown(rows)
    return [[cell(r) for _, cell, _ in shown] for r in rows]


def comparison_text_columns(rows: Sequence[ArmStats]) -> tuple[int, ...]:
    return tuple(i for i, h in enumerate(comparison_headers(rows)) if h in TEXT_COLUMNS)


def rich_table(rows: Sequence[ArmStats], title: str = "Comparison") -> Table:
    """The comparison table for the terminal."""
    table = Table(title=title)
    text = comparison_text_columns(rows)
    for i, name in enumerate(comparison_headers(rows)):
        table.add_column(name, justify="left" if i in text else "right")
    for cells in comparison_rows(rows):
        table.add_row(*(Text(cell) for cell in cells))  # names are text, never Rich markup
    return table


def statistics_note(rows: Sequence[ArmStats], comparisons: Sequence[Comparison]) -> str:
    """What the table's numbers are, in words: shown under the table everywhere it appears."""
    note = (
        "Train acc: the best epoch's running training accuracy (Keras's `accuracy`, dropout on), as the "
        "notebook reports it. Test loss and accuracy: after the last epoch."
    )
    if any(r.test_accuracy.n > 1 for r in rows):
        note += (
            " ±: the sample standard deviation over an arm's seeds; 95% CI: Student's t interval of the "
            "mean; one seed has neither."
        )
    family = max((c.family for c in comparisons if c.testable), default=0)
    if family > 1:
        note += (
            f" Verdicts: Welch's t-test on per-seed test accuracy, Holm-adjusted over the {family} pairwise "
            "comparisons of this run (family-wise error 5%); the intervals of differences are unadjusted 95%."
        )
    elif family == 1:
        note += " Verdict: Welch's t-test on per-seed test accuracy (one comparison: no adjustment needed)."
    return note


def comparison_markdown(
    rows: Sequence[ArmStats],
    comparisons: Sequence[Comparison],
    choice: Choice | None = None,
    settings: Sequence[ModelSettings] = (),
) -> str:
    """comparison.md: the table, what its numbers are, the best arm (and each model's best setting in a
    sweep), then the verdicts."""
    verdicts = (f"- {choice.sentence()}\n" if choice else "") + "".join(f"- {m.sentence()}\n" for m in settings)
    verdicts += "".join(f"- {c.sentence()}\n" for c in comparisons)
    table = markdown_table(comparison_headers(rows), comparison_rows(rows), comparison_text_columns(rows))
    return table + f"\n{statistics_note(rows, comparisons)}\n" + (f"\n{verdicts}" if verdicts else "")


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def records(rows: Sequence[ArmStats]) -> list[dict[str, Any]]:
    """One flat record per arm with full-precision numbers (CSV and JSON)."""
    out = []
    for r in rows:
        record: dict[str, Any] = {
            "model": r.arm,
            "params": r.params,
            "seeds": len(r.seeds),
            "train_flops_per_sample": r.train_flops_per_sample,
        }
        for name in ("train_accuracy", "test_loss", "test_accuracy"):
            agg = getattr(r, name)
            record.update(
                {
                    f"{name}_mean": agg.mean,
                    f"{name}_std": _or_none(agg.std),
                    f"{name}_ci_low": _or_none(agg.ci_low),
                    f"{name}_ci_high": _or_none(agg.ci_high),
                }
            )
        record.update(
            wall_seconds=r.wall_seconds,
            seconds_per_epoch=r.seconds_per_epoch,
            samples_per_second=r.samples_per_second,
            train_gflops_per_second=r.train_gflops_per_second,
            precision=r.precision,
            device=r.device,
        )
        out.append(record)
    return out


def comparison_csv(rows: Sequence[ArmStats]) -> str:
    """comparison.csv: the table with full-precision numbers."""
    data = records(rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(data[0]) if data else ["model"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(data)
    return out.getvalue()


def _choice_record(choice: Choice, sentence: str) -> dict[str, Any]:
    record = dict(asdict(choice), sentence=sentence)
    if not record["reason"]:
        del record["reason"]
    return record


def _comparison_record(c: Comparison) -> dict[str, Any]:
    return dict(asdict(c), testable=c.testable, significant=c.significant, sentence=c.sentence())


def comparison_json(
    rows: Sequence[ArmStats],
    comparisons: Sequence[Comparison],
    choice: Choice | None = None,
    settings: Sequence[ModelSettings] = (),
) -> dict[str, Any]:
    """comparison.json: the records, the best arm and how it was chosen, and every pairwise test; in a
    sweep also `best_settings`: per model, its best setting and its tests against the runners-up."""
    family = max((c.family for c in comparisons if c.testable), default=0)
    data = {
        "models": records(rows),
        "statistics": {
            "spread": "sample standard deviation over seeds (null for one seed)",
            "interval": "95% Student t interval of the mean (null for one seed)",
            "test": "Welch's two-sided t-test on per-seed test accuracy",
            "adjustment": "holm" if family > 1 else "none",
            "family_size": family,
            "alpha": 0.05,
            "difference_intervals": "95%, unadjusted",
            "note": statistics_note(rows, comparisons),
        },
        "best": None if choice is None else _choice_record(choice, choice.sentence()),
        "pairwise": [_comparison_record(c) for c in comparisons],
    }
    if settings:
        data["best_settings"] = [settings_record(m) for m in settings]
    return data


def _aggregate_record(agg: Aggregate | None) -> dict[str, Any] | None:
    if agg is None:
        return None
    return {"mean": agg.mean, "std": _or_none(agg.std), "ci_low": _or_none(agg.ci_low),
            "ci_high": _or_none(agg.ci_high), "n": agg.n}  # fmt: skip


def settings_record(model: ModelSettings) -> dict[str, Any]:
    """One model of comparison.json's `best_settings`: its arms, its best setting and the tests."""
    return {
        "model": model.model,
        "swept": list(model.swept),
        "arms": [
            {
                "arm": a.arm,
                "settings": a.settings,
                "test_accuracy": _aggregate_record(a.test_accuracy),
                "val_accuracy": _aggregate_record(a.val_accuracy),
            }
            for a in model.arms
        ],  # fmt: skip
        "best": None
        if model.choice is None or model.best is None
        else dict(_choice_record(model.choice, model.sentence()), settings=model.best.settings),
        "tests": {
            "test": "Welch's two-sided t-test on per-seed test accuracy: the best setting against each runner-up",
            "adjustment": "holm" if model.family > 1 else "none",
            "family": f"the {model.model} comparisons only (one family per model)",
            "family_size": model.family,
            "alpha": 0.05,
            "comparisons": [_comparison_record(c) for c in model.tests],
        },
    }


# ---------------------------------------------------------------------------------------------
# The report's other tables


def _pp(value: float) -> str:
    return "–" if math.isnan(value) else f"{value * 100:+.2f}"


PAIRWISE_TEXT_COLUMNS = (0, 1, 7)


def _p(value: float) -> str:
    return "–" if math.isnan(value) else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def pairwise_table(comparisons: Sequence[Comparison]) -> tuple[list[str], Rows]:
    """The pairwise table: difference in mean test accuracy (pp), its unadjusted 95% CI, Welch's p,
    the Holm-adjusted p the verdict uses, the verdict."""
    headers = [
        "Model A",
        "Model B",
        "A − B (pp)",
        "95% CI (pp, unadjusted)",
        "p (Welch)",
        "p (Holm)",
        "Seeds",
        "Verdict",
    ]
    rows = []
    for c in comparisons:
        verdict = _verdict(c)
        ci = "–" if math.isnan(c.ci_low) else f"{c.ci_low * 100:.2f} to {c.ci_high * 100:.2f}"
        seeds = str(c.n_a) if c.n_a == c.n_b else f"{c.n_a} / {c.n_b}"
        rows.append(
            [c.a, c.b, _pp(c.difference), ci, _p(c.p_value), _p(c.p_adjusted) if c.testable else "–", seeds, verdict]
        )
    return headers, rows


def _agg_cells(agg: Aggregate | None) -> list[str]:
    if agg is None:
        return []
    return ["–" if math.isnan(agg.mean) else agg.format(), agg.format_ci() or "–"]


def settings_table(model: ModelSettings) -> tuple[list[str], Rows, tuple[int, ...]]:
    """One model's arms in a sweep: its swept settings, the arm, validation accuracy (with held-out
    images), test accuracy, then the best setting minus this one in test accuracy with Welch's test,
    Holm-adjusted over this model's comparisons. Returns the headers, the rows and the text columns."""
    validation = any(a.val_accuracy is not None for a in model.arms)
    headers = [*model.swept, "Arm"]
    headers += ["Val acc", "Val acc 95% CI"] if validation else []
    headers += ["Test acc", "Test acc 95% CI", "Seeds", "Best − this (pp)", "95% CI (pp, unadjusted)"]
    headers += ["p (Welch)", "p (Holm)", "Verdict"]
    tests = {c.b: c for c in model.tests}
    best = model.best
    rows = []
    for a in model.arms:
        cells = [_setting_cell(a, key) for key in model.swept] + [a.arm]
        cells += _agg_cells(a.val_accuracy) + _agg_cells(a.test_accuracy) + [str(a.test_accuracy.n)]
        c = tests.get(a.arm)
        if best is not None and a.arm == best.arm:
            cells += ["", "", "", "", f"best (by {model.choice.metric})" if model.choice else "best"]
        elif c is None:
            cells += ["–", "–", "–", "–", ""]
        else:
            ci = "–" if math.isnan(c.ci_low) else f"{c.ci_low * 100:.2f} to {c.ci_high * 100:.2f}"
            cells += [_pp(c.difference), ci, _p(c.p_value), _p(c.p_adjusted) if c.testable else "–", _verdict(c)]
        rows.append(cells)
    text = tuple(range(len(model.swept) + 1)) + (len(headers) - 1,)
    return headers, rows, text


def _setting_cell(arm: SettingArm, key: str) -> str:
    value = arm.settings.get(key)
    return "none" if value is None else (repr(value) if isinstance(value, float) else str(value))


def _verdict(c: Comparison) -> str:
    if not c.testable:
        return "seeds do not vary: no test" if not c.seeds_vary else "not tested"
    if c.significant:
        return f"{c.a if c.difference > 0 else c.b} better"
    return "no significant difference"


def settings_note(model: ModelSettings) -> str:
    """What a model's settings table and its verdicts are, in words."""
    basis = (
        f"The best setting is chosen by mean {model.choice.metric} over seeds"
        + (" on the test set (optimistic: the test set chose it, so its lead is flattered)" if model.choice.on_test
           else " on held-out training images, not on the test set")
        if model.choice
        else "No setting has a valid accuracy"
    )  # fmt: skip
    family = model.family
    if family > 1:
        tests = (
            f"Welch's t-tests of the best setting against each of the {family} runners-up on per-seed test accuracy, "
            f"Holm-adjusted over these {family} comparisons: one family per model, apart from the pairwise "
            "comparisons of the whole run"
        )
    elif family == 1:
        tests = "Welch's t-test of the best setting against the runner-up on per-seed test accuracy (one comparison)"
    else:
        tests = "No test against the runners-up: it needs at least 2 seeds per arm whose accuracies vary"
    return f"{basis}. {tests}; intervals of differences are unadjusted 95%."


COST_TEXT_COLUMNS = (0, 9)


def cost_table(details: Sequence[ArmDetails]) -> tuple[list[str], Rows]:
    """Per arm: size, FLOPs per sample, training time and throughput (means over seeds)."""
    headers = [
        "Model",
        "Params",
        "FLOPs/sample (inference)",
        "FLOPs/sample (training)",
        "Epochs",
        "Training time",
        "s/epoch",
        "Samples/s",
        "Training GFLOP/s",
        "Device",
    ]
    rows = []
    for d in details:
        first = d.units[0].metrics
        rows.append(
            [
                d.name,
                f"{first['params']:,}",
                format_flops(d.forward_flops),
                format_flops(d.training_flops),
                str(first["epochs"]),
                format_duration(d.mean_metric("train_seconds")),
                f"{d.mean_metric('seconds_per_epoch'):.1f}",
                f"{d.mean_metric('samples_per_second'):,.0f}",
                f"{d.mean_metric('train_gflops_per_second'):.1f}",
                str(first.get("hardware", {}).get("device_name", "?")),
            ]
        )
    return headers, rows


def per_class_table(details: Sequence[ArmDetails], classes: Sequence[str]) -> tuple[list[str], Rows]:
    """Rows are classes: test images per seed, then each arm's accuracy on that class."""
    headers = ["Class", "Test images"] + [d.name for d in details]
    support = details[0].confusion.sum(axis=1) // max(len(details[0].units), 1)
    rows = []
    for i, name in enumerate(classes):
        cells = [name, f"{support[i]:,}"]
        cells += ["–" if math.isnan(a) else f"{a:.4f}" for a in (d.per_class_accuracy[i] for d in details)]
        rows.append(cells)
    return headers, rows
