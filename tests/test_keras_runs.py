"""Keras model files in runs: `--init-from` (every seed starts from the file's weights), a .keras or
.h5 file given to evaluate, report, predict and export as a one-model run, and `export --to keras`,
whose file Keras 3 itself loads and predicts with."""

from __future__ import annotations

import hashlib
import json
import resource
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.api import plan_run, prepare, resume, run
from cnnlab.catalog import spec_from_text
from cnnlab.cli import main
from cnnlab.config import DataSelection, Hardware, Recipe
from cnnlab.engine import DeviceData, train
from cnnlab.errors import ConfigError, SpecError
from cnnlab.export import probability_model
from cnnlab.image_folders import load_selection
from cnnlab.keras_files import keras_archive_bytes
from cnnlab.keras_weights import keras_layer_weights
from cnnlab.models import build_model
from cnnlab.runfolder import RunFolder
from cnnlab_cli import run_cnnlab
from synthetic import SMALL_SPEC, learnable_arrays, write_dataset_folder

# Keras 3.15 on torch converts tensors with np.array(x, copy=False), which numpy 2 warns about each time.
KERAS_NUMPY_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"

pytestmark = [
    pytest.mark.filterwarnings("ignore::cnnlab.errors.DataWarning"),
    pytest.mark.filterwarnings(KERAS_NUMPY_WARNING),
]

SMALL = spec_from_text(SMALL_SPEC, source="test", default_name="small")
OTHER = spec_from_text(SMALL_SPEC.replace("filters = 4", "filters = 6"), source="test", default_name="other")
CPU = Hardware("cpu", "", "fp32", compiled=False, channels_last=False, threads=1)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_dataset_folder(root / "mnist", learnable_arrays(train=256, test=64))
    return root


def _keras_file(path: Path, seed: int = 7) -> dict[str, torch.Tensor]:
    """A .keras file of SMALL with the weights of `build_model(SMALL, seed)`; returns its state dict."""
    model = build_model(SMALL, seed=seed)
    path.write_bytes(keras_archive_bytes(SMALL, keras_layer_weights(model)))
    return model.state_dict()


