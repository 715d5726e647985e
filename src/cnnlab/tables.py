"""The tables a run shows, as text cells, and the one Markdown table writer.

The comparison table (one row per arm, statistics over its seeds) appears in the terminal (Rich),
in Markdown, CSV and JSON; the pairwise, cost and per-class tables appear in the report.
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

from cnnlab.analysis import ArmDetails
from cnnlab.models import format_flops
from cnnlab.stats import ArmStats, Choice, Comparison

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
    rows: Sequence[ArmStats], comparisons: Sequence[Comparison], choice: Choice | None = None
) -> str:
    """comparison.md: the table, what its numbers are, the best arm, then the verdicts."""
    verdicts = (f"- {choice.sentence()}\n" if choice else "") + "".join(f"- {c.sentence()}\n" for c in comparisons)
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


def comparison_json(
    rows: Sequence[ArmStats], comparisons: Sequence[Comparison], choice: Choice | None = None
) -> dict[str, Any]:
    """comparison.json: the records, the best arm and how it was chosen, and every pairwise test."""
    family = max((c.family for c in comparisons if c.testable), default=0)
    return {
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
        "best": None if choice is None else dict(asdict(choice), sentence=choice.sentence()),
        "pairwise": [
            dict(asdict(c), testable=c.testable, significant=c.significant, sentence=c.sentence()) for c in comparisons
        ],
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
        if not c.testable:
            verdict = "seeds do not vary: no test" if not c.seeds_vary else "not tested"
        elif c.significant:
            verdict = f"{c.a if c.difference > 0 else c.b} better"
        else:
            verdict = "no significant difference"
        ci = "–" if math.isnan(c.ci_low) else f"{c.ci_low * 100:.2f} to {c.ci_high * 100:.2f}"
        seeds = str(c.n_a) if c.n_a == c.n_b else f"{c.n_a} / {c.n_b}"
        rows.append(
            [c.a, c.b, _pp(c.difference), ci, _p(c.p_value), _p(c.p_adjusted) if c.testable else "–", seeds, verdict]
        )
    return headers, rows


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
