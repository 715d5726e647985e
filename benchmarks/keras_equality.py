"""Proof, not claims: the same model trained step by step in Keras 3 and in cnnlab, compared.

For each model the two frameworks start from the same weights (Keras's own initial weights, moved
into cnnlab by the import, `cnnlab.keras_weights.state_dict_from_keras`), see the same batches in
the same order, with dropout off and in fp32, and take the same number of Adam steps (Keras's
defaults on both sides: lr 1e-3, epsilon 1e-7). It records every step's training loss on both
sides and, after the last step, each variable's relative L2 difference ||cnnlab - keras|| / ||keras||,
BatchNormalization's moving mean and variance included (cnnlab's weights read back in Keras's
names and layouts by `cnnlab.keras_weights.keras_layer_weights`).

- Keras: Keras 3 on its PyTorch backend (`KERAS_BACKEND=torch`, no TensorFlow), the model made
  from its JSON (a Keras 3 fixture file itself, otherwise `cnnlab.keras_files.keras_config(spec)`),
  compiled with `keras.optimizers.Adam()` and `categorical_crossentropy` on one-hot labels as the
  seed notebook does, trained by `model.train_on_batch` after `model.reset_metrics()` (Keras 3.15's
  `train_on_batch` resets them too), so the loss it returns is that batch's mean, computed before
  the update (checked against the loss of `model(x, training=True)` on the batch).
- cnnlab: `models.build_model(spec)` with the imported weights, trained by the engine's own step
  (`engine.build_train_step`) with `optim.make_optimizer(..., Recipe())`, fp32, eager, NCHW, on
  the CPU. The step adds `loss * batch` to `step.totals[0]`; the totals are reset before every
  step, so `totals[0] / batch` is exactly that step's mean loss (a power-of-two batch makes the
  multiplication and the division exact).
- Data: 28x28x1 models see the first `steps * batch` real MNIST training images (from
  `--data-dir`, default $CNNLAB_DATA_DIR), other inputs deterministic synthetic images (a bright
  bar whose row gives the class, over noise, with a fifth of the labels random so that the loss
  stays well above zero and relative differences stay meaningful). Without MNIST, synthetic too.

Two comparisons, with the issue's tolerances (fixed before measuring: `LOSS_TOLERANCE`,
`WEIGHT_TOLERANCE`):

- Step by step (`measure_step_by_step`, what tests/test_keras_equality.py asserts): before each of
  Keras's steps cnnlab takes Keras's whole state (weights, moving statistics, Adam's moments and
  step count) and takes the same step with its engine; every step's loss and the weights after the
  last step are compared. This checks each step's arithmetic, 100 times along Keras's trajectory.
- Free-running (`measure`): each side trains from its own previous step. fp32 rounding differences
  (1e-7) are amplified by training, so the two trajectories part within 3 to 60 steps; with
  `layout_baseline` cnnlab also trains in channels_last against itself in NCHW (the same arithmetic
  in another order), which parts as fast: the measure of what rounding alone does. The amplifier is
  Adam on variables whose gradient is mathematically zero (a bias feeding BatchNormalization): both
  sides compute rounding noise there and Adam's first steps turn it into updates of a tenth of the
  learning rate with either sign. BENCHMARKS.md ("Keras 3 step-by-step equality") has the numbers.

    KERAS_BACKEND=torch python benchmarks/keras_equality.py                  # every model, 100 steps
    KERAS_BACKEND=torch python benchmarks/keras_equality.py --models convnet7 --steps 10 --batch-size 32
    KERAS_BACKEND=torch python benchmarks/keras_equality.py --json benchmarks/results/keras_equality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from cnnlab.catalog import load_spec
from cnnlab.config import Hardware, Recipe
from cnnlab.datasets import load_dataset
from cnnlab.engine import build_train_step
from cnnlab.hardware import cpu_name
from cnnlab.keras_files import keras_config
from cnnlab.keras_weights import keras_layer_weights, state_dict_from_keras
from cnnlab.models import build_model
from cnnlab.optim import make_optimizer
from cnnlab.spec import Dropout, ModelSpec

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "keras"
LOSS_TOLERANCE = 1e-3  # every step's |loss_cnnlab - loss_keras| / loss_keras
WEIGHT_TOLERANCE = 1e-2  # every final variable's ||cnnlab - keras|| / ||keras||
MOVING_STATISTICS = ("moving_mean", "moving_variance")

# The built-in models, and imported ones that add what they lack: BatchNormalization after
# convolutions (momentum 0.9, epsilon 1e-5, center or scale off), layers without bias, RGB 32x32
# inputs, strides with 'same' padding (asymmetric), 20 classes, and a Keras 2 file.
MODELS = (
    "convnet3",
    "convnet5",
    "convnet7",
    "batchnorm_rgb20_keras2.json",
    "strided_same_rgb20_keras3.json",
    "nobias_batchnorm_conv20_keras3.json",
)


@dataclass(frozen=True)
class VariableDifference:
    """One variable's relative L2 difference after the last step, in Keras's names."""

    layer: str  # the Keras layer's name
    variable: str  # kernel, bias, gamma, beta, moving_mean or moving_variance
    relative_l2: float


@dataclass(frozen=True)
class Comparison:
    """Two trainings of one model from the same weights on the same batches: every step's loss of
    each, and each variable's relative L2 difference after the last step (against the reference)."""

    losses: tuple[float, ...]
    reference_losses: tuple[float, ...]
    variables: tuple[VariableDifference, ...]

    @property
    def loss_differences(self) -> tuple[float, ...]:
        """|loss - reference| / reference, step by step."""
        return tuple(abs(ours - theirs) / abs(theirs) for ours, theirs in zip(self.losses, self.reference_losses))

    @property
    def max_loss_difference(self) -> float:
        return max(self.loss_differences)

    @property
    def worst_step(self) -> int:
        """1-based step of the largest relative loss difference."""
        return int(np.argmax(self.loss_differences)) + 1

    @property
    def first_failing_step(self) -> int | None:
        """1-based first step whose relative loss difference reaches LOSS_TOLERANCE, or None."""
        return next((i + 1 for i, d in enumerate(self.loss_differences) if not d < LOSS_TOLERANCE), None)

    @property
    def worst_variable(self) -> VariableDifference:
        return max(self.variables, key=lambda v: v.relative_l2)

    @property
    def worst_moving_statistic(self) -> VariableDifference | None:
        moving = [v for v in self.variables if v.variable in MOVING_STATISTICS]
        return max(moving, key=lambda v: v.relative_l2) if moving else None

    @property
    def failures(self) -> list[str]:
        """What exceeds the issue's tolerances, in words (empty when within them)."""
        found = []
        if self.first_failing_step is not None:
            step = self.first_failing_step
            found.append(
                f"loss differs by {self.loss_differences[step - 1]:.2e} relative first at step {step} "
                f"({self.losses[step - 1]:.7g} vs {self.reference_losses[step - 1]:.7g}); "
                f"worst {self.max_loss_difference:.2e} at step {self.worst_step}"
            )
        over = sorted((v for v in self.variables if not v.relative_l2 < WEIGHT_TOLERANCE), key=lambda v: -v.relative_l2)
        if over:
            listed = ", ".join(f"{v.layer}/{v.variable} {v.relative_l2:.2e}" for v in over)
            found.append(
                f"{len(over)} of {len(self.variables)} variables differ by >= {WEIGHT_TOLERANCE} relative L2: {listed}"
            )
        return found


