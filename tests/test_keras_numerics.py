"""Keras 2.2.4's numerics (`--keras-numerics 2`, the notebook's Keras) next to Keras 3's (the default).

Keras 2.2.4 needs Python 3.7 and TensorFlow 1, so it cannot run here: every expectation below is a
formula written out from its source (keras/layers/normalization.py, keras/backend/tensorflow_backend.py,
keras/optimizers.py, keras/initializers.py, keras/callbacks.py of the 2.2.4 tag; TensorFlow 1.x's
training/moving_averages.py and core/kernels/fused_batch_norm_op.cc), computed in float64 in the test.
"""

from __future__ import annotations

import copy
import json
import math
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.cli import main
from cnnlab.config import (
    BestCheckpoint,
    DataSelection,
    EarlyStopping,
    Hardware,
    HardwareRequest,
    Recipe,
    RunPlan,
    make_arms,
    reproduce_args,
)
from cnnlab.datasets import Dataset
from cnnlab.engine import DeviceData, TrainStep, categorical_cross_entropy, evaluate, train
from cnnlab.errors import ConfigError
from cnnlab.keras_json import spec_from_keras_json
from cnnlab.models import KerasBatchNorm, build_model, keras_init_, load_weights
from cnnlab.optim import KerasRMSprop, KerasSGD, make_optimizer
from cnnlab.spec import BatchNormalization, parse_spec, spec_to_dict
from cnnlab_cli import run_cnnlab
from synthetic import learnable_arrays, learnable_tensors, write_dataset_folder

CPU = Hardware("cpu", "Test CPU", "fp32", compiled=False, channels_last=False, threads=torch.get_num_threads())
KERAS_FIXTURES = Path(__file__).parent / "fixtures" / "keras"
MOMENTUM, EPSILON = 0.99, 1e-3  # Keras's BatchNormalization defaults
# A convolution and a Dense layer, each followed by BatchNormalization.
BN_SPEC = {
    "name": "bn",
    "input_shape": [28, 28, 1],
    "layers": [
        {"type": "Conv2D", "filters": 4, "kernel_size": 3, "strides": 2, "activation": "relu"},
        {"type": "BatchNormalization"},
        {"type": "Flatten"},
        {"type": "Dense", "units": 16, "activation": "relu"},
        {"type": "BatchNormalization"},
        {"type": "Dense", "units": 10, "activation": "softmax"},
    ],
}
BN_SPEC_TOML = """
name = "bn"
input_shape = [28, 28, 1]
[[layers]]
type = "Conv2D"
filters = 4
kernel_size = 3
strides = 2
activation = "relu"
[[layers]]
type = "BatchNormalization"
[[layers]]
type = "Flatten"
[[layers]]
type = "Dense"
units = 10
activation = "softmax"
"""


def batches(shape: tuple[int, ...], sizes: tuple[int, ...] = (8, 8, 5)) -> list[torch.Tensor]:
    """Training batches of one shape (the last one partial, as an epoch's last batch)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn((size, *shape), generator=generator) * 3 + 5 for size in sizes]


def keras224_moving_statistics(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The moving mean and variance of Keras 2.2.4's BatchNormalization (TensorFlow backend) after
    training on `inputs`, in float64, written out from its source:

    - keras/layers/normalization.py: `variance *= n / (n - (1.0 + epsilon))`, n the values per channel;
    - for a 4-D input that variance comes from tf.nn.fused_batch_norm
      (tensorflow_backend.normalize_batch_in_training), whose batch variance already carries Bessel's
      correction n / (n - 1) (fused_batch_norm_op.cc, `rest_size_adjust`); a 2-D input's from
      tf.nn.moments, biased;
    - K.moving_average_update = assign_moving_average(zero_debias=True): a biased average from 0,
      biased_t = m biased_{t-1} + (1 - m) value, and moving_t = biased_t / (1 - m^t).
    """
    biased_mean = biased_var = 0.0
    for t, x in enumerate(inputs, start=1):
        x = x.double()
        axes = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        mean, variance = x.mean(axes), x.var(axes, correction=0)
        if x.dim() == 4:
            variance = variance * n / (n - 1)
        variance = variance * n / (n - (1.0 + EPSILON))
        biased_mean = MOMENTUM * biased_mean + (1 - MOMENTUM) * mean
        biased_var = MOMENTUM * biased_var + (1 - MOMENTUM) * variance
        moving_mean, moving_var = biased_mean / (1 - MOMENTUM**t), biased_var / (1 - MOMENTUM**t)
    return moving_mean, moving_var


# ---------------------------------------------------------------------------------------------
# BatchNormalization


