"""The tables a run shows and the progress lines it prints, as a user reads them."""

from __future__ import annotations

import csv
import io

from cnnlab.progress import PlainReporter
from cnnlab.results import EpochRecord
from cnnlab.stats import arm_stats, pairwise
from cnnlab.tables import (
    comparison_csv,
    comparison_headers,
    comparison_json,
    comparison_markdown,
    comparison_rows,
    markdown_table,
    pairwise_table,
    statistics_note,
)
from test_stats import unit


def test_markdown_table_escapes_pipes_and_newlines_and_aligns_numbers():
    text = markdown_table(["Model", "Acc"], [["a|b", "0.9"], ["line\nbreak", "1.0"]])
    assert text.splitlines() == ["| Model | Acc |", "| --- | ---: |", "| a\\|b | 0.9 |", "| line break | 1.0 |"]


def test_one_seed_shows_no_spread_and_no_interval_columns():
    rows = arm_stats([unit("a", 0, 0.99), unit("b", 0, 0.98)])
    headers = comparison_headers(rows)
    assert "Test acc 95% CI" not in headers and "Seeds" not in headers
    assert comparison_rows(rows)[0][headers.index("Test acc")] == "0.9900"  # a mean alone, no "± 0.0000"
    record = next(csv.DictReader(io.StringIO(comparison_csv(rows))))
    assert record["test_accuracy_std"] == "" and record["test_accuracy_ci_low"] == ""  # not 0.0
    assert comparison_json(rows, [])["models"][0]["test_accuracy_std"] is None


def test_several_seeds_label_spread_intervals_and_the_adjustment():
    units = [
        unit(arm, s, acc)
        for arm, accs in (("a", [0.99, 0.98, 0.985]), ("b", [0.95, 0.96, 0.955]), ("c", [0.97, 0.975, 0.965]))
        for s, acc in enumerate(accs)
    ]
    rows, comparisons = arm_stats(units), pairwise(units)
    headers = comparison_headers(rows)
    assert {"Test acc 95% CI", "Seeds"} <= set(headers)
    assert comparison_rows(rows)[0][headers.index("Test acc")] == "0.9850 ± 0.0050"
    note = statistics_note(rows, comparisons)
    assert "±: the sample standard deviation over an arm's seeds" in note
    assert "Train acc: the best epoch's running training accuracy" in note
    assert "Holm-adjusted over the 3 pairwise comparisons" in note and "unadjusted 95%" in note
    markdown = comparison_markdown(rows, comparisons)
    assert note in markdown and all(c.sentence() in markdown for c in comparisons)
    statistics = comparison_json(rows, comparisons)["statistics"]
    assert statistics["adjustment"] == "holm" and statistics["family_size"] == 3
    headers, table = pairwise_table(comparisons)
    assert headers[3:6] == ["95% CI (pp, unadjusted)", "p (Welch)", "p (Holm)"]
    assert table[0][7] == "a better"


def test_identical_seeds_are_labelled_in_the_pairwise_table():
    units = [unit("a", s, 0.99) for s in range(2)] + [unit("b", s, 0.98) for s in range(2)]
    headers, table = pairwise_table(pairwise(units))
    assert table == [["a", "b", "+1.00", "–", "–", "–", "2", "seeds do not vary: no test"]]


def test_plain_progress_prints_one_keras_style_line_per_epoch():
    out = io.StringIO()
    reporter = PlainReporter("convnet7 seed 1", out)
    reporter.start_epoch(2, 12, 469)
    reporter.update(100, 12800, 0.5, 0.8)
    assert out.getvalue() == ""  # piped output gets no bar, only the epoch's line
    reporter.end_epoch(EpochRecord(2, 0.31234, 0.91, 0.2, 0.95, 30.0, 2.0, 2000.0))
    assert out.getvalue() == (
        "convnet7 seed 1 epoch 2/12 - 32.0s - loss: 0.3123 - accuracy: 0.9100 - "
        "val_loss: 0.2000 - val_accuracy: 0.9500 - 2,000 samples/s\n"
    )


def test_units_trained_together_report_plain_lines_even_in_a_terminal():
    # Units trained together (--units-at-once) get one plain line per epoch, not live bars out of step.
    from rich.console import Console

    from cnnlab.progress import RichReporter, make_reporter

    terminal = Console(force_terminal=True, file=io.StringIO())
    assert isinstance(make_reporter("convnet7", terminal), RichReporter)
    assert isinstance(make_reporter("convnet7", terminal, live=False), PlainReporter)
