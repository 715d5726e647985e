"""Tests for the report of a sweep: each model's best setting, chosen by the rule against choosing on
the test set, its Holm-adjusted tests against the runners-up (one family per model), the plot of
accuracy against each swept setting, comparison.json's `best_settings`; and a plain comparison left as
it was.

The run folders are made without training, as tests/test_report.py's `make_run` does: `write_run` plans a
run with `cnnlab.api.plan_run`, records it with `RunFolder.write_plan` and stores each unit with
`RunFolder.save_result`, with test and validation accuracies chosen per unit so every number is known.
One test trains a real tiny sweep (2 learning rates x 2 seeds of a 4-filter network on 64 images).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from cnnlab.analysis import analyze
from cnnlab.api import plan_run, report, run
from cnnlab.catalog import spec_from_text
from cnnlab.cli import main
from cnnlab.config import DataSelection, HardwareRequest, Recipe, RunPlan, Unit
from cnnlab.engine import Evaluation, TrainResult
from cnnlab.models import build_model
from cnnlab.options import ExponentialDecay
from cnnlab.results import EpochRecord
from cnnlab.runfolder import RunFolder
from cnnlab.runner import unit_metrics
from cnnlab.stats import holm, welch
from cnnlab.sweep import expand_grid
from synthetic import SMALL_SPEC, learnable_arrays, write_dataset_folder

TEST_IMAGES = 100
LABELS = torch.arange(TEST_IMAGES) % 10
LEARNING_RATES = (1e-3, 3e-4, 1e-4)
# (test accuracy, validation accuracy) per model, learning rate and seed 0, 1, 2. For `small` the best
# validation accuracy is at 3e-4 and the best test accuracy at 1e-3: the rule must pick 3e-4.
SCORES = {
    "small": {1e-3: [(0.97, 0.90), (0.96, 0.91), (0.98, 0.90)],
              3e-4: [(0.90, 0.95), (0.92, 0.96), (0.91, 0.95)],
              1e-4: [(0.80, 0.85), (0.83, 0.84), (0.81, 0.86)]},
    "tiny": {1e-3: [(0.70, 0.70), (0.72, 0.71), (0.71, 0.72)],
             3e-4: [(0.75, 0.76), (0.74, 0.75), (0.76, 0.77)],
             1e-4: [(0.88, 0.90), (0.86, 0.89), (0.89, 0.91)]},
}  # fmt: skip


def small_spec(name: str = "small"):
    return dataclasses.replace(spec_from_text(SMALL_SPEC, source="<test>", default_name="small"), name=name)


def table_scores(unit: Unit) -> tuple[float, float]:
    """SCORES of a unit: its model, learning rate and seed."""
    return SCORES[unit.arm.spec.name][unit.arm.recipe.learning_rate][unit.seed]


def write_run(
    run_dir: Path,
    *,
    models: Sequence[str] = ("small", "tiny"),
    recipes: Sequence[Recipe] = tuple(Recipe(epochs=2, learning_rate=lr) for lr in LEARNING_RATES),
    seeds: Sequence[int] = (0, 1, 2),
    val_split: float = 0.1,
    scores: Callable[[Unit], tuple[float, float]] = table_scores,
    finished: int | None = None,
    dataset: str = "mnist",
    limit_test: int = TEST_IMAGES,
    labels: torch.Tensor = LABELS,
) -> RunPlan:
    """A run folder as `cnnlab compare` or `cnnlab sweep` leaves it, without training: each unit's test
    accuracy and final validation accuracy are `scores(unit)`; `finished` limits the saved units."""
    plan = plan_run(
        [small_spec(m) for m in models],
        recipes=list(recipes),
        seeds=tuple(seeds),
        data=DataSelection(dataset=dataset, data_dir="/data/none", limit_train=256, limit_test=limit_test,
                           val_split=val_split),
        hardware=HardwareRequest(device="cpu"),
    )  # fmt: skip
    run_dir.mkdir(parents=True)
    folder = RunFolder(run_dir)
    folder.write_plan(plan)
    for saved, unit in enumerate(plan.units()):
        if finished is not None and saved == finished:
            break
        test_accuracy, val_accuracy = scores(unit)
        wrong = round((1 - test_accuracy) * len(labels))
        predictions = torch.where(torch.arange(len(labels)) < wrong, (labels + 1) % 10, labels)
        confidences = torch.full((len(labels),), 0.9)
        accuracy = (predictions == labels).float().mean().item()
        history = [EpochRecord(e, 1.0 / e, 0.5 + 0.1 * e, 0.9 / e, val_accuracy - 0.1 * (2 - e), 1.0, 0.1, 256.0)
                   for e in (1, 2)]  # fmt: skip
        result = TrainResult(history, Evaluation(0.3, accuracy, predictions, confidences), build_model(unit.arm.spec))
        folder.save_result(
            unit,
            history,
            unit_metrics(unit, result, plan.hardware),
            result.model.state_dict(),
            {"labels": labels, "predictions": predictions, "confidences": confidences},
            None,
        )
    return plan


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two models x three learning rates x three seeds with a validation split, reported by `cnnlab report`."""
    run_dir = tmp_path_factory.mktemp("sweep") / "20261126-120000-sweep"
    write_run(run_dir)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", str(run_dir)]) == 0
    return run_dir, out.getvalue()


