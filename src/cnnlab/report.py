"""Everything a finished run shows a person: the table, the pairwise verdicts and the plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnnlab.errors import RunError
from cnnlab.plots import write_plots
from cnnlab.runs import UnitResult, load_units
from cnnlab.stats import Comparison, ModelStats, model_stats, pairwise
from cnnlab.tables import write_tables


@dataclass
class RunSummary:
    """What `finish_run` computed, for the CLI to print."""

    rows: list[ModelStats]
    comparisons: list[Comparison]
    files: list[Path]


def finish_run(run_dir: Path, image_format: str = "png") -> RunSummary:
    """Write the comparison tables and plots of a run folder from its finished model/seed results."""
    units: list[UnitResult] = load_units(run_dir)
    if not units:
        raise RunError(f"{run_dir} has no finished model yet; resume it with `cnnlab compare --resume {run_dir}`")
    rows = model_stats(units)
    comparisons = pairwise(units) if len(rows) > 1 else []
    write_tables(run_dir, rows, comparisons)
    files = [run_dir / f"comparison.{ext}" for ext in ("md", "csv", "json")]
    files += write_plots(run_dir, units, image_format)
    return RunSummary(rows, comparisons, files)
