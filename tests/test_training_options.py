"""The training options in a real training loop and from the command line: early stopping, the best
checkpoint, schedules, augmentation, the validation split, resuming mid-run, the rule against
choosing on the test set. (Each option's own numbers are checked against Keras in test_callbacks,
test_schedules, test_optim and test_augment.)"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab.cli import main
from cnnlab.config import DataSelection, Hardware, Recipe
from cnnlab.datasets import Dataset
from cnnlab.engine import DeviceData, stratified_split, train
from cnnlab.options import parse_option
from cnnlab.schedules import learning_rate_at
from synthetic import SMALL_SPEC, learnable_arrays, learnable_tensors, write_dataset_folder
from test_engine import SMALL, MemoryCheckpoint

CPU = Hardware("cpu", "Test CPU", "fp32", compiled=False, channels_last=True, threads=torch.get_num_threads())


def data(val_split=0.25, split_seed=0) -> DeviceData:
    images, labels = learnable_tensors(256)
    dataset = Dataset("mnist", tuple("0123456789"), images, labels, images[:64], labels[:64], Path("."), True)
    return DeviceData(dataset, DataSelection(val_split=val_split, split_seed=split_seed), torch.device("cpu"))


def fit(seed=0, checkpoint=None, splits=None, **recipe):
    options = {k: parse_option(v, k) if isinstance(v, str) and k in ("schedule", "early_stopping",
               "best_checkpoint", "augmentation") else v for k, v in recipe.items()}  # fmt: skip
    recipe = Recipe(**{"epochs": 5, "batch_size": 32, "learning_rate": 3e-3, **options})
    return train(SMALL, recipe, seed, splits or data().splits(seed), CPU, checkpoint=checkpoint)


def weights_equal(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_stops_and_restores_the_best_epoch():
    # min_delta larger than any change: epoch 1 sets the best, epoch 2 cannot improve, patience 0 stops.
    stopped = fit(early_stopping="min_delta=10,patience=0,restore_best_weights=true")
    assert [r.epoch for r in stopped.history] == [1, 2]
    assert (stopped.stopped_epoch, stopped.restored_epoch) == (2, 1)
    assert "did not improve by more than 10" in stopped.stop_reason
    one_epoch = fit(epochs=1)
    assert weights_equal(stopped.model.state_dict(), one_epoch.model.state_dict())  # epoch 1's weights
    assert stopped.test.accuracy == one_epoch.test.accuracy  # tested on the restored weights


def test_best_checkpoint_keeps_the_best_epochs_weights():
    result = fit(best_checkpoint="on")
    losses = [r.val_loss for r in result.history]
    best = min(range(len(losses)), key=lambda i: (losses[i], i))  # the first of the lowest (strict improvement)
    assert result.best_epoch == best + 1
    at_best = fit(epochs=best + 1)
    assert weights_equal(result.best_weights, at_best.model.state_dict())


def test_plateau_schedule_lowers_the_learning_rate_and_the_history_records_it():
    result = fit(schedule="plateau:factor=0.5,patience=0,min_delta=10")
    rates = [r.learning_rate for r in result.history]
    # Epoch 1 sets the best; from epoch 2 on nothing improves by 10, so each epoch's end halves the rate.
    expected = [3e-3] + [3e-3 * 0.5**i for i in range(4)]
    assert rates == pytest.approx(expected, rel=1e-6)  # float32 like Keras's, so not exactly
    assert rates[0] == 3e-3  # each epoch's rate is the one it trained with, before the plateau acts


def test_a_stepwise_schedule_sets_every_steps_learning_rate():
    schedule = parse_option("exponential:decay_steps=4,decay_rate=0.5", "schedule")
    result = fit(schedule="exponential:decay_steps=4,decay_rate=0.5")
    steps_per_epoch = math.ceil(192 / 32)  # 256 images, a quarter held out
    for record in result.history:
        last_step = record.epoch * steps_per_epoch - 1
        assert record.learning_rate == learning_rate_at(schedule, 3e-3, last_step)
    assert result.history[-1].learning_rate < result.history[0].learning_rate


def test_augmentation_changes_training_and_is_seeded():
    plain = fit(epochs=2)
    augmented = fit(epochs=2, augmentation="translate=0.1,rotate=0.05")
    again = fit(epochs=2, augmentation="translate=0.1,rotate=0.05")
    numbers = lambda r: [(h.loss, h.val_loss) for h in r.history]  # noqa: E731
    assert numbers(augmented) != numbers(plain)
    assert numbers(augmented) == numbers(again)


@pytest.mark.parametrize("options", [
    {"schedule": "plateau:factor=0.5,patience=1", "early_stopping": "patience=2,restore_best_weights=true",
     "best_checkpoint": "monitor=val_accuracy", "augmentation": "translate=0.1,zoom=0.1"},
    {"schedule": "cosine:decay_steps=20,warmup_target=0.005,warmup_steps=6", "optimizer": "sgd",
     "momentum": 0.9, "augmentation": "rotate=0.05"},
])  # fmt: skip
def test_a_run_resumed_mid_way_equals_an_uninterrupted_one(options):
    full = fit(seed=3, **options)
    checkpoint = MemoryCheckpoint()
    fit(seed=3, checkpoint=checkpoint, **{**options, "epochs": 2})
    resumed = fit(seed=3, checkpoint=checkpoint, **options)
    numbers = lambda r: [(h.loss, h.accuracy, h.val_loss, h.val_accuracy, h.learning_rate) for h in r.history]  # noqa: E731
    assert numbers(resumed) == numbers(full)
    assert weights_equal(resumed.model.state_dict(), full.model.state_dict())
    assert (resumed.best_epoch, resumed.stopped_epoch, resumed.restored_epoch) == (
        full.best_epoch, full.stopped_epoch, full.restored_epoch)  # fmt: skip


def test_the_validation_split_is_stratified_and_shared_by_every_seed():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    held_out, kept = stratified_split(labels, 10, seed=0)
    assert np.bincount(labels[held_out].numpy()).tolist() == [5, 3, 2]
    assert sorted(held_out.tolist() + kept.tolist()) == list(range(100))
    assert not set(held_out.tolist()) & set(kept.tolist())
    assert stratified_split(labels, 10, seed=1)[0].tolist() != held_out.tolist()
    shared = data()
    a, b = shared.splits(0), shared.splits(7)
    assert torch.equal(a.val_images, b.val_images) and torch.equal(a.train_labels, b.train_labels)
    assert not torch.equal(data(split_seed=1).splits(0).val_images, a.val_images)


# ---------------------------------------------------------------------------------------------
# From the command line


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_dataset_folder(root / "mnist", learnable_arrays(320, 64))
    return root


SPEC = SMALL_SPEC


def test_every_option_from_the_command_line_into_the_run_folder_and_report(tmp_path, data_dir, capsys):
    spec = tmp_path / "small.toml"
    spec.write_text(SPEC)
    code = main(["train", str(spec), "--data-dir", str(data_dir), "--runs-dir", str(tmp_path / "runs"),
                 "--epochs", "4", "--val-split", "0.2", "--optimizer", "sgd", "--momentum", "0.9",
                 "--schedule", "plateau:factor=0.5,patience=0,min_delta=10", "--early-stopping", "patience=5",
                 "--best-checkpoint", "on", "--augment", "translate=0.1"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    (run,) = (tmp_path / "runs").iterdir()
    recipe = tomllib.loads((run / "config.toml").read_text())["arms"][0]["recipe"]
    assert recipe["optimizer"] == "sgd" and recipe["learning_rate"] == 0.01 and recipe["momentum"] == 0.9
    assert recipe["schedule"]["kind"] == "plateau" and recipe["early_stopping"]["patience"] == 5
    assert recipe["augmentation"]["height_shift"] == [-0.1, 0.1]
    unit = run / "small" / "seed-0"
    history = (unit / "history.csv").read_text().splitlines()
    assert history[0].endswith(",learning_rate")
    rates = [float(line.rsplit(",", 1)[1]) for line in history[1:]]
    assert rates == pytest.approx([0.01, 0.01, 0.005, 0.0025], rel=1e-6)  # halved after epochs 2 and 3 (float32)
    metrics = json.loads((unit / "metrics.json").read_text())
    assert 1 <= metrics["best_epoch"] <= 4 and (unit / "best_weights.pt").is_file()
    assert metrics["val_accuracy"] == json.loads((unit / "history.json").read_text())[-1]["val_accuracy"]
    for figure in ("lr_small.png", "augmented_small.png"):
        assert (run / figure).is_file(), figure
    assert "learning_rate: 0.005" in out


def test_choosing_on_the_test_set_is_refused_before_anything_is_written(tmp_path, data_dir, capsys):
    for option in (["--early-stopping", "patience=2"], ["--best-checkpoint", "on"], ["--schedule", "plateau"]):
        assert main(["train", "convnet7", "--data-dir", str(data_dir), "--runs-dir", str(tmp_path / "runs"),
                     *option]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert "would be choosing on the test set; hold out part of the training images with --val-split" in err
    assert not (tmp_path / "runs").exists()


def test_a_recipe_file_and_command_line_options_over_it(tmp_path, data_dir, monkeypatch, capsys):
    from cnnlab import api

    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text('optimizer = "rmsprop"\nepochs = 3\n[schedule]\nkind = "cosine"\ndecay_steps = 100\n'
                           '[augmentation]\nrotate = 0.05\n')  # fmt: skip
    plans = []
    monkeypatch.setattr(api, "prepare", lambda plan, **k: plans.append(plan) or (_ for _ in ()).throw(SystemExit(0)))
    main(["train", "convnet7", "--recipe", str(recipe_file), "--epochs", "5", "--data-dir", str(data_dir)])
    recipe = plans[0].arms[0].recipe
    assert (recipe.optimizer, recipe.epochs, recipe.learning_rate) == ("rmsprop", 5, 1e-3)  # --epochs wins
    assert recipe.schedule == parse_option("cosine:decay_steps=100", "schedule")
    assert recipe.augmentation.rotation == (-0.05, 0.05)
    recipe_file.write_text("bogus = 1\n")
    assert main(["train", "convnet7", "--recipe", str(recipe_file), "--data-dir", str(data_dir)]) == 2
    assert f"error: {recipe_file}: unknown recipe key 'bogus'" in capsys.readouterr().err


def test_best_arm_is_chosen_on_validation_or_labelled_optimistic(tmp_path, data_dir, capsys):
    spec = tmp_path / "small.toml"
    spec.write_text(SPEC)
    base = ["compare", "convnet7", str(spec), "--data-dir", str(data_dir), "--epochs", "1", "--limit-train", "128"]
    assert main([*base, "--runs-dir", str(tmp_path / "a")]) == 0
    assert "chosen on the test set (optimistic" in capsys.readouterr().out
    assert main([*base, "--runs-dir", str(tmp_path / "b"), "--val-split", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "by mean validation accuracy" in out and "optimistic" not in out
    (run,) = (tmp_path / "b").iterdir()
    best = json.loads((run / "comparison.json").read_text())["best"]
    assert best["metric"] == "validation accuracy" and best["on_test"] is False


def test_a_stratified_split_uses_every_class(tmp_path):
    arrays = learnable_arrays(200, 20)
    held_out, _ = stratified_split(torch.from_numpy(arrays["train_labels"]).long(), 20, seed=0)
    counts = np.bincount(arrays["train_labels"][held_out.numpy()], minlength=10)
    expected = np.bincount(arrays["train_labels"], minlength=10) * 20 / 200
    assert np.all(np.abs(counts - expected) < 1)
