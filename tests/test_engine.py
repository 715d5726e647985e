"""The training loop: the seed's recipe, Keras's metric semantics, determinism and resuming."""

from __future__ import annotations

import pytest
import torch

from cnnlab.engine import TrainConfig, evaluate, make_splits, resolve_device, resolve_hardware, train
from cnnlab.errors import ConfigError
from cnnlab.runs import save_torch
from cnnlab.spec import parse_spec

SMALL = parse_spec({
    "name": "small", "input_shape": [28, 28, 1], "num_classes": 10,
    "layers": [
        {"type": "Conv2D", "filters": 4, "kernel_size": 3, "strides": 2, "activation": "relu"},
        {"type": "MaxPooling2D"},
        {"type": "Dropout", "rate": 0.25},
        {"type": "Flatten"},
        {"type": "Dense", "units": 16, "activation": "relu"},
        {"type": "BatchNormalization"},
        {"type": "Dense", "units": 10, "activation": "softmax"},
    ],
})


def splits_of(images, labels, config, seed=0):
    return make_splits(images, labels, images[:64], labels[:64], config, torch.device("cpu"), seed)


def fit(images, labels, seed=0, **overrides):
    config = TrainConfig(**{"epochs": 3, "batch_size": 32, "learning_rate": 3e-3, "compile": "off", **overrides})
    return train(SMALL, splits_of(images, labels, config, seed), config, seed=seed)


def test_seed_recipe_defaults():
    config = TrainConfig()
    assert (config.epochs, config.batch_size, config.learning_rate, config.epsilon) == (12, 128, 1e-3, 1e-7)
    assert (config.beta_1, config.beta_2) == (0.9, 0.999)


def test_same_seed_same_history_on_cpu(tiny_images):
    a, b = fit(*tiny_images, seed=3), fit(*tiny_images, seed=3)
    strip = lambda h: [(r.loss, r.accuracy, r.val_loss, r.val_accuracy) for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert strip(fit(*tiny_images, seed=4).history) != strip(a.history)


def test_training_learns_and_records_keras_metrics(tiny_images):
    result = fit(*tiny_images, epochs=6)
    assert [r.epoch for r in result.history] == list(range(1, 7))
    assert result.history[-1].loss < result.history[0].loss
    for record in result.history:
        assert 0 <= record.accuracy <= 1 and 0 <= record.val_accuracy <= 1
        assert record.samples_per_second > 0 and record.train_seconds > 0
    # The seed validates on the test split: the final test score is the last validation.
    assert result.test.accuracy == result.history[-1].val_accuracy
    assert result.test.loss == pytest.approx(result.history[-1].val_loss)


def test_training_metrics_are_running_means_with_dropout(tiny_images):
    # With a partial last batch (128 = 3 * 40 + 8) the epoch accuracy is a count over all 128 samples.
    result = fit(*tiny_images, epochs=1, batch_size=40)
    assert round(result.history[0].accuracy * 128) == pytest.approx(result.history[0].accuracy * 128)


def test_evaluation_is_in_eval_mode_and_batch_independent(tiny_images):
    result = fit(*tiny_images, epochs=1)
    images, labels = tiny_images
    result.model.train()
    small = evaluate(result.model, images, labels, result.hardware, batch_size=7)
    large = evaluate(result.model, images, labels, result.hardware, batch_size=1000)
    assert small.accuracy == large.accuracy
    assert small.loss == pytest.approx(large.loss, rel=1e-5)
    assert result.model.training  # evaluate restores the caller's mode
    assert len(large.predictions) == 128 and float(large.confidences.min()) > 0


def test_limits_and_val_split(tiny_images):
    images, labels = tiny_images
    config = TrainConfig(limit_train=100, limit_test=20, val_split=0.2)
    splits = make_splits(images, labels, images, labels, config, torch.device("cpu"), 0)
    assert (len(splits.train_images), len(splits.val_images), len(splits.test_images)) == (80, 20, 20)
    assert not splits.val_is_test
    result = train(SMALL, splits, TrainConfig(epochs=1, batch_size=32, compile="off", val_split=0.2))
    assert len(result.test.predictions) == 20  # the final score is on the test split


def test_impossible_settings_are_config_errors(tiny_images):
    images, labels = tiny_images
    with pytest.raises(ConfigError, match="--val-split"):
        make_splits(images[:1], labels[:1], images, labels, TrainConfig(val_split=0.5), torch.device("cpu"), 0)
    with pytest.raises(ConfigError, match="--precision"):
        TrainConfig(precision="fp8").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_auto_choices_on_this_machine():
    hardware = resolve_hardware(TrainConfig())
    if not torch.cuda.is_available():
        assert hardware.device == "cpu" and hardware.compiled is False
        assert hardware.precision in ("fp32", "bf16")
    assert hardware.channels_last is True  # NHWC everywhere: measured faster on the CPU and the GPU
    assert hardware.cudnn_benchmark is False  # opt-in until a GPU benchmark shows it pays
    assert resolve_hardware(TrainConfig(precision="fp32")).precision == "fp32"


def test_cudnn_autotuning_switch_is_scoped_to_a_run():
    from cnnlab.engine import _cudnn_benchmark

    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with pytest.raises(RuntimeError):
            with _cudnn_benchmark(True):
                assert torch.backends.cudnn.benchmark is True
                raise RuntimeError("interrupted")
        assert torch.backends.cudnn.benchmark is False  # restored, even after an error
        torch.backends.cudnn.benchmark = True
        with _cudnn_benchmark(False):
            assert torch.backends.cudnn.benchmark is True  # a user's own global choice is kept
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = saved


def test_bf16_autocast_trains(tiny_images):
    result = fit(*tiny_images, epochs=1, precision="bf16")
    assert result.hardware.precision == "bf16"
    assert result.history[0].loss == result.history[0].loss  # not NaN


def test_resume_from_checkpoint_equals_uninterrupted(tiny_images, tmp_path):
    images, labels = tiny_images
    full_config = TrainConfig(epochs=4, batch_size=32, learning_rate=3e-3, compile="off")
    splits = splits_of(images, labels, full_config)
    full = train(SMALL, splits, full_config, seed=5)

    checkpoint = tmp_path / "checkpoint.pt"
    first = TrainConfig(epochs=2, batch_size=32, learning_rate=3e-3, compile="off")
    train(SMALL, splits, first, seed=5, checkpoint_path=checkpoint, save_checkpoint=save_torch)
    assert checkpoint.exists()
    resumed = train(SMALL, splits, full_config, seed=5, checkpoint_path=checkpoint, save_checkpoint=save_torch)
    assert [r.epoch for r in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(full.history, resumed.history):
        assert (a.loss, a.accuracy, a.val_loss, a.val_accuracy) == (b.loss, b.accuracy, b.val_loss, b.val_accuracy)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_training_leaves_global_rng_untouched(tiny_images):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fit(*tiny_images, epochs=1)
    assert torch.equal(before, torch.get_rng_state())