def accuracies(run_dir: Path, arm: str) -> list[float]:
    folder = RunFolder.open(run_dir)
    return [r.test_accuracy for r in folder.results(folder.read_plan()) if r.arm == arm]


# ---------------------------------------------------------------------------------------------
# Each model's best setting


def test_each_model_gets_its_best_setting_by_validation_accuracy(sweep_run: tuple[Path, str]) -> None:
    run_dir, out = sweep_run
    analysis = analyze(RunFolder.open(run_dir))
    small, tiny = analysis.settings
    assert (small.model, small.swept, tiny.model) == ("small", ("lr",), "tiny")
    assert [a.arm for a in small.arms] == ["small", "small@lr=0.0003", "small@lr=0.0001"]
    assert [a.settings for a in small.arms] == [{"lr": 0.001}, {"lr": 0.0003}, {"lr": 0.0001}]
    # The rule: validation accuracy, although small's best test accuracy is at lr=0.001.
    assert small.choice.arm == "small@lr=0.0003" and small.choice.metric == "validation accuracy"
    assert not small.choice.on_test and small.choice.value == pytest.approx(2.86 / 3)
    assert max(small.arms, key=lambda a: a.test_accuracy.mean).arm == "small"
    assert small.best.val_accuracy.mean == pytest.approx(2.86 / 3) and small.best.test_accuracy.n == 3
    assert tiny.choice.arm == "tiny@lr=0.0001" and tiny.best.settings == {"lr": 0.0001}
    sentence = "Best setting of small: lr=0.0003 (small@lr=0.0003), by mean validation accuracy 0.9533"
    assert small.sentence().startswith(sentence) and "held-out training images" in small.sentence()
    assert sentence in out  # `cnnlab report` prints it


def test_the_best_setting_is_tested_against_each_runner_up_in_one_holm_family_per_model(
    sweep_run: tuple[Path, str],
) -> None:
    run_dir, _ = sweep_run
    analysis = analyze(RunFolder.open(run_dir))
    assert max(c.family for c in analysis.comparisons) == 15  # the run's pairwise family: 6 arms
    for model in analysis.settings:
        best = model.choice.arm
        runners_up = [a.arm for a in model.arms if a.arm != best]
        assert {c.a for c in model.tests} == {best} and sorted(c.b for c in model.tests) == sorted(runners_up)
        assert model.family == 2 and all(c.family == 2 for c in model.tests)
        raw = [welch(accuracies(run_dir, best), accuracies(run_dir, c.b)).p_value for c in model.tests]
        assert [c.p_value for c in model.tests] == pytest.approx(raw)
        assert [c.p_adjusted for c in model.tests] == pytest.approx(holm(raw))
    small = analysis.settings[0]
    # small@lr=0.0003 (test 0.91) vs small (0.97) and small@lr=0.0001 (0.813): the chosen setting loses on test
    # to lr=0.001, and says so.
    by_runner_up = {c.b: c for c in small.tests}
    assert by_runner_up["small"].difference == pytest.approx(0.91 - 0.97)
    assert by_runner_up["small@lr=0.0001"].difference == pytest.approx(0.91 - 2.44 / 3)


