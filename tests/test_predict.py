"""Tests for predict.py and `cnnlab predict`: which arm and seed predict and why, the probabilities
against the model's own forward pass, --all, errors in one line, and a real MNIST test image saved
as a PNG and predicted through the command line as a user types it.

The run folders are trained for real, briefly: a small spec on synthetic images (two arms, with and
without held-out validation images), and convnet7 on 512 real MNIST images for one epoch."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.analysis import analyze
from cnnlab.api import execute, plan_run, prepare
from cnnlab.catalog import load_spec, spec_from_text
from cnnlab.cli import main
from cnnlab.config import DataSelection, HardwareRequest, Recipe
from cnnlab.datasets import load_dataset
from cnnlab.errors import ConfigError, DataError, RunError
from cnnlab.models import build_model
from cnnlab.predict import ON_TEST, ON_VALIDATION, ONLY_ARM, Predictor, predict_files, top_k
from cnnlab.runfolder import RunFolder
from cnnlab_cli import run_cnnlab
from synthetic import SMALL_SPEC, learnable_arrays, write_dataset_folder

SEEDS = (3, 1)  # the first seed is the plan's first, not the smallest


def train(root: Path, name: str, models, data: DataSelection, recipes, seeds=SEEDS) -> Path:
    plan = plan_run(models, recipes=recipes, seeds=seeds, data=data, hardware=HardwareRequest(device="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # synthetic files do not match MNIST's checksums
        prepared = prepare(plan, runs_dir=root, name=name)
        execute(prepared)
    return prepared.folder.path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two-arm runs of a small spec on synthetic images: 'validated' holds out validation images, 'tested' not."""
    root = tmp_path_factory.mktemp("predict")
    write_dataset_folder(root / "data" / "mnist", learnable_arrays(train=512, test=64))
    spec = spec_from_text(SMALL_SPEC, source="small.toml", default_name="small")
    recipes = [Recipe(epochs=1, batch_size=64), Recipe(epochs=1, batch_size=64, learning_rate=3e-4)]
    data = DataSelection(data_dir=str(root / "data"))
    validated = DataSelection(data_dir=str(root / "data"), val_split=0.25)
    return {
        "validated": train(root / "runs", "validated", [spec], validated, recipes),
        "tested": train(root / "runs", "tested", [spec], data, recipes),
        "single": train(root / "runs", "single", [spec], data, recipes[:1], seeds=(0,)),
    }


def digits(count: int = 5) -> np.ndarray:
    return learnable_arrays(train=count, test=1, seed=7)["train_images"]