@dataclass(frozen=True)
class Equality:
    """One model trained in both frameworks (`keras`: cnnlab against Keras) and, with a layout
    baseline, cnnlab against itself (`layout`: channels_last against NCHW, the same arithmetic in
    another order, which shows how far fp32 rounding alone moves a training)."""

    model: str
    keras_source: str  # where the Keras model came from
    data: str  # "mnist" or "synthetic"
    steps: int
    batch_size: int
    keras: Comparison  # cnnlab (NCHW) against Keras
    initial_difference: float  # largest |cnnlab - keras| of any initial weight: the import itself
    keras_seconds: float  # the training steps only
    cnnlab_seconds: float
    layout: Comparison | None = None  # cnnlab channels_last against cnnlab NCHW

    @property
    def failures(self) -> list[str]:
        return self.keras.failures

    def to_dict(self) -> dict:
        summary = lambda c: {  # noqa: E731
            "max_loss_difference": c.max_loss_difference,
            "worst_step": c.worst_step,
            "first_failing_step": c.first_failing_step,
            "worst_variable": dataclasses.asdict(c.worst_variable),
            "loss_differences": c.loss_differences,
        }
        return {
            **dataclasses.asdict(self),
            "keras_summary": summary(self.keras),
            "layout_summary": summary(self.layout) if self.layout else None,
        }


