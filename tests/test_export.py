"""`cnnlab export`: ONNX and torch.export files of a trained unit, verified before they are written.

A tiny run trains on synthetic IDX data (KMNIST's path too: KMNIST is not available offline), is
exported through the command line as a user types it, and the files are loaded back and checked:
uint8 pixels in with any batch size, the PyTorch model's probabilities out, the metadata inside.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cnnlab
from cnnlab.api import plan_run, run
from cnnlab.catalog import spec_from_text
from cnnlab.cli import main
from cnnlab.config import DataSelection, Recipe
from cnnlab.datasets import DATASETS
from cnnlab.export import export_run, load_pt2_metadata, probability_model
from synthetic import SMALL_SPEC, learnable_arrays, write_dataset_folder

pytestmark = [pytest.mark.export, pytest.mark.filterwarnings("ignore::cnnlab.errors.DataWarning")]

TEST_IMAGES = 96


def _train(root: Path, dataset: str, specs: list[str]) -> Path:
    write_dataset_folder(root / "data" / dataset, learnable_arrays(train=256, test=TEST_IMAGES))
    plan = plan_run(
        [spec_from_text(text, source="test", default_name="small") for text in specs],
        recipes=[Recipe(epochs=1, batch_size=32)],
        data=DataSelection(dataset=dataset, data_dir=str(root / "data"), limit_train=128),
    )
    return run(plan, runs_dir=root / "runs", name=dataset).folder.path


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory) -> Path:
    """Two arms (so the export takes the analysis's choice), one seed, one epoch."""
    wider = SMALL_SPEC.replace('name = "small"', 'name = "wider"').replace("filters = 4", "filters = 8")
    return _train(tmp_path_factory.mktemp("mnist"), "mnist", [SMALL_SPEC, wider])


@pytest.fixture(scope="module")
def kmnist_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("kmnist"), "kmnist", [SMALL_SPEC])


def _metrics(run_dir: Path, arm: str, seed: int) -> dict:
    return json.loads((run_dir / arm / f"seed-{seed}" / "metrics.json").read_text())


def _pixels(count: int) -> np.ndarray:
    return np.random.default_rng(count).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def _check_verification(path: Path, arm: str) -> dict:
    figures = json.loads(path.with_name(path.name + ".verification.json").read_text())
    assert figures["passed"] is True and figures["arm"] == arm and figures["images"] == TEST_IMAGES
    assert figures["max_abs_difference"] <= 1e-4 and figures["agreement"] >= 0.999
    return figures


def _check_probabilities(run_exported, run_dir: Path, arm: str | None = None) -> None:
    """Batches of 1 and 37 (the batch is dynamic): probabilities summing to 1, the PyTorch model's."""
    reference, _ = probability_model(run_dir, arm=arm)
    for count in (1, 37):
        pixels = _pixels(count)
        got = run_exported(pixels)
        assert got.shape == (count, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
        with torch.inference_mode():
            expected = reference(torch.from_numpy(pixels)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)


def _export(capsys, *args: str) -> str:
    """`cnnlab export ARGS` as typed; its standard output."""
    code = main(["export", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.replace("\n", " ")


def test_onnx_export_through_the_cli(mnist_run, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out = _export(capsys, str(mnist_run), "--to", "onnx")
    _, selection = probability_model(mnist_run)
    arm = selection.unit.arm
    path = mnist_run / "export" / f"{arm.folder}-seed0.onnx"
    assert str(path) in out and "Best:" in out and "max probability difference" in out and f"of {TEST_IMAGES}" in out
    figures = _check_verification(path, arm.name)
    test_accuracy = _metrics(mnist_run, arm.folder, 0)["test_accuracy"]
    assert figures["exported_accuracy"] == pytest.approx(test_accuracy)

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (pixels,) = session.get_inputs()
    assert pixels.type == "tensor(uint8)" and pixels.shape[1:] == [28, 28] and not isinstance(pixels.shape[0], int)
    _check_probabilities(lambda x: session.run(None, {pixels.name: x})[0], mnist_run)

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["class_names"]) == list(DATASETS["mnist"].classes)
    assert meta["dataset"] == "mnist" and meta["cnnlab_version"] == cnnlab.__version__
    assert meta["arm"] == arm.name and json.loads(meta["seed"]) == 0
    assert json.loads(meta["test_accuracy"]) == test_accuracy


def test_pt2_export_through_the_cli(mnist_run, tmp_path, capsys):
    output = tmp_path / "model.pt2"
    out = _export(capsys, str(mnist_run), "--to", "pt2", "-o", str(output), "--arm", "small", "--seed", "0")
    assert str(output) in out and "chosen with --arm" in out
    _check_verification(output, "small")

    program = torch.export.load(output).module()
    _check_probabilities(lambda x: program(torch.from_numpy(x)).detach().numpy(), mnist_run, arm="small")

    meta = load_pt2_metadata(output)
    assert meta["class_names"] == list(DATASETS["mnist"].classes) and meta["dataset"] == "mnist"
    assert meta["cnnlab_version"] == cnnlab.__version__ and meta["arm"] == "small" and meta["seed"] == 0
    assert meta["test_accuracy"] == _metrics(mnist_run, "small", 0)["test_accuracy"]


def test_kmnist_run_exports_kmnist_class_names(kmnist_run, tmp_path):
    report = export_run(kmnist_run, "pt2", tmp_path / "kmnist.pt2")
    assert report.reason == "the run's only arm" and report.verification.passed
    meta = load_pt2_metadata(report.path)
    assert meta["class_names"] == list(DATASETS["kmnist"].classes) == ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]  # fmt: skip
    assert meta["dataset"] == "kmnist"


def test_a_mismatch_refuses_and_writes_nothing(mnist_run, tmp_path, monkeypatch, capsys):
    import cnnlab.export as export

    exporter = export._export_pt2

    def off_by_one_class(*args):
        content, run_exported, name = exporter(*args)
        return content, lambda pixels: run_exported(pixels).roll(1, dims=1), name

    monkeypatch.setattr(export, "_export_pt2", off_by_one_class)
    output = tmp_path / "out" / "model.pt2"
    assert main(["export", str(mnist_run), "--to", "pt2", "-o", str(output)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: export refused, nothing written")
    assert "max probability difference" in errors[0]
    assert not output.parent.exists()


def test_onnx_without_onnxruntime_is_one_clear_line(mnist_run, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    assert main(["export", str(mnist_run), "--to", "onnx"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: --to onnx needs ONNX Runtime: pip install 'cnnlab[export]'"]