@pytest.mark.parametrize("shape", [(3, 5, 5), (4,)], ids=["conv", "dense"])
def test_batchnorm_moving_statistics_are_keras_2_2_4s(shape):
    bn = KerasBatchNorm(shape[0], BatchNormalization(), numerics=2).train()
    reference = KerasBatchNorm(shape[0], BatchNormalization()).train()
    inputs = batches(shape)
    for x in inputs:
        # The batch itself is normalised alike: with its biased moments.
        torch.testing.assert_close(bn(x), reference(x))
    expected_mean, expected_var = keras224_moving_statistics(inputs)
    torch.testing.assert_close(bn.running_mean.double(), expected_mean, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), expected_var, rtol=2e-6, atol=1e-6)
    assert int(bn.num_batches_tracked) == len(inputs)
    # Keras 3's average starts from 0 and 1: after 3 steps it is far from the batches' statistics.
    assert not torch.allclose(reference.running_mean.double(), expected_mean, rtol=0.1)


@pytest.mark.parametrize("shape", [(3, 5, 5), (4,)], ids=["conv", "dense"])
def test_default_batchnorm_keeps_keras_3s_plain_average(shape):
    bn = KerasBatchNorm(shape[0], BatchNormalization()).train()
    moving_mean, moving_var = torch.zeros(shape[0], dtype=torch.float64), torch.ones(shape[0], dtype=torch.float64)
    for x in batches(shape):
        bn(x)
        axes = [0, *range(2, x.dim())]
        moving_mean = MOMENTUM * moving_mean + (1 - MOMENTUM) * x.double().mean(axes)
        moving_var = MOMENTUM * moving_var + (1 - MOMENTUM) * x.double().var(axes, correction=0)
    torch.testing.assert_close(bn.running_mean.double(), moving_mean, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), moving_var, rtol=2e-6, atol=1e-6)
    assert "num_batches_tracked" not in bn.state_dict()  # Keras 3's state dicts are 0.1's


def test_models_built_with_keras_2_numerics_count_their_steps():
    spec = parse_spec(BN_SPEC)
    keras2, keras3 = build_model(spec, seed=0, numerics=2), build_model(spec, seed=0)
    counts = [k for k in keras2.state_dict() if k.endswith("num_batches_tracked")]
    assert counts == ["layers.1.num_batches_tracked", "layers.4.num_batches_tracked"]
    assert set(keras2.state_dict()) - set(keras3.state_dict()) == set(counts)
    for name, value in keras3.state_dict().items():
        assert torch.equal(value, keras2.state_dict()[name]), name  # the same initial weights from the same seed
    with pytest.raises(ValueError, match="numerics must be 2"):
        build_model(spec, numerics=1)


def test_load_weights_reads_either_numerics():
    spec = parse_spec(BN_SPEC)
    images = torch.rand(6, 1, 28, 28)
    trained = build_model(spec, seed=0, numerics=2).train()
    trained(images)
    for_inference = build_model(spec, seed=1)  # predict, export and evaluate build with the default
    load_weights(for_inference, trained.state_dict())
    trained.eval()
    for_inference.eval()
    torch.testing.assert_close(for_inference(images), trained(images))
    fresh = build_model(spec, seed=1, numerics=2)
    load_weights(fresh, build_model(spec, seed=0).state_dict())  # the count the state lacks stays 0
    assert int(fresh.layers[1].num_batches_tracked) == 0
    assert torch.equal(fresh.layers[0][0].weight, build_model(spec, seed=0).layers[0][0].weight)
    state = trained.state_dict()
    del state["layers.1.running_var"]
    with pytest.raises(RuntimeError, match="running_var"):  # everything else stays strict
        load_weights(for_inference, state)


# ---------------------------------------------------------------------------------------------
# Training: the engine's loop with Keras 2 numerics


def fit(epochs: int, keras_numerics: int, checkpoint=None, **recipe):
    images, labels = learnable_tensors(96)
    dataset = Dataset("mnist", tuple("0123456789"), images, labels, images[:32], labels[:32], Path("."), True)
    splits = DeviceData(dataset, DataSelection(), torch.device("cpu")).splits(0)
    recipe = Recipe(epochs=epochs, batch_size=32, learning_rate=3e-3, keras_numerics=keras_numerics, **recipe)
    return train(parse_spec(BN_SPEC), recipe, 0, splits, CPU, checkpoint=checkpoint)


class MemoryCheckpoint:
    def __init__(self) -> None:
        self.state = None

    def load(self):
        return self.state

    def save(self, state):
        self.state = copy.deepcopy(state)


