"""The comparison table, in the terminal (Rich), Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.table import Table

from cnnlab.models import format_flops
from cnnlab.runs import write_json, write_text
from cnnlab.stats import Comparison, ModelStats

def format_duration(seconds: float) -> str:
    """'0:01:42' style, as the seed's table, with tenths under a minute."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _flops(row: ModelStats) -> str:
    if row.train_flops_per_sample is None:
        return ""
    return f"{format_flops(row.train_flops_per_sample)} / {format_flops(row.train_flops_per_sample / 3)}"


# (header, cell, shown only with several seeds)
_COLUMNS: list[tuple[str, Callable[[ModelStats], str], bool]] = [
    ("Model", lambda r: r.model, False),
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


def _shown(rows: Sequence[ModelStats]) -> list[tuple[str, Callable[[ModelStats], str], bool]]:
    multi = any(r.test_accuracy.n > 1 for r in rows)
    return [column for column in _COLUMNS if multi or not column[2]]


def table_rows(rows: Sequence[ModelStats]) -> list[list[str]]:
    """The table's cells as text; spread and intervals appear when a model has several seeds."""
    shown = _shown(rows)
    return [[cell(r) for _, cell, _ in shown] for r in rows]


def columns(rows: Sequence[ModelStats]) -> list[str]:
    """Column headers matching `table_rows`."""
    return [header for header, _, _ in _shown(rows)]


def rich_table(rows: Sequence[ModelStats], title: str = "Comparison") -> Table:
    """The table for the terminal."""
    table = Table(title=title)
    for i, name in enumerate(columns(rows)):
        table.add_column(name, justify="left" if i == 0 or name == "Precision" else "right")
    for cells in table_rows(rows):
        table.add_row(*cells)
    return table


def markdown_table(rows: Sequence[ModelStats]) -> str:
    """The table as GitHub Markdown."""
    headers = columns(rows)
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(headers))) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines) + "\n"


def records(rows: Sequence[ModelStats]) -> list[dict[str, Any]]:
    """One flat record per model with full-precision numbers (CSV and JSON)."""
    out = []
    for r in rows:
        record: dict[str, Any] = {"model": r.model, "params": r.params, "seeds": len(r.seeds),
                                  "train_flops_per_sample": r.train_flops_per_sample}
        for name in ("train_accuracy", "test_loss", "test_accuracy"):
            agg = getattr(r, name)
            record.update({f"{name}_mean": agg.mean, f"{name}_std": agg.std,
                           f"{name}_ci_low": agg.ci_low, f"{name}_ci_high": agg.ci_high})
        record.update(wall_seconds=r.wall_seconds, seconds_per_epoch=r.seconds_per_epoch,
                      samples_per_second=r.samples_per_second, train_gflops_per_second=r.train_gflops_per_second,
                      precision=r.precision, device=r.device)
        out.append(record)
    return out


def csv_table(rows: Sequence[ModelStats]) -> str:
    """The table as CSV with full-precision numbers."""
    data = records(rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(data[0]) if data else ["model"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(data)
    return out.getvalue()


def write_tables(run_dir: Path, rows: Sequence[ModelStats], comparisons: Sequence[Comparison]) -> None:
    """comparison.md, comparison.csv and comparison.json in the run folder."""
    verdicts = "".join(f"- {c.sentence()}\n" for c in comparisons)
    markdown = markdown_table(rows) + (f"\n{verdicts}" if verdicts else "")
    write_text(run_dir / "comparison.md", markdown)
    write_text(run_dir / "comparison.csv", csv_table(rows))
    write_json(run_dir / "comparison.json", {
        "models": records(rows),
        "pairwise": [dict(asdict(c), significant=c.significant, sentence=c.sentence()) for c in comparisons],
    })
