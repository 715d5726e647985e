"""Tests for the report of a run folder: its figures, report.html / report.md, and `cnnlab report`.

The run folders here are made without training: `make_run` plans a run with `cnnlab.api.plan_run`,
records it with `RunFolder.write_plan` and stores each unit with `RunFolder.save_result`, as a real
run does, from hand-made histories and predictions, so every number in the report is known.
`test_report_renders_in_chromium` opens report.html in headless Chromium and keeps a screenshot.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import html
import io
import re
import shlex
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import cnnlab.api
from cnnlab.analysis import analyze, class_names
from cnnlab.api import plan_run, report
from cnnlab.catalog import load_spec
from cnnlab.cli import main
from cnnlab.config import DataSelection, HardwareRequest, Recipe, RunPlan, reproduce_command
from cnnlab.datasets import DATASETS, Dataset
from cnnlab.engine import DeviceData, Evaluation, TrainResult
from cnnlab.errors import RunError
from cnnlab.models import build_model, format_flops, summarize
from cnnlab.results import EpochRecord, UnitStatus
from cnnlab.runfolder import RunFolder, read_json
from cnnlab.runner import MISTAKES_KEPT, _save, unit_metrics
from cnnlab.stats import confusion_matrix

TEST_IMAGES = 100
DATA_DIR = "/data/mnist-family"
RUN_NAME = "20261126-120000-compare"


def fake_predictions(labels: torch.Tensor, model_index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first model is wrong on every 5th image from `seed` on (80% on every seed); the others on the
    first 4 + seed images (96%, 95%, ...: their seeds vary); distinct confidences in [0.5, 1)."""
    index = torch.arange(len(labels))
    wrong = index % 5 == seed if model_index == 0 else index < 4 + seed
    predictions = torch.where(wrong, (labels + 1 + model_index) % 10, labels)
    confidences = 0.5 + 0.5 * ((index * 37 + seed) % 101).float() / 101
    return predictions, confidences


def fake_test_split() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (TEST_IMAGES, 28, 28), dtype=np.uint8))
    return images, torch.arange(TEST_IMAGES) % 10


def most_confident_mistakes(
    images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, confidences: torch.Tensor
) -> dict[str, torch.Tensor]:
    """mistakes.pt as a finished unit stores it (runner._save's selection; checked against it below)."""
    wrong = torch.nonzero(predictions != labels).flatten()
    worst = wrong[confidences[wrong].argsort(descending=True, stable=True)[:MISTAKES_KEPT]]
    return {
        "indices": worst,
        "images": images[worst],
        "labels": labels[worst],
        "predictions": predictions[worst],
        "confidences": confidences[worst],
    }


def plan_of(
    models: tuple[str, ...], seeds: tuple[int, ...], recipes: tuple[Recipe, ...] = (Recipe(epochs=3),)
) -> RunPlan:
    return plan_run(
        list(models),
        recipes=list(recipes),
        seeds=seeds,
        data=DataSelection(limit_train=256, limit_test=TEST_IMAGES, data_dir=DATA_DIR),
        hardware=HardwareRequest(device="cpu"),
    )


def fake_result(unit, model_index: int, labels: torch.Tensor) -> TrainResult:
    """A unit's training result with known numbers: accuracy from `fake_predictions`, a 3-epoch history."""
    predictions, confidences = fake_predictions(labels, model_index, unit.seed)
    accuracy = (predictions == labels).float().mean().item()
    history = [
        EpochRecord(e, 1.0 / e + 0.01 * unit.seed, 0.7 + 0.05 * e, 0.9 / e, accuracy - 0.05 * (3 - e), 2.0, 0.2, 128.0)
        for e in range(1, 4)
    ]
    test = Evaluation(0.3 + 0.01 * model_index, accuracy, predictions, confidences)
    return TrainResult(history, test, build_model(unit.arm.spec, seed=unit.seed))