def test_resuming_keeps_the_debiasing():
    full = fit(2, 2)
    checkpoint = MemoryCheckpoint()
    fit(1, 2, checkpoint)
    assert int(checkpoint.state["model"]["layers.1.num_batches_tracked"]) == 3  # 96 images, batches of 32
    resumed = fit(2, 2, checkpoint)
    assert [(r.loss, r.val_loss) for r in resumed.history] == [(r.loss, r.val_loss) for r in full.history]
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert int(full.model.layers[4].num_batches_tracked) == 6


def test_early_stopping_restores_only_when_it_stops_in_keras_2():
    """Keras 3 restores the best weights at the end of training; Keras 2.2.4's EarlyStopping only when
    it stops training (keras/callbacks.py, on_epoch_end)."""
    stopping = EarlyStopping(monitor="loss", patience=5, restore_best_weights=True)
    assert fit(2, 3, early_stopping=stopping).restored_epoch is not None
    kept = fit(2, 2, early_stopping=stopping)
    assert kept.restored_epoch is None and kept.stopped_epoch is None


# ---------------------------------------------------------------------------------------------
# The loss


def keras224_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """keras/backend/tensorflow_backend.py categorical_crossentropy(from_logits=False), per sample,
    on the softmax of `logits`: output /= sum(output); clip to [epsilon, 1 - epsilon]; -sum(target * log)."""
    output = logits.double().softmax(dim=1)
    output = output / output.sum(dim=1, keepdim=True)
    output = output.clamp(1e-7, 1 - 1e-7)
    target = F.one_hot(labels, logits.shape[1]).double()
    return -(target * output.log()).sum(dim=1)


