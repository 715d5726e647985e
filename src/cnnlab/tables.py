"""The comparison table, in the terminal (Rich), Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from rich.table import Table

from cnnlab.runs import write_json, write_text
from cnnlab.stats import Comparison, ModelStats

COLUMNS = ["Model", "Params", "Train acc", "Test loss", "Test acc", "Test acc 95% CI", "Seeds", "Wall time",
           "s/epoch", "Samples/s", "Precision"]


def format_duration(seconds: float) -> str:
    """'0:01:42' style, as the seed's table, with tenths under a minute."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def table_rows(rows: Sequence[ModelStats]) -> list[list[str]]:
    """The table's cells as text; spread and interval appear when a model has several seeds."""
    multi = any(r.test_accuracy.n > 1 for r in rows)
    out = []
    for r in rows:
        cells = [r.model, f"{r.params:,}", r.train_accuracy.format(), r.test_loss.format(),
                 r.test_accuracy.format(), r.test_accuracy.format_ci(), str(len(r.seeds)),
                 format_duration(r.wall_seconds), f"{r.seconds_per_epoch:.1f}", f"{r.samples_per_second:,.0f}",
                 r.precision]
        out.append(cells if multi else cells[:5] + cells[7:])
    return out


def columns(rows: Sequence[ModelStats]) -> list[str]:
    """Column headers matching `table_rows`."""
    multi = any(r.test_accuracy.n > 1 for r in rows)
    return COLUMNS if multi else COLUMNS[:5] + COLUMNS[7:]


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
        record: dict[str, Any] = {"model": r.model, "params": r.params, "seeds": len(r.seeds)}
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