def make_run(
    root: Path,
    models: tuple[str, ...] = ("convnet7", "convnet5"),
    seeds: tuple[int, ...] = (0, 1),
    finished: int | None = None,
    recipes: tuple[Recipe, ...] = (Recipe(epochs=3),),
) -> Path:
    """A run folder as `cnnlab compare` leaves it, without training; `finished` limits the saved units."""
    plan = plan_of(models, seeds, recipes)
    run_dir = root / RUN_NAME
    run_dir.mkdir(parents=True)
    folder = RunFolder(run_dir)
    folder.write_plan(plan)
    images, labels = fake_test_split()
    for saved, unit in enumerate(plan.units()):
        if finished is not None and saved == finished:
            break
        result = fake_result(unit, plan.arms.index(unit.arm), labels)
        test = result.test
        folder.save_result(
            unit,
            result.history,
            unit_metrics(unit, result, plan.hardware),
            result.model.state_dict(),
            {"labels": labels, "predictions": test.predictions, "confidences": test.confidences},
            most_confident_mistakes(images, labels, test.predictions, test.confidences),
        )
    return run_dir


@pytest.fixture(scope="module")
def report_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two models x two seeds, reported with `cnnlab report RUN_DIR`: the folder and what it printed."""
    run_dir = make_run(tmp_path_factory.mktemp("report"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", str(run_dir)]) == 0
    return run_dir, out.getvalue()


@pytest.fixture(scope="module")
def report_run(report_output: tuple[Path, str]) -> Path:
    return report_output[0]


def unit_of(run_dir: Path, arm: str, seed: int):
    folder = RunFolder.open(run_dir)
    (unit,) = [u for u in folder.read_plan().units() if u.arm.name == arm and u.seed == seed]
    return folder, unit


class _Images(HTMLParser):
    """Collects every <img> src and every external reference of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.sources.append(values.get("src") or "")
        for key in ("src", "href"):
            value = values.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(f"<{tag} {key}={value[:80]}>")


def decoded_images(page: str) -> tuple[list[bytes], list[str]]:
    """The bytes of every <img> of a page (each must be a base64 data: URI) and any external references."""
    parser = _Images()
    parser.feed(page)
    images = []
    for src in parser.sources:
        match = re.fullmatch(r"data:image/(png|svg\+xml);base64,([A-Za-z0-9+/=]+)", src)
        assert match, f"<img> without a base64 data: URI: {src[:80]!r}"
        try:
            images.append(base64.b64decode(match.group(2), validate=True))
        except binascii.Error as exc:
            pytest.fail(f"an <img> data: URI does not decode: {exc}")
    return images, parser.external


def check_png(raw: bytes) -> None:
    from PIL import Image

    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(raw)) as image:
        image.verify()


# ---------------------------------------------------------------------------------------------
# What a finished unit stores for the report


def test_a_finished_unit_keeps_its_most_confident_mistakes(tmp_path: Path) -> None:
    """runner._save, as `cnnlab compare` calls it, keeps the 16 wrong test images with the highest confidence."""
    plan = plan_of(("convnet7",), (1,))
    folder = RunFolder.create(tmp_path, "mistakes")
    folder.write_plan(plan)
    (unit,) = plan.units()
    images, labels = fake_test_split()
    train_images = torch.zeros((8, 28, 28), dtype=torch.uint8)
    dataset = Dataset(
        "mnist",
        DATASETS["mnist"].classes,
        train_images,
        torch.zeros(8, dtype=torch.long),
        images,
        labels,
        tmp_path,
        verified=True,
    )
    data = DeviceData(dataset, plan.data, torch.device("cpu"))
    _save(folder, unit, fake_result(unit, 0, labels), data, plan.hardware)

    predictions, confidences = fake_predictions(labels, 0, 1)
    wrong = [i for i in range(TEST_IMAGES) if predictions[i] != labels[i]]
    expected = sorted(wrong, key=lambda i: -confidences[i].item())[:16]
    stored = folder.mistakes(unit)
    assert stored is not None
    assert stored["indices"].tolist() == expected
    assert stored["images"].dtype == torch.uint8 and stored["images"].shape == (16, 28, 28)
    assert torch.equal(stored["images"], images[expected])
    assert stored["labels"].tolist() == labels[expected].tolist()
    assert stored["predictions"].tolist() == predictions[expected].tolist()
    assert torch.equal(stored["confidences"], confidences[expected])
    assert stored["confidences"].diff().le(0).all()
    assert folder.status(unit) == UnitStatus("finished", 3)
    assert read_json(folder.unit_dir(unit) / "status.json") == {"state": "finished", "epochs_done": 3, "error": None}
    metrics = read_json(folder.unit_dir(unit) / "metrics.json")
    assert metrics["arm"] == metrics["model"] == "convnet7" and metrics["seed"] == 1

    # make_run's folders store the same mistakes as runner._save does.
    made_folder, made_unit = unit_of(make_run(tmp_path / "made", models=("convnet7",), seeds=(1,)), "convnet7", 1)
    made = made_folder.mistakes(made_unit)
    assert made is not None and made.keys() == stored.keys()
    assert all(torch.equal(made[k], stored[k]) for k in stored)