def own_forward_pass(run_dir: Path, arm_folder: str, spec, seed: int, images: np.ndarray) -> np.ndarray:
    """softmax(model(x / 255)) with the unit's weights.pt loaded by hand, not through cnnlab.predict."""
    model = build_model(spec)
    model.load_state_dict(torch.load(run_dir / arm_folder / f"seed-{seed}" / "weights.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(images).float().div(255.0).unsqueeze(1)
        return torch.softmax(model(x), dim=1).numpy()


def test_the_default_arm_is_chosen_on_validation_with_its_first_seed(runs):
    predictor = Predictor.open(runs["validated"])
    choice = analyze(RunFolder.open(runs["validated"])).choice
    assert choice is not None and not choice.on_test
    assert (predictor.arm, predictor.seed, predictor.basis) == (choice.arm, SEEDS[0], ON_VALIDATION)
    assert predictor.classes == tuple(str(d) for d in range(10))
    assert not predictor.model.training


def test_without_validation_images_the_choice_says_it_was_made_on_the_test_set(runs, capsys):
    predictor = Predictor.open(runs["tested"])
    assert predictor.basis == ON_TEST == "chosen on the test set (optimistic)"
    np.save(runs["tested"].parent / "digits.npy", digits(2))
    assert main(["predict", str(runs["tested"]), str(runs["tested"].parent / "digits.npy")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"Arm {predictor.arm}, seed {SEEDS[0]} (chosen on the test set (optimistic))")
    assert "by mean test accuracy" in first


def test_validated_runs_say_so_on_the_first_line(runs, capsys):
    np.save(runs["validated"].parent / "digit.npy", digits(1)[0])
    assert main(["predict", str(runs["validated"]), str(runs["validated"].parent / "digit.npy")]) == 0
    out = capsys.readouterr().out
    assert "(chosen on validation): best of 2 arms, by mean validation accuracy" in out.splitlines()[0]
    assert "digit.npy" in out


def test_a_single_arm_needs_no_choice_and_arm_and_seed_pick_a_unit(runs):
    assert Predictor.open(runs["single"]).basis == ONLY_ARM
    picked = Predictor.open(runs["tested"], arm="small@lr=0.0003", seed=1)
    assert (picked.arm, picked.seed) == ("small@lr=0.0003", 1)


def test_probabilities_are_the_models_own_forward_pass(runs):
    predictor = Predictor.open(runs["validated"], arm="small@lr=0.0003", seed=1)
    images = digits(5)
    probabilities = predictor.predict(images)
    spec = predictor.unit.arm.spec
    expected = own_forward_pass(runs["validated"], predictor.unit.arm.folder, spec, 1, images)
    np.testing.assert_allclose(probabilities, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    tops = predictor.top_k(probabilities, 3)
    assert [t[0].index for t in tops] == list(probabilities.argmax(axis=1))
    assert all(t[0].probability >= t[1].probability >= t[2].probability for t in tops)


def test_top_k_orders_ties_by_class_and_is_capped_at_the_classes():
    rows = top_k(np.array([[0.25, 0.5, 0.25]]), ("a", "b", "c"), 5)
    assert [(c.name, c.index, c.probability) for c in rows[0]] == [("b", 1, 0.5), ("a", 0, 0.25), ("c", 2, 0.25)]
    with pytest.raises(ConfigError, match="--top-k must be at least 1"):
        top_k(np.ones((1, 3)) / 3, ("a", "b", "c"), 0)


def test_all_predicts_with_every_arm_side_by_side(runs, capsys):
    path = runs["tested"].parent / "three.npy"
    np.save(path, digits(3))
    assert main(["predict", str(runs["tested"]), str(path), "--all", "--json", "--top-k", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["image"], r["arm"], r["seed"]) for r in rows] == [
        (f"{path}[{i}]", arm, SEEDS[0]) for i in range(3) for arm in ("small", "small@lr=0.0003")
    ]
    assert all(len(r["top"]) == 2 and set(r["top"][0]) == {"class", "index", "probability"} for r in rows)
    assert main(["predict", str(runs["tested"]), str(path), "--all"]) == 0
    out = capsys.readouterr().out
    assert "small (seed 3)" in out and "small@lr=0.0003 (seed 3)" in out
    result = predict_files(runs["tested"], [path], all_arms=True)
    assert result.arms == (("small", 3), ("small@lr=0.0003", 3))


def test_library_errors(runs, tmp_path):
    np.save(tmp_path / "d.npy", digits(1))
    with pytest.raises(ConfigError, match="--arm 'nope' is not an arm"):
        Predictor.open(runs["tested"], arm="nope")
    with pytest.raises(ConfigError, match="--seed 9 is not a seed"):
        Predictor.open(runs["tested"], seed=9)
    with pytest.raises(ConfigError, match="drop --arm"):
        predict_files(runs["tested"], [tmp_path / "d.npy"], arm="small", all_arms=True)
    with pytest.raises(RunError, match="does not exist"):
        Predictor.open(tmp_path / "no-run")
    with pytest.raises(DataError, match="must be uint8 of shape"):
        Predictor.open(runs["single"]).predict(np.zeros((2, 32, 32), np.uint8))


def test_cli_errors_are_one_line_and_exit_2(runs, tmp_path, capsys):
    Image.fromarray(np.full((40, 30), 255, np.uint8)).save(tmp_path / "blank.png")
    (tmp_path / "notes.png").write_text("not a picture")
    cases = [
        ([str(tmp_path / "blank.png")], "blank.png: the image is empty (no ink found)"),
        ([str(tmp_path / "notes.png")], "notes.png: not an image cnnlab can read"),
        ([str(tmp_path / "blank.png"), "--no-preprocess"], "without preprocessing the model needs 28x28"),
        ([str(tmp_path / "blank.png"), "--arm", "x"], "--arm 'x' is not an arm"),
    ]
    for args, message in cases:
        assert main(["predict", str(runs["single"]), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_a_real_mnist_test_image_as_png_through_the_cli(real_data_dir, tmp_path):
    """convnet7 trained briefly on real MNIST; test image 0 saved as a PNG and predicted as typed:
    the same probabilities as the model's own forward pass on that test image (to 1e-6), with and
    without --no-preprocess (a 28x28 grayscale image is used as it is)."""
    data = DataSelection(data_dir=str(real_data_dir), limit_train=512, limit_test=100)
    run_dir = train(tmp_path / "runs", "real", ["convnet7"], data, [Recipe(epochs=1)], seeds=(0,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = load_dataset("mnist", data_dir=real_data_dir)
    image = dataset.test_images[0].numpy()
    Image.fromarray(image).save(tmp_path / "test-0.png")
    expected = own_forward_pass(run_dir, "convnet7", load_spec("convnet7"), 0, image[None])[0]

    outputs = []
    for extra in (["--no-preprocess"], []):
        done = run_cnnlab("predict", str(run_dir), str(tmp_path / "test-0.png"), "--json", "--top-k", "10", *extra)
        assert done.returncode == 0, done.stderr
        (row,) = json.loads(done.stdout)
        assert (row["image"], row["arm"], row["seed"]) == (str(tmp_path / "test-0.png"), "convnet7", 0)
        probabilities = np.zeros(10)
        for entry in row["top"]:
            probabilities[entry["index"]] = entry["probability"]
            assert entry["class"] == str(entry["index"])
        assert row["top"][0]["index"] == int(expected.argmax())
        np.testing.assert_allclose(probabilities, expected, atol=1e-6, rtol=0)
        outputs.append(row)
    assert outputs[0] == outputs[1]