# ---------------------------------------------------------------------------------------------
# The models


def import_keras() -> ModuleType:
    """Keras 3 on its PyTorch backend, fp32 (KERAS_BACKEND must be torch before Keras is imported)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r}; set KERAS_BACKEND=torch before importing it")
    if keras.config.dtype_policy().name != "float32":
        raise RuntimeError(f"Keras's dtype policy is {keras.config.dtype_policy().name}, not float32")
    return keras


def model_spec(name: str) -> ModelSpec:
    """A built-in model by name, or a Keras JSON fixture by file name; dropout off (rate 0)."""
    spec = load_spec(name if not name.endswith(".json") else FIXTURES / name)
    layers = tuple(dataclasses.replace(lay, rate=0.0) if isinstance(lay, Dropout) else lay for lay in spec.layers)
    return dataclasses.replace(spec, layers=layers)


def keras_json(name: str, spec: ModelSpec) -> tuple[str, str]:
    """The Keras model's JSON, dropout off, and where it came from: a Keras 3 fixture file itself
    (the user's exact model), otherwise what cnnlab writes (`keras_config`; Keras 3 cannot read
    Keras 2's JSON)."""
    if name.endswith(".json"):
        data = json.loads((FIXTURES / name).read_text())
        if "module" in data:  # Keras 3's serialisation
            for layer in data["config"]["layers"]:
                if layer["class_name"] == "Dropout":
                    layer["config"]["rate"] = 0.0
            return json.dumps(data), f"tests/fixtures/keras/{name}"
    return json.dumps(keras_config(spec)), "cnnlab.keras_files.keras_config(spec)"


def keras_weights(model) -> tuple[dict[str, np.ndarray], ...]:
    """Each Keras layer's variables by name (kernel, bias, gamma, ...), as float32 numpy arrays."""
    return tuple(
        {variable.path.rsplit("/", 1)[-1]: np.array(variable.numpy(), dtype=np.float32) for variable in layer.weights}
        for layer in model.layers
    )


# ---------------------------------------------------------------------------------------------
# The data


def synthetic_images(count: int, shape: tuple[int, int, int], classes: int, seed: int = 0):
    """`count` uint8 images (N, H, W[, C]) and int64 labels: a bright bar at a row that gives the
    class, over noise; a fifth of the labels are random, so the loss cannot fall to zero."""
    rng = np.random.default_rng(seed)
    height, width, channels = shape
    labels = rng.integers(0, classes, count)
    images = rng.integers(0, 60, (count, height, width, channels), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = label * (height - 2) // classes
        images[i, row : row + 2, width // 8 : width - width // 8, label % channels] = 255
    noisy = rng.random(count) < 0.2
    labels[noisy] = rng.integers(0, classes, int(noisy.sum()))
    if channels == 1:
        images = images[..., 0]
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def batches_for(spec: ModelSpec, count: int, data_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`count` images and labels in training order: real MNIST for 28x28x1 models when `data_dir`
    has it, synthetic images otherwise."""
    if tuple(spec.input_shape) == (28, 28, 1) and spec.num_classes >= 10 and data_dir is not None:
        if (Path(data_dir) / "mnist").is_dir():
            dataset = load_dataset("mnist", data_dir=Path(data_dir), download=False, progress=False)
            if len(dataset.train_images) >= count:
                return dataset.train_images[:count], dataset.train_labels[:count], "mnist"
    images, labels = synthetic_images(count, tuple(spec.input_shape), spec.num_classes)
    return images, labels, "synthetic"


# ---------------------------------------------------------------------------------------------
# The measurement


def relative_l2(ours: np.ndarray, reference: np.ndarray) -> float:
    """||ours - reference|| / ||reference|| in float64 (0 when both are zero)."""
    difference = np.linalg.norm(ours.astype(np.float64) - reference.astype(np.float64))
    norm = np.linalg.norm(reference.astype(np.float64))
    return float(difference / norm) if norm > 0 else (0.0 if difference == 0 else math.inf)


def differences(
    names: list[str], ours: tuple[dict[str, np.ndarray], ...], reference: tuple[dict[str, np.ndarray], ...]
) -> tuple[VariableDifference, ...]:
    """Every variable's relative L2 difference, layer by layer, in Keras's names."""
    return tuple(
        VariableDifference(name, key, relative_l2(mine[key], theirs[key]))
        for name, mine, theirs in zip(names, ours, reference)
        for key in theirs
    )


def train_keras(model, x: np.ndarray, y: np.ndarray, steps: int, batch_size: int) -> tuple[list[float], float]:
    """`steps` steps of `model.train_on_batch` on consecutive batches; each step's loss and the seconds."""
    started = time.perf_counter()
    losses = []
    for i in range(steps):
        model.reset_metrics()  # so the loss returned is this batch's, not a running mean (3.15 resets too)
        batch = slice(i * batch_size, (i + 1) * batch_size)
        losses.append(float(model.train_on_batch(x[batch], y[batch])))
    return losses, time.perf_counter() - started


def train_cnnlab(
    spec: ModelSpec,
    initial: tuple[dict[str, np.ndarray], ...],
    source: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int,
    channels_last: bool = False,
) -> tuple[list[float], tuple[dict[str, np.ndarray], ...], float, float]:
    """`steps` steps of the engine's training step from Keras's weights `initial` on consecutive
    batches, fp32, eager, on the CPU. Returns each step's loss, the final weights in Keras's names
    and layouts, the seconds, and the largest difference of the imported weights from `initial`."""
    model = build_model(spec)
    model.load_state_dict(state_dict_from_keras(spec, initial, source), strict=False)
    imported = keras_layer_weights(model)
    initial_difference = max(
        (float(np.max(np.abs(ours[key] - theirs[key]))) for ours, theirs in zip(imported, initial) for key in theirs),
        default=0.0,
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    hardware = Hardware(
        "cpu", cpu_name(), "fp32", compiled=False, channels_last=channels_last, threads=torch.get_num_threads()
    )
    optimizer = make_optimizer(model.parameters(), Recipe())  # Keras's Adam and its defaults
    step = build_train_step(model, optimizer, hardware, images, labels, batch_size)
    model.train()
    started = time.perf_counter()
    sums = []
    for i in range(steps):
        step.reset()  # totals[0] then holds this step's loss * batch alone
        step(torch.arange(i * batch_size, (i + 1) * batch_size))
        sums.append(step.totals[0].clone())  # read once at the end: no host sync per step
    losses = (torch.stack(sums) / batch_size).tolist()
    return losses, keras_layer_weights(model), time.perf_counter() - started, initial_difference


@dataclass
class Setup:
    """One model ready to train in both frameworks on the same batches."""

    spec: ModelSpec
    images: torch.Tensor  # uint8, cnnlab's input
    labels: torch.Tensor
    data: str  # "mnist" or "synthetic"
    x: np.ndarray  # the same images as Keras takes them: float32 NHWC / 255
    y: np.ndarray  # one-hot
    keras_model: object
    keras_source: str
    names: list[str]  # Keras's layer names


def setup(name: str, steps: int, batch_size: int, data_dir: Path | None, seed: int) -> Setup:
    """The spec (dropout off), `steps * batch_size` images in training order, and the Keras model made
    from its JSON with Keras's own initial weights (seeded), compiled as the notebook does
    (jit_compile=False is what "auto" means on the torch backend: eager)."""
    keras = import_keras()
    spec = model_spec(name)
    images, labels, data = batches_for(spec, steps * batch_size, data_dir)
    x = images.numpy().astype(np.float32).reshape(len(images), *spec.input_shape) / 255
    y = np.eye(spec.num_classes, dtype=np.float32)[labels.numpy()]
    keras.utils.set_random_seed(seed)
    text, keras_source = keras_json(name, spec)
    keras_model = keras.models.model_from_json(text)
    if len(keras_model.layers) != len(spec.layers):
        raise RuntimeError(f"{name}: Keras has {len(keras_model.layers)} layers, the spec {len(spec.layers)}")
    keras_model.compile(optimizer=keras.optimizers.Adam(), loss="categorical_crossentropy", jit_compile=False)
    names = [layer.name for layer in keras_model.layers]
    return Setup(spec, images, labels, data, x, y, keras_model, keras_source, names)


def measure(
    name: str,
    steps: int = 100,
    batch_size: int = 128,
    data_dir: Path | None = None,
    seed: int = 0,
    layout_baseline: bool = False,
) -> Equality:
    """Train model `name` (built-in, or a fixture's file name) `steps` Adam steps in Keras 3 and in
    cnnlab from the same weights on the same batches, and compare (see the module's docstring).
    With `layout_baseline`, also train cnnlab in channels_last and compare it with cnnlab in NCHW."""
    ready = setup(name, steps, batch_size, data_dir, seed)
    spec, images, labels, data, x, y = ready.spec, ready.images, ready.labels, ready.data, ready.x, ready.y
    keras_model, keras_source, names = ready.keras_model, ready.keras_source, ready.names
    initial = keras_weights(keras_model)

    keras_losses, keras_seconds = train_keras(keras_model, x, y, steps, batch_size)
    keras_final = keras_weights(keras_model)
    losses, final, cnnlab_seconds, initial_difference = train_cnnlab(
        spec, initial, keras_source, images, labels, steps, batch_size
    )
    layout = None
    if layout_baseline:
        layout_losses, layout_final, _, _ = train_cnnlab(
            spec, initial, keras_source, images, labels, steps, batch_size, channels_last=True
        )
        layout = Comparison(tuple(layout_losses), tuple(losses), differences(names, layout_final, final))
    return Equality(
        model=name,
        keras_source=keras_source,
        data=data,
        steps=steps,
        batch_size=batch_size,
        keras=Comparison(tuple(losses), tuple(keras_losses), differences(names, final, keras_final)),
        initial_difference=initial_difference,
        keras_seconds=keras_seconds,
        cnnlab_seconds=cnnlab_seconds,
        layout=layout,
    )


# ---------------------------------------------------------------------------------------------
# Step by step: each cnnlab step taken from Keras's state


def keras_adam_state(model) -> tuple[tuple[dict[str, np.ndarray], ...], tuple[dict[str, np.ndarray], ...], int]:
    """Keras's Adam moments (m, v) per layer, in the layers' variable names and layouts, and its step count."""
    optimizer = model.optimizer
    moments: tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]] = ([], [])
    for layer in model.layers:
        for slots, layer_moments in zip((optimizer._momentums, optimizer._velocities), moments):
            layer_moments.append(
                {
                    variable.path.rsplit("/", 1)[-1]: np.array(
                        slots[optimizer._get_variable_index(variable)].numpy(), dtype=np.float32
                    )
                    for variable in layer.trainable_weights
                }
            )
    return tuple(moments[0]), tuple(moments[1]), int(optimizer.iterations.numpy())


def measure_step_by_step(
    name: str, steps: int = 100, batch_size: int = 128, data_dir: Path | None = None, seed: int = 0
) -> Equality:
    """Keras trains `steps` Adam steps; before each, cnnlab takes Keras's state (weights, BatchNormalization's
    moving statistics, Adam's moments and step count) and takes the same step with its own engine. Every
    step's loss and the weights after the last step are compared: the arithmetic of each step, without
    the rounding differences of earlier steps that a free-running comparison (`measure`) compounds."""
    ready = setup(name, steps, batch_size, data_dir, seed)
    spec, images, labels, data, x, y = ready.spec, ready.images, ready.labels, ready.data, ready.x, ready.y
    keras_model, keras_source, names = ready.keras_model, ready.keras_source, ready.names
    keras_model.optimizer.build(keras_model.trainable_variables)  # its moments exist before the first step

    model = build_model(spec)
    parameters = dict(model.named_parameters())
    hardware = Hardware("cpu", cpu_name(), "fp32", compiled=False, channels_last=False, threads=torch.get_num_threads())
    optimizer = make_optimizer(model.parameters(), Recipe())
    step = build_train_step(model, optimizer, hardware, images, labels, batch_size)
    model.train()
    keras_losses, losses, keras_seconds, cnnlab_seconds, initial_difference = [], [], 0.0, 0.0, 0.0
    for i in range(steps):
        before = keras_weights(keras_model)
        m, v, iterations = keras_adam_state(keras_model)
        started = time.perf_counter()
        model.load_state_dict(state_dict_from_keras(spec, before, keras_source), strict=False)
        with torch.no_grad():
            for moments, slot in ((m, "m"), (v, "v")):
                # Moving statistics have no moments: their own values fill the gaps, unused.
                full = tuple({**weights, **layer} for weights, layer in zip(before, moments))
                for key, tensor in state_dict_from_keras(spec, full, keras_source).items():
                    if key in parameters:
                        optimizer.state[parameters[key]][slot].copy_(tensor)
            for state in optimizer.state.values():
                state["step"].fill_(iterations)
        if i == 0:
            initial_difference = max(
                float(np.max(np.abs(ours[key] - theirs[key])))
                for ours, theirs in zip(keras_layer_weights(model), before)
                for key in theirs
            )
        step.reset()
        step(torch.arange(i * batch_size, (i + 1) * batch_size))
        losses.append(float(step.totals[0]) / batch_size)
        cnnlab_seconds += time.perf_counter() - started
        started = time.perf_counter()
        keras_model.reset_metrics()
        keras_losses.append(float(keras_model.train_on_batch(x[i * batch_size : (i + 1) * batch_size],
                                                             y[i * batch_size : (i + 1) * batch_size])))  # fmt: skip
        keras_seconds += time.perf_counter() - started
    return Equality(
        model=name,
        keras_source=keras_source,
        data=data,
        steps=steps,
        batch_size=batch_size,
        keras=Comparison(
            tuple(losses),
            tuple(keras_losses),
            differences(names, keras_layer_weights(model), keras_weights(keras_model)),
        ),
        initial_difference=initial_difference,
        keras_seconds=keras_seconds,
        cnnlab_seconds=cnnlab_seconds,
    )


# ---------------------------------------------------------------------------------------------
# The report


def _run_cells(r: Equality) -> str:
    """The leading cells both tables share: model, data, steps, batch and the worst loss difference."""
    c = r.keras
    return f"| {r.model} | {r.data} | {r.steps} | {r.batch_size} | {c.max_loss_difference:.1e} ({c.worst_step}) "


def _variable_cells(c: Comparison) -> str:
    """The worst variable and the worst BatchNormalization moving statistic against Keras, as two cells."""
    worst, moving = c.worst_variable, c.worst_moving_statistic
    return (
        f"| {worst.relative_l2:.1e} ({worst.layer}/{worst.variable}) "
        f"| {f'{moving.relative_l2:.1e} ({moving.layer}/{moving.variable})' if moving else '(no BN)'} "
    )


def step_by_step_table(results: list[Equality]) -> str:
    """One row per model of `measure_step_by_step`: every step's loss and the final weights against Keras."""
    rows = [
        "| model | data | steps | batch | max relative loss difference (step) | worst final variable, relative L2 "
        "| worst BN moving statistic, relative L2 | within 1e-3 / 1e-2 |",
        "| --- | --- | ---: | ---: | --- | --- | --- | --- |",
    ]
    for r in results:
        rows.append(_run_cells(r) + _variable_cells(r.keras) + f"| {'yes' if not r.failures else 'no'} |")
    return "\n".join(rows)


def markdown_table(results: list[Equality]) -> str:
    """One row per model: the loss differences and the worst variables, against Keras and, where
    measured, cnnlab channels_last against cnnlab NCHW."""
    rows = [
        "| model | data | steps | batch | max relative loss difference (step) | first step >= 1e-3 "
        "| worst variable, relative L2 | worst BN moving statistic, relative L2 "
        "| cnnlab vs itself (channels_last vs NCHW): max loss difference (step), first step >= 1e-3, worst variable "
        "| Keras s | cnnlab s |",
        "| --- | --- | ---: | ---: | --- | ---: | --- | --- | --- | ---: | ---: |",
    ]
    for r in results:
        layout = "(not measured)"
        if r.layout is not None:
            w = r.layout.worst_variable
            layout = (
                f"{r.layout.max_loss_difference:.1e} ({r.layout.worst_step}), {r.layout.first_failing_step or 'none'}, "
                f"{w.relative_l2:.1e} ({w.layer}/{w.variable})"
            )
        rows.append(
            _run_cells(r)
            + f"| {r.keras.first_failing_step or 'none'} "
            + _variable_cells(r.keras)
            + f"| {layout} | {r.keras_seconds:.1f} | {r.cnnlab_seconds:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=100, help="Adam steps (default 100)")
    parser.add_argument("--batch-size", type=int, default=128, help="default 128, the notebook's")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("CNNLAB_DATA_DIR"),
        help="folder with mnist/ (default $CNNLAB_DATA_DIR); without it, synthetic images",
    )
    parser.add_argument(
        "--no-layout-baseline",
        action="store_true",
        help="skip the second cnnlab training (channels_last) that measures cnnlab against itself",
    )
    parser.add_argument("--json", type=Path, help="write every step's losses and every variable's difference here")
    args = parser.parse_args(argv)

    keras = import_keras()
    print(
        f"Keras {keras.__version__} (backend {keras.backend.backend()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {cpu_name()}, Python {platform.python_version()}",
        flush=True,
    )
    results, stepwise = [], []
    for name in args.models:
        forced = measure_step_by_step(name, args.steps, args.batch_size, args.data_dir)
        stepwise.append(forced)
        print(f"{name} step by step: " + ("; ".join(forced.failures) or "within the tolerances"), flush=True)
        result = measure(name, args.steps, args.batch_size, args.data_dir, layout_baseline=not args.no_layout_baseline)
        results.append(result)
        print(
            f"{name} ({result.data}, Keras model from {result.keras_source}; Keras {result.keras_seconds:.1f} s, "
            f"cnnlab {result.cnnlab_seconds:.1f} s): " + ("; ".join(result.failures) or "within the tolerances"),
            flush=True,
        )
        if result.layout is not None:
            print(f"  cnnlab channels_last vs NCHW: {'; '.join(result.layout.failures) or 'within the tolerances'}")
    print("\nStep by step (each cnnlab step from Keras's state):\n")
    print(step_by_step_table(stepwise))
    print("\nFree-running (each side from its own previous step):\n")
    print(markdown_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.json.with_suffix(".tmp")
        document = {
            "keras": keras.__version__,
            "torch": torch.__version__,
            "command": " ".join(sys.argv),
            "step_by_step": [r.to_dict() for r in stepwise],
            "results": [r.to_dict() for r in results],
        }
        temporary.write_text(json.dumps(document, indent=1))
        temporary.replace(args.json)
    return 0 if all(not r.failures for r in stepwise) else 1


if __name__ == "__main__":
    sys.exit(main())