def test_confusion_matrix_counts_true_rows_and_predicted_columns() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    predictions = np.array([0, 1, 1, 2, 0, 2])
    matrix = confusion_matrix(labels, predictions, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3).tolist() == matrix.tolist()


def test_class_names_come_from_the_registry_and_cover_every_model_output() -> None:
    convnet7 = load_spec("convnet7")

    def plan(dataset: str, *specs) -> RunPlan:
        return plan_run(
            list(specs),
            recipes=[Recipe(epochs=1)],
            data=DataSelection(dataset=dataset),
            hardware=HardwareRequest(device="cpu"),
        )

    assert class_names(plan("fashion-mnist", convnet7))[0] == "T-shirt/top"
    assert class_names(plan("mnist", convnet7)) == tuple("0123456789")
    wider = dataclasses.replace(convnet7, name="wider", num_classes=12)
    assert class_names(plan("mnist", convnet7, wider))[-3:] == ("9", "10", "11")
    assert class_names(plan("unknown", convnet7)) == tuple("0123456789")


# ---------------------------------------------------------------------------------------------
# report.html and report.md


def test_report_writes_every_figure_and_both_reports(report_run: Path) -> None:
    for name in ("report.html", "report.md", "comparison.md", "comparison.csv", "comparison.json", "curves_all.png"):
        assert (report_run / name).is_file(), name
    for model in ("convnet7", "convnet5"):
        for kind in ("loss", "accuracy", "confusion", "mistakes"):
            assert (report_run / f"{kind}_{model}.png").is_file(), f"{kind}_{model}.png"


def test_report_html_is_self_contained(report_run: Path) -> None:
    page = (report_run / "report.html").read_text(encoding="utf-8")
    images, external = decoded_images(page)
    assert external == []
    assert len(images) == 1 + 2 * 4  # the overlay, then loss, accuracy, confusion and mistakes per model
    for raw in images:
        check_png(raw)
    assert "<script" not in page


def test_report_html_shows_table_verdicts_and_per_class_accuracy(report_run: Path) -> None:
    page = (report_run / "report.html").read_text(encoding="utf-8")
    comparison = read_json(report_run / "comparison.json")
    for model in comparison["models"]:
        assert f'<td class="text">{model["model"]}</td>' in page
    assert '<th class="text">Model</th>' in page  # the comparison table's first column
    (verdict,) = comparison["pairwise"]
    assert html.escape(verdict["sentence"]) in page
    assert "Test acc 95% CI" in page and "p (Welch)" in page
    # Per-class accuracy: convnet7 (model 0) is wrong on i % 5 == seed, i.e. on classes 0, 5 (seed 0)
    # and 1, 6 (seed 1): each of those classes is right on one seed of two.
    rows = dict(re.findall(r"<tr><td class=\"text\">(\d)</td><td>10</td><td[^>]*>([0-9.]+)</td>", page))
    assert rows == {
        "0": "0.5000",
        "1": "0.5000",
        "2": "1.0000",
        "3": "1.0000",
        "4": "1.0000",
        "5": "0.5000",
        "6": "0.5000",
        "7": "1.0000",
        "8": "1.0000",
        "9": "1.0000",
    }


