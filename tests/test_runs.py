"""Tests for `cnnlab runs` (the run folders of a folder) and `cnnlab report A B -o DIR` (one comparison
built from several run folders tested on the same images).

The run folders are written without training by tests/test_sweep_report.py's `write_run`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cnnlab.analysis import analyze, list_runs
from cnnlab.api import combine
from cnnlab.cli import main
from cnnlab.config import Recipe
from cnnlab.errors import CnnlabError
from cnnlab.results import UnitStatus
from cnnlab.runfolder import RunFolder
from test_sweep_report import LABELS, write_run

ONE_LR = (Recipe(epochs=2, learning_rate=1e-3),)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("error: "), err
    return err


def line_of(out: str, name: str) -> str:
    (line,) = [line for line in out.splitlines() if f"│ {name} " in line]
    return line


def digest(folder: Path) -> dict[str, str]:
    """Every file of a folder and its SHA-256: to show a folder was left as it was."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# cnnlab runs


def test_runs_lists_finished_incomplete_failed_and_foreign_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    write_run(runs / "a-sweep", models=("small",), seeds=(0, 1, 2))  # finished, validation split
    write_run(runs / "b-partial", models=("small", "tiny"), recipes=ONE_LR, seeds=(0, 1), val_split=0.0, finished=3)
    plan = write_run(runs / "c-failed", models=("small",), recipes=ONE_LR, seeds=(0, 1), val_split=0.0, finished=1)
    RunFolder(runs / "c-failed").set_status(plan.units()[1], UnitStatus("failed", 1, "RuntimeError: boom"))
    (runs / "d-junk").mkdir()
    (runs / "d-junk" / "notes.txt").write_text("not a run")
    (runs / "e-damaged").mkdir()
    (runs / "e-damaged" / "config.toml").write_text("this is [not toml")
    (runs / "readme.txt").write_text("a file, not a folder")

    listings = {r.name: r for r in list_runs(runs)}
    assert list(listings) == ["a-sweep", "b-partial", "c-failed", "d-junk", "e-damaged"]
    a, b, c = listings["a-sweep"], listings["b-partial"], listings["c-failed"]
    assert (a.state, a.dataset, a.arms, a.finished, a.total) == ("finished", "mnist", 3, 9, 9)
    assert a.best_arm == "small@lr=0.0003" and a.chosen_on == "validation"  # chosen on validation, not test
    assert a.best_test_accuracy == pytest.approx(0.91)
    started = json.loads((runs / "a-sweep" / "environment.json").read_text())["started"]
    assert a.started == started
    assert (b.state, b.arms, b.finished, b.total, b.chosen_on) == ("incomplete", 2, 3, 4, "test")
    assert (c.state, c.finished, c.total, c.failed, c.best_arm, c.chosen_on) == ("failed", 1, 2, 1, "small", None)
    assert listings["d-junk"].state == "not a run folder"
    assert listings["e-damaged"].state == "damaged" and "not valid TOML" in listings["e-damaged"].problem

    assert main(["runs", str(runs)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "Traceback" not in out + captured.err and captured.err == ""
    line = line_of(out, "a-sweep")
    for cell in (started.replace("T", " "), "mnist", "9/9", "0.9100", "small@lr=0.0003 (chosen on validation)",
                 "finished"):  # fmt: skip
        assert cell in line, (cell, line)
    assert "3/4" in line_of(out, "b-partial") and "incomplete" in line_of(out, "b-partial")
    assert "(chosen on the test set)" in line_of(out, "b-partial")
    assert "1/2" in line_of(out, "c-failed") and "failed (1 unit)" in line_of(out, "c-failed")
    assert "not a run folder" in line_of(out, "d-junk")
    assert "damaged" in line_of(out, "e-damaged")
    assert "readme.txt" not in out


def test_runs_of_a_missing_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert main(["runs", str(tmp_path)]) == 0
    assert "No run folders in" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# cnnlab report A B -o DIR


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A: small and tiny at lr 0.001; B: small at lr 0.0003 (also named `small`); both reported."""
    root = tmp_path_factory.mktemp("combine")
    a, b = root / "run-a", root / "run-b"
    write_run(a, models=("small", "tiny"), recipes=ONE_LR, seeds=(0, 1))
    write_run(b, models=("small",), recipes=(Recipe(epochs=2, learning_rate=3e-4),), seeds=(0, 1, 2))
    for run_dir in (a, b):
        assert main(["report", str(run_dir)]) == 0
    return a, b


def test_report_combines_two_runs_tested_on_the_same_images(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = two_runs
    before = digest(a), digest(b)
    out_dir = tmp_path / "combined"
    assert main(["report", str(a), str(b), "-o", str(out_dir)]) == 0
    assert f"Report: {out_dir / 'report.html'}" in capsys.readouterr().out
    assert (digest(a), digest(b)) == before  # copied, not moved: the inputs are as they were

    combined = json.loads((out_dir / "comparison.json").read_text())
    names = [m["model"] for m in combined["models"]]
    assert names == ["run-a/small", "tiny", "run-b/small"]  # the shared name is prefixed, the other kept
    inputs = {("run-a", m["model"]): m for m in json.loads((a / "comparison.json").read_text())["models"]}
    inputs |= {("run-b", m["model"]): m for m in json.loads((b / "comparison.json").read_text())["models"]}
    for record, key in zip(combined["models"], [("run-a", "small"), ("run-a", "tiny"), ("run-b", "small")]):
        assert {k: v for k, v in record.items() if k != "model"} == {
            k: v for k, v in inputs[key].items() if k != "model"
        }, key

    folder = RunFolder.open(out_dir)
    plan = folder.read_plan()
    assert [a.name for a in plan.arms] == names and plan.seeds == (0, 1, 2)
    assert [r.arm for r in folder.results(plan)].count("tiny") == 2  # its two seeds, no seed 2 invented
    analysis = analyze(folder)
    assert analysis.unfinished == []  # A's arms were never planned with seed 2
    (small,) = analysis.settings  # small at two learning rates, from two runs
    assert [s.settings for s in small.arms] == [{"lr": 0.001}, {"lr": 0.0003}]
    assert small.choice.metric == "validation accuracy"  # the same validation split in both runs
    sources = json.loads((out_dir / "sources.json").read_text())
    assert [s["run"] for s in sources] == ["run-a", "run-b"]
    assert sources[0]["arms"] == {"small": "run-a/small", "tiny": "tiny"}
    unit = plan.units()[0]
    assert (folder.unit_dir(unit) / "weights.pt").is_file()
    assert json.loads((folder.unit_dir(unit) / "metrics.json").read_text())["arm"] == "run-a/small"
    page = (out_dir / "report.html").read_text(encoding="utf-8")
    assert "Combined from" in page and "run-b (1 arm, seeds 0, 1, 2" in page


def test_combined_runs_with_different_validation_splits_choose_on_the_test_set(
    two_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    a, _ = two_runs
    c = tmp_path / "run-c"
    write_run(c, models=("small",), recipes=(Recipe(epochs=2, learning_rate=1e-4),), seeds=(0, 1), val_split=0.2)
    summary = combine([a, c], tmp_path / "combined")
    analysis = summary.analysis
    assert not analysis.on_validation
    assert analysis.choice.on_test and analysis.choice.metric == "test accuracy"
    assert "different validation images" in analysis.choice.sentence()
    (small,) = analysis.settings
    assert small.choice.on_test and "chosen on the test set (optimistic" in small.sentence()
    assert json.loads((tmp_path / "combined" / "comparison.json").read_text())["best"]["on_test"] is True


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"limit_test": 50, "labels": LABELS[:50]}, "--limit-test 100 vs 50"),
        ({"labels": LABELS.flip(0)}, "the same number of test images with different labels"),
        ({"dataset": "fashion-mnist"}, "dataset mnist vs fashion-mnist"),
    ],
)
def test_report_refuses_runs_with_different_test_sets(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, words: str
) -> None:
    a, _ = two_runs
    other = tmp_path / "other"
    write_run(other, models=("small",), recipes=ONE_LR, seeds=(0,), **change)
    before = digest(a), digest(other)
    out_dir = tmp_path / "combined"
    assert main(["report", str(a), str(other), "-o", str(out_dir)]) == 2
    err = one_error_line(capsys)
    assert "test sets differ" in err and words in err
    assert not out_dir.exists() and (digest(a), digest(other)) == before


def test_report_refuses_an_existing_folder_that_is_not_empty(
    two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = two_runs
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    assert main(["report", str(a), str(b), "-o", str(out_dir)]) == 2
    assert "is not empty" in one_error_line(capsys)
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]
    assert main(["report", str(a), str(b)]) == 2  # several folders need -o
    assert "-o DIR" in one_error_line(capsys)
    with pytest.raises(CnnlabError, match="given twice"):
        combine([a, a], tmp_path / "twice")
    assert not (tmp_path / "twice").exists()


def test_a_run_without_a_finished_unit_is_not_combined(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = two_runs
    empty = tmp_path / "empty"
    write_run(empty, models=("small",), recipes=ONE_LR, seeds=(0,), finished=0)
    with pytest.raises(CnnlabError, match="has no finished unit"):
        combine([a, empty], tmp_path / "combined")
    assert not (tmp_path / "combined").exists()