def test_keras_2_loss_is_the_clipped_probability_formula():
    # A sample in the middle; one whose class has p > 1 - 1e-7; one whose class has p < 1e-7.
    logits = torch.tensor([[2.0, 1.0, -0.5], [40.0, 0.0, 0.0], [40.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    expected = keras224_loss(logits, labels)
    assert expected[1].item() == pytest.approx(1e-7, rel=1e-6) and expected[2].item() == pytest.approx(-math.log(1e-7))
    keras2 = logits.clone().requires_grad_()
    loss = categorical_cross_entropy(keras2, labels, numerics=2)
    torch.testing.assert_close(loss.double(), expected.mean(), rtol=1e-6, atol=1e-7)
    summed = categorical_cross_entropy(logits, labels, numerics=2, reduction="sum")
    torch.testing.assert_close(summed.double(), expected.sum(), rtol=1e-6, atol=1e-7)
    loss.backward()
    assert torch.equal(keras2.grad[1:], torch.zeros(2, 3))  # clipped: no gradient
    torch.testing.assert_close(keras2.grad[0], (logits[0].softmax(0) - torch.tensor([1.0, 0, 0])) / 3)
    keras3 = logits.clone().requires_grad_()
    loss3 = categorical_cross_entropy(keras3, labels)
    assert torch.equal(loss3, F.cross_entropy(logits, labels))
    assert loss3.item() == pytest.approx((keras224_loss(logits[:1], labels[:1]).item() + 40) / 3)  # unclipped
    loss3.backward()
    assert (keras3.grad[1] != 0).any() and (keras3.grad[2] != 0).all()


def confident_model() -> nn.Module:
    """Logits that pick class 0 by a margin of 40, whatever the image."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([40.0] + [0.0] * 9))
    return model


@pytest.mark.parametrize("numerics", [2, 3])
def test_training_step_and_evaluation_use_the_numerics_loss(numerics):
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 0, 1, 0])  # the third sample is wrong with p < 1e-7
    model = confident_model()
    before = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(model, KerasSGD(model.parameters(), lr=0.1), CPU, images, labels, numerics=numerics)
    step(torch.arange(4))
    logits = confident_model()(images.float().div(255).unsqueeze(1))
    if numerics == 2:
        expected = keras224_loss(logits, labels).sum().item()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # every gradient clipped away
    else:
        expected = F.cross_entropy(logits, labels, reduction="sum").item()
        assert not torch.equal(before[1], model[1].bias)
    assert float(step.totals[0]) == pytest.approx(expected, rel=1e-6)
    evaluation = evaluate(confident_model(), images, labels, CPU, numerics=numerics)
    assert evaluation.loss == pytest.approx(expected / 4, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Optimizers


def rmsprop_by_hand(numerics: int, start: torch.Tensor, grads: list[torch.Tensor], lr: float, eps: float):
    """Keras 3: w -= lr g / sqrt(v + eps); Keras 2.2.4 (keras/optimizers.py): w -= lr g / (sqrt(v) + eps)."""
    weights, velocity = start.double(), torch.zeros_like(start, dtype=torch.float64)
    for g in grads:
        velocity = 0.9 * velocity + 0.1 * g.double() ** 2
        root = velocity.sqrt() + eps if numerics == 2 else (velocity + eps).sqrt()
        weights = weights - lr * g.double() / root
    return weights


@pytest.mark.parametrize("numerics", [2, 3])
def test_rmsprop_epsilon_placement(numerics):
    start = torch.tensor([0.5, -1.0, 2.0, 0.0])
    grads = [torch.tensor([0.1, -0.02, 0.3, 0.0]), torch.tensor([0.05, 0.01, -0.2, 0.0]), torch.tensor([-0.1, 0.0, 0.4, 0.0])]  # fmt: skip
    weights = nn.Parameter(start.clone())
    optimizer = make_optimizer([weights], Recipe(optimizer="rmsprop", epsilon=0.01, keras_numerics=numerics))
    assert isinstance(optimizer, KerasRMSprop) and copy.deepcopy(optimizer).numerics == numerics
    for g in grads:
        weights.grad = g.clone()
        optimizer.step()
    expected = rmsprop_by_hand(numerics, start, grads, 1e-3, 0.01)
    torch.testing.assert_close(weights.detach().double(), expected, rtol=1e-6, atol=1e-7)
    other = rmsprop_by_hand(5 - numerics, start, grads, 1e-3, 0.01)
    assert (weights.detach().double() - other).abs().max() > 1e-4  # the placement matters at this epsilon
    with pytest.raises(ValueError, match="numerics 2 \\(without momentum\\)"):
        KerasRMSprop([nn.Parameter(start.clone())], momentum=0.5, numerics=2)


# ---------------------------------------------------------------------------------------------
# Initializers


@pytest.mark.parametrize("family, scale, mode", [("he", 2.0, "fan_in"), ("lecun", 1.0, "fan_in"), ("glorot", 1.0, "fan_avg")])  # fmt: skip
def test_keras21_normals_lack_the_truncation_correction(family, scale, mode):
    """Keras < 2.2.0's VarianceScaling 'normal': truncated at 2 stddev of sqrt(scale / fan), so its
    samples' stddev is 0.8796 of that; Keras 2.2.0 divided the stddev by 0.8796 (keras/initializers.py)."""
    weight = torch.empty(256, 4096)  # a Dense kernel: fan_in 4096, fan_out 256
    fan = 4096 if mode == "fan_in" else (4096 + 256) / 2
    target = math.sqrt(scale / fan)
    keras_init_(weight, f"{family}_normal_keras21", torch.Generator().manual_seed(0))
    assert weight.std().item() == pytest.approx(target * 0.87962566103423978, rel=0.01)
    assert weight.abs().max().item() <= 2 * target + 1e-9
    keras_init_(weight, f"{family}_normal", torch.Generator().manual_seed(0))
    assert weight.std().item() == pytest.approx(target, rel=0.01)


def test_keras2_takes_a_bias_fans_as_the_square_root_of_its_length():
    """keras/initializers.py `_compute_fans` of Keras 2 gives a 1-D shape fans of sqrt(n); Keras 3 n."""
    bias = torch.empty(10000)
    keras_init_(bias, "he_uniform", torch.Generator().manual_seed(0), numerics=2)
    assert bias.abs().max().item() == pytest.approx(math.sqrt(6 / 100), rel=1e-3)
    keras_init_(bias, "he_uniform", torch.Generator().manual_seed(0))
    assert bias.abs().max().item() == pytest.approx(math.sqrt(6 / 10000), rel=1e-3)


def test_keras21_initializers_in_a_spec():
    data = {**BN_SPEC, "layers": [*BN_SPEC["layers"][:3], {"type": "Dense", "units": 10, "kernel_initializer": "he_normal_keras21"}]}  # fmt: skip
    spec = parse_spec(data)
    assert spec.layers[3].kernel_initializer == "he_normal_keras21"
    assert parse_spec(spec_to_dict(spec)) == spec
    build_model(spec, seed=0)


@pytest.mark.parametrize(
    "version, expected",
    [("2.1.6", "he_normal_keras21"), ("2.0.8", "he_normal_keras21"), ("2.1.6-tf", "he_normal_keras21"),
     ("2.2.0", "he_normal"), ("2.2.4", "he_normal"), ("2.2.4-tf", "he_normal"), (None, "he_normal")],
)  # fmt: skip
def test_keras_version_decides_what_a_normal_initializer_was(version, expected):
    data = json.loads((KERAS_FIXTURES / "seed_convnet3_keras224.json").read_text())
    if version is None:
        del data["keras_version"]
    else:
        data["keras_version"] = version
    layers = spec_from_keras_json(data, "model.json", "model").layers
    assert (layers[0].kernel_initializer, layers[7].kernel_initializer) == ("glorot_uniform", expected)
    assert layers[7].bias_initializer == "zeros"


def test_the_keras_2_1_fixture_imports_uncorrected_normals():
    data = json.loads((KERAS_FIXTURES / "seed_convnet7_keras21_list.json").read_text())
    assert data["keras_version"] == "2.1.6"
    dense = [layer for layer in spec_from_keras_json(data, "model.json", "model").layers if layer.type == "Dense"]
    assert [layer.kernel_initializer for layer in dense] == ["he_normal_keras21"] * 3 + ["glorot_uniform"]


# ---------------------------------------------------------------------------------------------
# The recipe key and the command line


@pytest.mark.parametrize(
    "fields, missing",
    [
        ({"optimizer": "adamw"}, "AdamW (--optimizer adamw)"),
        ({"weight_decay": 0.01}, "weight decay (--weight-decay)"),
        ({"optimizer": "rmsprop", "momentum": 0.5}, "RMSprop momentum (--momentum)"),
        ({"early_stopping": EarlyStopping(baseline=0.1)}, "EarlyStopping baseline as Keras 3 means it"),
        ({"early_stopping": EarlyStopping(start_from_epoch=2)}, "EarlyStopping start_from_epoch"),
        ({"best_checkpoint": BestCheckpoint(initial_value_threshold=0.5)}, "initial_value_threshold"),
    ],
)
def test_keras_2_refuses_what_keras_2_2_4_lacks(fields, missing):
    with pytest.raises(ConfigError, match="^--keras-numerics 2 trains as Keras 2.2.4, which has no ") as info:
        Recipe(keras_numerics=2, **fields)
    assert missing in str(info.value) and str(info.value).endswith("; remove it or use --keras-numerics 3")
    Recipe(**fields)  # Keras 3 has them all


def test_keras_numerics_recipe_key():
    recipe = Recipe(keras_numerics=2, optimizer="sgd", momentum=0.9, nesterov=True,
                    early_stopping=EarlyStopping(patience=2, restore_best_weights=True))  # fmt: skip
    assert Recipe().keras_numerics == 3
    assert Recipe.from_dict(recipe.to_dict()) == recipe and recipe.to_dict()["keras_numerics"] == 2
    for bad in (4, 2.0, True, "2"):
        with pytest.raises(ConfigError, match="^--keras-numerics must be 2 \\(Keras 2.2.4, the notebook's\\) or 3"):
            Recipe(keras_numerics=bad)
    spec = parse_spec(BN_SPEC)
    arms = make_arms([spec], [Recipe(), Recipe(keras_numerics=2)])
    assert [arm.name for arm in arms] == ["bn", "bn@keras=2"]
    plan = RunPlan(arms[1:], (0,), DataSelection(), HardwareRequest(), CPU)
    args = reproduce_args(plan, ["bn.toml"])
    assert args[args.index("--keras-numerics") + 1] == "2"


def test_cli_refuses_adamw_with_keras_2(capsys):
    assert main(["train", "convnet3", "--keras-numerics", "2", "--optimizer", "adamw"]) == 2
    (line,) = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert line == (
        "error: the command line: --keras-numerics 2 trains as Keras 2.2.4, which has no AdamW (--optimizer adamw); "
        "remove it or use --keras-numerics 3"
    )


@pytest.mark.parametrize("command", ["train", "compare", "sweep"])
def test_help_explains_keras_numerics(command, capsys):
    assert main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the help's lines, unwrapped
    assert "Keras 2.2.4" in out and ("--keras-numerics" in out or "keras_numerics = 2" in out)


def test_cli_trains_with_keras_2_numerics_and_records_them(tmp_path):
    data = tmp_path / "data"
    write_dataset_folder(data / "mnist", learnable_arrays(256, 64))
    spec = tmp_path / "bn.toml"
    spec.write_text(BN_SPEC_TOML)
    result = run_cnnlab(
        "train", str(spec), "--data-dir", str(data), "--epochs", "1", "--keras-numerics", "2",
        "--runs-dir", str(tmp_path / "runs"), "--format", "svg", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["arms"][0]["recipe"]["keras_numerics"] == 2
    assert Recipe.from_dict(config["arms"][0]["recipe"]).keras_numerics == 2
    weights = torch.load(run_dir / "bn" / "seed-0" / "weights.pt")
    assert int(weights["layers.1.num_batches_tracked"]) == 2  # 256 images in batches of 128
