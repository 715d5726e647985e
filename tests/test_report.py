"""Tests for cnnlab.report: the figures and report.html / report.md of a run folder, and `cnnlab report`.

The run folders here are made without training: `start_run` and `save_unit` write them exactly as a
real run does, from hand-made histories and predictions, so every number in the report is known.
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
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.cli import main
from cnnlab.engine import EpochRecord, Evaluation, Hardware, TrainConfig, TrainResult
from cnnlab.errors import RunError
from cnnlab.experiment import Experiment, start_run
from cnnlab.models import build_model, resolve_model, summarize
from cnnlab.report import class_names, confusion_matrix, finish_run, reproduce_command
from cnnlab.runs import read_config, read_json, save_unit, unit_dir

TEST_IMAGES = 100
HARDWARE = Hardware("cpu", "Test CPU", "fp32", False, False, 2)


def fake_predictions(labels: torch.Tensor, model_index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrong on every (5 + model_index)-th image from `seed` on; distinct confidences in [0.5, 1)."""
    index = torch.arange(len(labels))
    wrong = index % (5 + model_index) == seed
    predictions = torch.where(wrong, (labels + 1 + model_index) % 10, labels)
    confidences = 0.5 + 0.5 * ((index * 37 + seed) % 101).float() / 101
    return predictions, confidences


def make_run(root: Path, models: tuple[str, ...] = ("convnet7", "convnet5"), seeds: tuple[int, ...] = (0, 1),
             finished: int | None = None) -> Path:
    """A run folder as `cnnlab compare` leaves it, without training; `finished` limits the saved model/seeds."""
    specs = [resolve_model(m) for m in models]
    config = TrainConfig(epochs=3, limit_train=256, limit_test=TEST_IMAGES, device="cpu")
    run_dir = root / "20261126-120000-compare"
    run_dir.mkdir(parents=True)
    start_run(run_dir, Experiment(specs, "mnist", list(seeds), config), data_dir=Path("/data/mnist-family"))
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (TEST_IMAGES, 28, 28), dtype=np.uint8))
    labels = torch.arange(TEST_IMAGES) % 10
    saved = 0
    for m, spec in enumerate(specs):
        summary = summarize(spec)
        for seed in seeds:
            if finished is not None and saved == finished:
                return run_dir
            predictions, confidences = fake_predictions(labels, m, seed)
            accuracy = (predictions == labels).float().mean().item()
            history = [EpochRecord(e, 1.0 / e + 0.01 * seed, 0.7 + 0.05 * e, 0.9 / e, accuracy - 0.05 * (3 - e),
                                   2.0, 0.2, 128.0) for e in range(1, 4)]
            test = Evaluation(0.3 + 0.01 * m, accuracy, predictions, confidences)
            result = TrainResult(history, test, HARDWARE, build_model(spec, seed=seed))
            save_unit(run_dir, spec.name, seed, result, summary.total_params, summary.training_flops, labels,
                      test_images=images)
            saved += 1
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
# What save_unit stores for the report


def test_save_unit_keeps_the_most_confident_mistakes(report_run: Path) -> None:
    labels = torch.arange(TEST_IMAGES) % 10
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (TEST_IMAGES, 28, 28), dtype=np.uint8))
    predictions, confidences = fake_predictions(labels, 0, 1)
    wrong = [i for i in range(TEST_IMAGES) if predictions[i] != labels[i]]
    expected = sorted(wrong, key=lambda i: -confidences[i].item())[:16]
    stored = torch.load(unit_dir(report_run, "convnet7", 1) / "mistakes.pt", weights_only=True)
    assert stored["indices"].tolist() == expected
    assert stored["images"].dtype == torch.uint8 and stored["images"].shape == (16, 28, 28)
    assert torch.equal(stored["images"], images[expected])
    assert stored["labels"].tolist() == labels[expected].tolist()
    assert stored["predictions"].tolist() == predictions[expected].tolist()
    assert torch.equal(stored["confidences"], confidences[expected])
    assert stored["confidences"].diff().le(0).all()