def _weights(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    return torch.load(folder / "small" / f"seed-{seed}" / "weights.pt", weights_only=True)


def _selection(data: Path) -> DataSelection:
    return DataSelection(data_dir=str(data), limit_train=128)


def test_init_from_with_no_epochs_tests_the_files_weights_for_every_seed(tmp_path, data):
    path = tmp_path / "start.keras"
    state = _keras_file(path)
    plan = plan_run([SMALL], recipes=[Recipe(epochs=0)], seeds=[0, 1], data=_selection(data), init_from=path)
    assert plan.initial_weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    folder = run(plan, runs_dir=tmp_path / "runs").folder
    for seed in (0, 1):
        assert all(torch.equal(_weights(folder.path, seed)[k], v) for k, v in state.items())
    metrics = [json.loads((folder.path / "small" / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"] and metrics[0]["epochs"] == 0
    assert metrics[0]["train_accuracy"] is None  # nothing trained: no training accuracy, not a made-up one
    config = tomllib.loads((folder.path / "config.toml").read_text())
    assert config["initial_weights"] == {"source": str(path), "sha256": plan.initial_weights.sha256}
    assert folder.read_plan() == plan
    report = (folder.path / "report.md").read_text()
    assert "Not trained here (0 epochs)" in report and f"**Initial weights:** {path}" in report


def test_init_from_replaces_the_seeds_weights_and_the_seed_still_orders_the_data(tmp_path, data):
    path = tmp_path / "start.keras"
    state = _keras_file(path)
    recipe = Recipe(epochs=1, batch_size=32)
    plan = plan_run([SMALL], recipes=[recipe], seeds=[0, 1], data=_selection(data), init_from=path)
    folder = run(plan, runs_dir=tmp_path / "runs").folder.path
    splits = DeviceData(load_selection(plan.data), plan.data, torch.device("cpu")).splits(0)
    torch.set_num_threads(plan.hardware.threads)
    by_hand = train(SMALL, recipe, 0, splits, plan.hardware, initial_weights=state).model.state_dict()
    from_seed = train(SMALL, recipe, 0, splits, plan.hardware).model.state_dict()
    trained = [_weights(folder, seed) for seed in (0, 1)]
    assert all(torch.equal(trained[0][k], v) for k, v in by_hand.items())
    assert not torch.equal(trained[0]["layers.0.0.weight"], from_seed["layers.0.0.weight"])
    assert not torch.equal(trained[0]["layers.0.0.weight"], trained[1]["layers.0.0.weight"])  # data order


def test_a_resumed_run_starts_from_the_weights_it_kept_not_the_file(tmp_path, data):
    path = tmp_path / "start.keras"
    state = _keras_file(path)
    plan = plan_run([SMALL], recipes=[Recipe(epochs=0)], data=_selection(data), init_from=path)
    folder = prepare(plan, runs_dir=tmp_path / "runs").folder.path
    path.unlink()  # the run folder holds a copy: resuming needs nothing outside it
    resume(folder)
    assert all(torch.equal(_weights(folder, 0)[k], v) for k, v in state.items())


def test_init_from_is_refused_before_anything_is_written(tmp_path, data):
    path = tmp_path / "start.keras"
    _keras_file(path)
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match=r"--epochs 0 trains nothing: it tests the weights of --init-from FILE"):
        plan_run([SMALL], recipes=[Recipe(epochs=0)], data=_selection(data))
    code = main(["train", "convnet3", "--init-from", str(path), "--data-dir", str(data), "--runs-dir", str(runs)])
    assert code == 2 and not runs.exists()
    with pytest.raises(
        SpecError, match=r"start.keras: layer 1 \(conv2d_1, Conv2D\): kernel has shape \(3, 3, 1, 4\) but"
    ):
        plan_run([OTHER], data=_selection(data), init_from=path)
    huge = tmp_path / "huge.keras"
    with huge.open("wb") as f:  # sparse: 3 GiB on paper, nothing on disk
        f.truncate(3 << 30)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(SpecError, match=r"huge.keras: the file is 3.0 GiB, more than cnnlab reads for a model"):
        plan_run([SMALL], data=_selection(data), init_from=huge)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 1 << 20  # refused unread
    plan = plan_run([SMALL], data=_selection(data), init_from=path)
    _keras_file(path, seed=8)  # the file changes between planning and preparing
    with pytest.raises(ConfigError, match=r"start.keras: the file changed since the run was planned"):
        prepare(plan, runs_dir=runs)
    assert not runs.exists()


def test_a_keras_file_is_a_one_model_run_for_evaluate_report_predict_and_export(tmp_path, data, capsys):
    path = tmp_path / "model.keras"
    _keras_file(path)
    env = ["--data-dir", str(data)]
    assert main(["evaluate", str(path), *env]) == 0
    assert "Evaluation on mnist test (64 images)" in capsys.readouterr().out

    assert main(["report", str(path), *env]) == 2
    assert "is a Keras model file: give a new folder for its run with -o" in capsys.readouterr().err
    assert main(["report", str(path), "-o", str(tmp_path / "report"), *env]) == 0
    assert (tmp_path / "report" / "report.html").is_file() and not list((tmp_path / "report").glob("loss_*"))
    capsys.readouterr()
    assert main(["report", str(path), "-o", str(tmp_path / "report"), *env]) == 2  # never mixed with a run's files
    assert "report is not empty; give a new folder for the run with -o" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "report"), "--dataset", "mnist"]) == 2
    assert "--dataset applies to a Keras model file" in capsys.readouterr().err

    assert main(["export", str(path), "--to", "keras", "-o", str(tmp_path / "m.zip"), *env]) == 2
    assert "Keras 3 loads only files named *.keras" in capsys.readouterr().err
    assert main(["export", str(path), "--to", "keras", *env]) == 0
    assert (tmp_path / "model-export.keras").is_file()  # beside the input, never over it

    image = tmp_path / "digit.npy"
    np.save(image, learnable_arrays(train=1, test=1)["test_images"][0])
    result = run_cnnlab("predict", str(path), str(image), "--json", env={"CNNLAB_DATA_DIR": str(data)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["arm"] == "small"  # stdout is JSON only; the note went to stderr
    assert "as a one-model run" in result.stderr
    assert not list(tmp_path.glob("runs*"))  # a Keras file's run is temporary unless -o names a folder


def test_export_to_keras_is_loaded_by_keras_and_predicts_the_same(tmp_path, data):
    keras = pytest.importorskip("keras")
    plan = plan_run([SMALL], recipes=[Recipe(epochs=1, batch_size=32)], data=_selection(data))
    folder = run(plan, runs_dir=tmp_path / "runs").folder.path
    assert main(["export", str(folder), "--to", "keras"]) == 0
    exported = folder / "export" / "small-seed0.keras"
    model = keras.saving.load_model(exported)
    images = torch.from_numpy(learnable_arrays(train=1, test=64)["test_images"])
    reference, _ = probability_model(folder)
    with torch.inference_mode():
        expected = reference(images).numpy()
    got = np.asarray(model.predict(images.numpy()[..., None].astype("float32") / 255.0, verbose=0))
    assert np.abs(got - expected).max() < 1e-5
    assert (got.argmax(1) == expected.argmax(1)).all()
    facts = json.loads((exported.parent / "small-seed0.keras.verification.json").read_text())
    assert facts["passed"] and facts["metadata"]["input"]["scale"] == "pixels / 255"
    assert RunFolder.open(folder).read_plan().initial_weights is None