def test_without_a_validation_split_the_best_setting_is_labelled_optimistic(tmp_path: Path) -> None:
    run_dir = tmp_path / "20261126-120000-sweep"
    write_run(run_dir, models=("small",), val_split=0.0)
    report(run_dir)
    (small,) = analyze(RunFolder.open(run_dir)).settings
    assert small.choice.arm == "small" and small.choice.on_test and small.choice.metric == "test accuracy"
    assert all(a.val_accuracy is None for a in small.arms)
    assert "chosen on the test set (optimistic" in small.sentence()
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    settings = page[page.index('<section id="settings">') :]
    settings = settings[: settings.index("</section>")]
    assert "chosen on the test set (optimistic" in settings and "Val acc" not in settings
    best = json.loads((run_dir / "comparison.json").read_text())["best_settings"][0]["best"]
    assert best["on_test"] and best["metric"] == "test accuracy"


# ---------------------------------------------------------------------------------------------
# The files: report.html, report.md, the plot and comparison.json


def test_the_report_has_a_settings_section_and_a_plot_per_swept_setting(sweep_run: tuple[Path, str]) -> None:
    run_dir, _ = sweep_run
    plot = run_dir / "settings_lr.png"
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in run_dir.glob("settings_*")) == ["settings_lr.png"]
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert '<a href="#settings">Settings</a>' in page
    section = page[page.index('<section id="settings">') :]
    section = section[: section.index("</section>")]
    for text in ("<h3>small</h3>", "<h3>tiny</h3>", "Val acc", "p (Holm)", "one family per model",
                 "Holm-adjusted over these 2 comparisons", "Mean accuracy against lr"):  # fmt: skip
        assert text in section, text
    assert section.count("<img ") == 1
    markdown = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "## Settings" in markdown and "![accuracy against lr](settings_lr.png)" in markdown
    assert "**Best setting of tiny: lr=0.0001 (tiny@lr=0.0001), by mean validation accuracy" in markdown


def test_comparison_json_records_each_models_best_setting(sweep_run: tuple[Path, str]) -> None:
    run_dir, _ = sweep_run
    data = json.loads((run_dir / "comparison.json").read_text())
    analysis = analyze(RunFolder.open(run_dir))
    records = data["best_settings"]
    assert [r["model"] for r in records] == ["small", "tiny"]
    small = records[0]
    assert small["swept"] == ["lr"]
    assert small["best"]["arm"] == "small@lr=0.0003" and small["best"]["settings"] == {"lr": 0.0003}
    assert small["best"]["metric"] == "validation accuracy" and small["best"]["on_test"] is False
    assert small["best"]["sentence"] == analysis.settings[0].sentence()
    assert [a["settings"] for a in small["arms"]] == [{"lr": 0.001}, {"lr": 0.0003}, {"lr": 0.0001}]
    assert small["arms"][1]["val_accuracy"]["mean"] == pytest.approx(2.86 / 3)
    tests = small["tests"]
    assert tests["adjustment"] == "holm" and tests["family_size"] == 2 and "one family per model" in tests["family"]
    expected = {c.b: c.p_adjusted for c in analysis.settings[0].tests}
    assert {c["b"]: c["p_adjusted"] for c in tests["comparisons"]} == pytest.approx(expected)
    assert data["best"]["arm"] == "small@lr=0.0003"  # the run's best arm, by validation accuracy too