def test_report_lists_cost_environment_and_command(report_run: Path) -> None:
    page = (report_run / "report.html").read_text(encoding="utf-8")
    convnet5 = summarize(load_spec("convnet5"))

    assert format_flops(convnet5.forward_flops) in page and format_flops(convnet5.training_flops) in page
    assert f"{convnet5.total_params:,}" in page
    environment = read_json(report_run / "environment.json")
    assert f'<td class="text">{environment["torch"]}</td>' in page
    command = (
        "cnnlab compare convnet7 convnet5 --dataset mnist --seeds 0,1 --epochs 3 --batch-size 128 --lr 0.001 "
        "--device cpu --precision auto --compile auto --limit-train 256 --limit-test 100 "
        f"--data-dir {DATA_DIR}"
    )
    assert analyze(RunFolder.open(report_run)).command == command
    assert command in page
    markdown = (report_run / "report.md").read_text(encoding="utf-8")
    assert f"```sh\n{command}\n```" in markdown


def test_report_markdown_links_the_figures(report_run: Path) -> None:
    markdown = (report_run / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == 9
    for link in links:
        assert (report_run / link).is_file(), link
    comparison = read_json(report_run / "comparison.json")
    assert comparison["pairwise"][0]["sentence"] in markdown
    assert (report_run / "comparison.md").read_text(encoding="utf-8").split("\n\n")[0] in markdown


# ---------------------------------------------------------------------------------------------
# The command that makes the run again


class _PlanCaptured(Exception):
    """Raised by the stand-in for cnnlab.api.prepare: the CLI got as far as a plan, and no further."""


def plan_of_command(command: str, monkeypatch: pytest.MonkeyPatch) -> RunPlan:
    """The plan `cnnlab compare ...` resolves `command` to, parsed in-process, stopped before any data loads."""
    args = shlex.split(command)
    assert args[:2] == ["cnnlab", "compare"], command
    captured: list[RunPlan] = []

    def capture(plan: RunPlan, **kwargs) -> None:
        captured.append(plan)
        raise _PlanCaptured

    monkeypatch.setattr(cnnlab.api, "prepare", capture)
    monkeypatch.delenv("CNNLAB_DATA_DIR", raising=False)  # only the command's own --data-dir counts
    with pytest.raises(_PlanCaptured):
        main(args[1:])
    (plan,) = captured
    return plan


def test_the_reproduce_command_makes_the_same_plan(report_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = RunFolder.open(report_run)
    command = analyze(folder).command
    assert command is not None
    assert plan_of_command(command, monkeypatch) == folder.read_plan()


def test_reproduce_command_names_a_changed_spec_by_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = make_run(tmp_path, models=("convnet7",), seeds=(3,))
    folder = RunFolder.open(run_dir)
    spec_path = run_dir / "convnet7" / "spec.toml"
    assert reproduce_command(folder.read_plan(), ["convnet7"]).startswith(
        "cnnlab compare convnet7 --dataset mnist --seed 3 --epochs 3"
    )
    assert analyze(folder).command.startswith("cnnlab compare convnet7 --dataset mnist --seed 3 --epochs 3")
    text = spec_path.read_text()
    assert "rate = 0.15" in text
    spec_path.write_text(text.replace("rate = 0.15", "rate = 0.2"))
    command = analyze(folder).command
    assert command.startswith(f"cnnlab compare {spec_path} --dataset")
    assert plan_of_command(command, monkeypatch) == folder.read_plan()  # the changed spec, read from its file


def test_a_plan_the_command_line_cannot_say_has_no_command(tmp_path: Path) -> None:
    run_dir = make_run(
        tmp_path, models=("convnet7",), seeds=(0,), recipes=(Recipe(epochs=3), Recipe(epochs=3, learning_rate=3e-4))
    )
    assert analyze(RunFolder.open(run_dir)).command is None
    report(run_dir)
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "Train this run again with" not in page and "the command line cannot express in one command" in page
    assert "convnet7@lr=0.0003" in page


# ---------------------------------------------------------------------------------------------
# Unfinished runs, older folders, errors


def test_svg_report_of_an_unfinished_single_model_run_from_an_older_cnnlab(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, models=("convnet7",), seeds=(0, 1), finished=1)
    folder, unit = unit_of(run_dir, "convnet7", 0)
    (folder.unit_dir(unit) / "mistakes.pt").unlink()  # as in a folder from an older cnnlab
    summary = report(run_dir, image_format="svg")
    assert summary.report == run_dir / "report.html"
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    images, external = decoded_images(page)
    assert external == [] and len(images) == 1 + 3  # the overlay, loss, accuracy, confusion
    assert all(raw.lstrip().startswith((b"<?xml", b"<svg")) for raw in images)
    assert "convnet7: no mistakes to show; this run folder did not record them" in page
    assert "Pairwise comparisons" not in page
    assert "This run is incomplete: 1 of 2 units finished" in page
    assert f"cnnlab compare --resume {run_dir}" in page


def test_report_names_a_failed_unit_and_its_error(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, models=("convnet7",), seeds=(0, 1), finished=1)
    folder, unit = unit_of(run_dir, "convnet7", 1)
    folder.set_status(unit, UnitStatus("failed", 1, "RuntimeError: out of memory"))
    summary = report(run_dir)
    assert [(u.label, u.state, u.error) for u in summary.analysis.unfinished] == [
        ("convnet7 seed 1", "failed", "RuntimeError: out of memory")
    ]
    markdown = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "1 of 2 units finished. Failed: convnet7 seed 1 (RuntimeError: out of memory)." in markdown


def test_report_of_a_run_without_results_is_a_user_error(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, models=("convnet7",), seeds=(0,), finished=0)
    with pytest.raises(RunError, match="has no finished unit yet; resume it with"):
        report(run_dir)


def test_report_command_prints_the_table_verdict_and_report_path(report_output: tuple[Path, str]) -> None:
    run_dir, out = report_output
    (verdict,) = read_json(run_dir / "comparison.json")["pairwise"]
    assert verdict["sentence"].startswith("convnet5 beats convnet7 by 15.50 pp (")
    assert f"- {verdict['sentence']}" in out
    assert f"Report: {run_dir / 'report.html'}" in out


def test_report_command_on_a_missing_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    (tmp_path / "file").write_text("")
    assert main(["report", str(tmp_path / "file")]) != 0
    err = capsys.readouterr().err
    assert "is not a folder" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# In a real browser


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if path := shutil.which(name):
            return path
    return None


# Registered before anything loads: counts load errors (a broken image, a script error) and, once the
# page has loaded, how many <img> the browser decoded.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push((e.target && e.target.tagName) || e.message), true);
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-probe', 'images ' + decoded + '/' + images.length + ' errors ' + window.__errors.length);
});
</script>"""


def run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        chromium,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--hide-scrollbars",
        "--mute-audio",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium(report_run: Path, tmp_path: Path) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(reason="no chromium binary on PATH (Debian: apt-get install chromium)")
    page = (report_run / "report.html").read_text(encoding="utf-8")
    probed = tmp_path / "report-probed.html"
    probed.write_text(page.replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8")

    dump = run_chromium(chromium, tmp_path / "profile", "--dump-dom", probed.as_uri())
    assert dump.returncode == 0, dump.stderr[-2000:]
    probe = re.search(r'data-probe="images (\d+)/(\d+) errors (\d+)"', dump.stdout)
    assert probe, f"the page did not finish loading in Chromium:\n{dump.stdout[:500]}\n{dump.stderr[-2000:]}"
    decoded, total, errors = map(int, probe.groups())
    assert (decoded, total, errors) == (9, 9, 0)
    images, external = decoded_images(dump.stdout)  # the DOM as Chromium built it
    assert len(images) == 9 and external == []

    screenshot = tmp_path / "report.png"
    shot = run_chromium(
        chromium,
        tmp_path / "profile",
        "--window-size=1400,2400",
        f"--screenshot={screenshot}",
        (report_run / "report.html").as_uri(),
    )
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    check_png(screenshot.read_bytes())
    print(f"report screenshot: {screenshot}")