def test_confusion_matrix_counts_true_rows_and_predicted_columns() -> None:
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0, 2])
    matrix = confusion_matrix(labels, predictions, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_class_names_come_from_the_registry_and_cover_every_model_output() -> None:
    convnet7 = resolve_model("convnet7")
    assert class_names("fashion-mnist", [convnet7])[0] == "T-shirt/top"
    assert class_names("mnist", [convnet7]) == tuple("0123456789")
    wider = dataclasses.replace(convnet7, num_classes=12)
    assert class_names("mnist", [convnet7, wider])[-3:] == ("9", "10", "11")
    assert class_names("unknown", [convnet7]) == tuple("0123456789")


# ---------------------------------------------------------------------------------------------
# report.html and report.md


def test_finish_run_writes_every_figure_and_both_reports(report_run: Path) -> None:
    for name in ("report.html", "report.md", "comparison.md", "curves_all.png"):
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
        assert f"<td class=\"text\">{model['model']}</td>" in page
    (verdict,) = comparison["pairwise"]
    assert html.escape(verdict["sentence"]) in page
    assert "Test acc 95% CI" in page and "p (Welch)" in page
    # Per-class accuracy: convnet7 (model 0) is wrong on i % 5 == seed, i.e. on classes 0, 5 (seed 0)
    # and 1, 6 (seed 1): each of those classes is right on one seed of two.
    rows = dict(re.findall(r"<tr><td class=\"text\">(\d)</td><td>10</td><td[^>]*>([0-9.]+)</td>", page))
    assert rows == {"0": "0.5000", "1": "0.5000", "2": "1.0000", "3": "1.0000", "4": "1.0000",
                    "5": "0.5000", "6": "0.5000", "7": "1.0000", "8": "1.0000", "9": "1.0000"}


def test_report_lists_cost_environment_and_command(report_run: Path) -> None:
    page = (report_run / "report.html").read_text(encoding="utf-8")
    convnet5 = summarize(resolve_model("convnet5"))
    from cnnlab.models import format_flops

    assert format_flops(convnet5.forward_flops) in page and format_flops(convnet5.training_flops) in page
    assert f"{convnet5.total_params:,}" in page
    environment = read_json(report_run / "environment.json")
    assert f"<td class=\"text\">{environment['torch']}</td>" in page
    command = ("cnnlab compare convnet7 convnet5 --dataset mnist --seeds 0,1 --epochs 3 --batch-size 128 --lr 0.001 "
               "--device cpu --precision auto --compile auto --limit-train 256 --limit-test 100 "
               "--data-dir /data/mnist-family")
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


def test_reproduce_command_names_a_changed_spec_by_its_file(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, models=("convnet7",), seeds=(3,), finished=0)
    spec_path = run_dir / "convnet7" / "spec.toml"
    assert reproduce_command(run_dir, read_config(run_dir)).startswith(
        "cnnlab compare convnet7 --dataset mnist --seed 3 --epochs 3")
    text = spec_path.read_text()
    assert "rate = 0.15" in text
    spec_path.write_text(text.replace("rate = 0.15", "rate = 0.2"))
    assert reproduce_command(run_dir, read_config(run_dir)).startswith(f"cnnlab compare {spec_path} --dataset")


def test_svg_report_of_an_unfinished_single_model_run_from_an_older_cnnlab(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, models=("convnet7",), seeds=(0, 1), finished=1)
    (unit_dir(run_dir, "convnet7", 0) / "mistakes.pt").unlink()  # as in a folder from an older cnnlab
    summary = finish_run(run_dir, image_format="svg")
    assert summary.report == run_dir / "report.html"
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    images, external = decoded_images(page)
    assert external == [] and len(images) == 1 + 3  # the overlay, loss, accuracy, confusion
    assert all(raw.lstrip().startswith((b"<?xml", b"<svg")) for raw in images)
    assert "convnet7: no mistakes to show; this run folder did not record them" in page
    assert "Pairwise comparisons" not in page
    assert "This run is incomplete: 1 of 2 model/seed runs finished" in page
    assert f"cnnlab compare --resume {run_dir}" in page


def test_report_of_a_run_without_results_is_a_user_error(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, models=("convnet7",), seeds=(0,), finished=0)
    with pytest.raises(RunError, match="has no finished model yet; resume it with"):
        finish_run(run_dir)


def test_report_command_prints_the_table_verdict_and_report_path(report_output: tuple[Path, str]) -> None:
    run_dir, out = report_output
    assert "convnet5 beats convnet7 by 3.00 pp" in out
    assert f"Report: {run_dir / 'report.html'}" in out


def test_report_command_on_a_missing_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope")]) != 0
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
    command = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--mute-audio",
               "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args]
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
    shot = run_chromium(chromium, tmp_path / "profile", "--window-size=1400,2400",
                        f"--screenshot={screenshot}", (report_run / "report.html").as_uri())
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    check_png(screenshot.read_bytes())
    print(f"report screenshot: {screenshot}")