def test_two_swept_settings_give_one_plot_each_and_hold_the_other_at_the_best(tmp_path: Path) -> None:
    recipes = expand_grid(
        {"epochs": 2},
        {"learning_rate": [1e-3, 3e-4], "schedule": ["exponential:decay_steps=100,decay_rate=0.9", "cosine:decay_steps=100"]},
        "test",
    )  # fmt: skip
    exponential = lambda unit: isinstance(unit.arm.recipe.schedule, ExponentialDecay)
    scores = lambda unit: (0.9 if exponential(unit) else 0.8, 0.95 - (unit.arm.recipe.learning_rate == 1e-3) * 0.1
                           - (not exponential(unit)) * 0.02 + 0.01 * unit.seed)  # fmt: skip
    run_dir = tmp_path / "20261126-120000-grid"
    write_run(run_dir, models=("small",), recipes=recipes, seeds=(0, 1), scores=scores)
    summary = report(run_dir)
    (small,) = summary.analysis.settings
    assert small.swept == ("lr", "schedule")
    assert small.best.arm == small.choice.arm and small.best.settings["lr"] == 0.0003
    assert small.best.settings["schedule"].startswith("exponential")
    assert [a.settings["lr"] for a in small.along("lr")] == [0.001, 0.0003]
    assert {a.settings["lr"] for a in small.along("schedule")} == {0.0003}
    assert {p.name for p in run_dir.glob("settings_*")} == {"settings_lr.png", "settings_schedule.png"}
    assert all(p in summary.files for p in run_dir.glob("settings_*"))


# ---------------------------------------------------------------------------------------------
# A plain comparison looks as before


def test_a_plain_comparison_has_no_settings_section(tmp_path: Path) -> None:
    run_dir = tmp_path / "20261126-120000-compare"
    write_run(run_dir, recipes=(Recipe(epochs=2, learning_rate=1e-3),), seeds=(0, 1))
    summary = report(run_dir)
    assert summary.analysis.settings == []
    assert not list(run_dir.glob("settings_*"))
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert 'id="settings"' not in page and "Best setting" not in page
    assert "## Settings" not in (run_dir / "report.md").read_text(encoding="utf-8")
    data = json.loads((run_dir / "comparison.json").read_text())
    assert "best_settings" not in data and set(data) == {"models", "statistics", "best", "pairwise"}
    assert set(data["best"]) == {"arm", "metric", "value", "on_test", "sentence"}


# ---------------------------------------------------------------------------------------------
# A real tiny sweep


def test_a_real_tiny_sweep_reports_each_models_best_setting(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dataset_folder(data / "mnist", learnable_arrays(96, 32))
    plan = plan_run(
        [small_spec()],
        recipes=[Recipe(epochs=1, batch_size=32, learning_rate=lr) for lr in (1e-2, 1e-3)],
        seeds=(0, 1),
        data=DataSelection(data_dir=str(data), limit_train=64, val_split=0.25),
        hardware=HardwareRequest(device="cpu", compile="off"),
    )
    with pytest.warns(UserWarning, match="checksums"):  # generated files are not the canonical ones
        summary = run(plan, runs_dir=tmp_path / "runs", name="sweep")
    (small,) = summary.analysis.settings
    assert [a.arm for a in small.arms] == ["small", "small@lr=0.001"]
    assert small.choice.metric == "validation accuracy" and not small.choice.on_test
    means = {a.arm: a.val_accuracy.mean for a in small.arms}
    assert small.choice.arm == max(means, key=means.get)
    assert small.family in (0, 1) and len(small.tests) == 1
    assert (summary.folder.path / "settings_lr.png").is_file()
    data_json = json.loads((summary.folder.path / "comparison.json").read_text())
    assert data_json["best_settings"][0]["best"]["arm"] == small.choice.arm
    assert re.search(r"Best setting of small: lr=0\.0?1", small.sentence())
