"""Training and evaluation: a recipe, with the data on the device and no per-step host sync.

Keras's metric semantics are kept: an epoch's training loss and accuracy are running means over
its batches (weighted by batch size) with dropout active; validation runs in eval mode after
every epoch. Randomness (initial weights, shuffling, dropout) flows from the one seed, so the same
seed gives the same history on the CPU, and a unit resumed from a checkpoint continues the same
random streams.

The recipe's `keras_numerics` picks whose numerics train: Keras 3's (the default) or Keras 2.2.4's,
the notebook's (its batch normalisation in `models.KerasBatchNorm`, its loss in
`categorical_cross_entropy`, its RMSprop in `optim.KerasRMSprop`), the latter checked against
formulas from Keras 2.2.4's source (it cannot be installed here).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from cnnlab.augment import augment
from cnnlab.callbacks import BestTracker, EarlyStopper, PlateauScheduler
from cnnlab.config import DataSelection, Hardware, Recipe
from cnnlab.datasets import Dataset
from cnnlab.errors import ConfigError
from cnnlab.models import SequentialNet, build_model, load_weights
from cnnlab.optim import KerasOptimizer, learning_rate, make_optimizer, mark_static_addresses, set_learning_rate
from cnnlab.options import Augmentation, ReduceLROnPlateau
from cnnlab.results import EpochRecord
from cnnlab.schedules import learning_rate_at
from cnnlab.spec import ModelSpec

# ---------------------------------------------------------------------------------------------
# Data on the device


@dataclass(frozen=True)
class Splits:
    """One unit's tensors on the device: images uint8 (N, H, W[, C]), labels int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    val_is_test: bool


class DeviceData:
    """A run's data, limited as its `DataSelection` says and moved to the device once for all units.

    With a validation split, the held-out images are drawn once per run from the selection's split
    seed, stratified by class, so every arm and seed validates on the same images (run folders of
    cnnlab 0.1 keep their split: a random draw from each unit's seed)."""

    def __init__(self, dataset: Dataset, selection: DataSelection, device: torch.device) -> None:
        train_images, train_labels = dataset.train_images, dataset.train_labels
        test_images, test_labels = dataset.test_images, dataset.test_labels
        if selection.limit_train is not None:
            train_images, train_labels = train_images[: selection.limit_train], train_labels[: selection.limit_train]
        if selection.limit_test is not None:
            test_images, test_labels = test_images[: selection.limit_test], test_labels[: selection.limit_test]
        if len(train_images) == 0 or len(test_images) == 0:
            raise ConfigError("no training or test images left after the limits")
        self.selection = selection
        self.validation_count = 0
        if selection.val_split > 0:
            self.validation_count = int(round(len(train_images) * selection.val_split))
            if self.validation_count < 1 or self.validation_count >= len(train_images):
                raise ConfigError(
                    f"--val-split {selection.val_split} leaves {self.validation_count} of "
                    f"{len(train_images)} training images for validation; choose a fraction "
                    "that keeps both sides non-empty"
                )
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        self.train_images, self.train_labels = move(train_images), move(train_labels.long())
        self.test_images, self.test_labels = move(test_images), move(test_labels.long())
        self.shared_split: Splits | None = None
        if self.validation_count and selection.split == "stratified":
            val_index, train_index = stratified_split(train_labels.long(), self.validation_count, selection.split_seed)
            self.shared_split = self._split(move(val_index), move(train_index))

    def _split(self, val_index: torch.Tensor, train_index: torch.Tensor) -> Splits:
        return Splits(
            self.train_images[train_index],
            self.train_labels[train_index],
            self.train_images[val_index],
            self.train_labels[val_index],
            self.test_images,
            self.test_labels,
            val_is_test=False,
        )

    def splits(self, seed: int) -> Splits:
        """The unit's splits: validation on the run's held-out images, or on the test split without one."""
        if not self.validation_count:
            return Splits(
                self.train_images,
                self.train_labels,
                self.test_images,
                self.test_labels,
                self.test_images,
                self.test_labels,
                val_is_test=True,
            )
        if self.shared_split is not None:
            return self.shared_split
        order = torch.randperm(len(self.train_images), generator=torch.Generator().manual_seed(seed))
        order = order.to(self.train_images.device)
        return self._split(order[: self.validation_count], order[self.validation_count :])


def stratified_split(labels: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` indices held out with every class in proportion (largest remainders settle the
    rounding), drawn from `seed`; returns (held-out, kept), each in ascending order."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    classes, sizes = labels.unique(return_counts=True)
    quotas = sizes.double() * count / len(labels)
    taken = quotas.floor().long()
    remainders = quotas - taken
    extra = count - int(taken.sum())
    taken[remainders.argsort(descending=True, stable=True)[:extra]] += 1
    held_out = []
    shuffled = labels[order]
    for label, quota in zip(classes.tolist(), taken.tolist()):
        held_out.append(order[shuffled == label][:quota])
    val_index = torch.cat(held_out).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_index] = False
    return val_index, keep.nonzero().flatten()


def to_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> float (N, C, H, W) in [0, 1], the notebook's `x / 255`."""
    x = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _autocast(hardware: Hardware):
    if hardware.precision == "bf16":
        return torch.autocast(device_type=torch.device(hardware.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Models


def new_model(spec: ModelSpec, seed: int | None, hardware: Hardware, numerics: int = 3) -> SequentialNet:
    """The spec's network with Keras's initialisation (seeded) and Keras `numerics` (2: Keras 2.2.4,
    3: Keras 3), on the device in its memory layout."""
    model = build_model(
        spec,
        seed=seed,
        numerics=numerics,
        small_convs_as_matmul=hardware.small_convs_as_matmul,
        compact_dropout_masks=hardware.compact_dropout_masks,
        padded_small_convs_as_matmul=hardware.padded_small_convs_as_matmul,
    )
    model = model.to(torch.device(hardware.device))
    return model.to(memory_format=torch.channels_last) if hardware.channels_last else model


# ---------------------------------------------------------------------------------------------
# The loss

KERAS2_EPSILON = 1e-7  # keras/backend/common.py's _EPSILON, K.epsilon()


def categorical_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, numerics: int = 3, reduction: str = "mean"
) -> torch.Tensor:
    """Keras's categorical cross-entropy of a softmax output, from the logits before it.

    Keras 3 (`numerics` 3) on TensorFlow computes it from the logits (as `F.cross_entropy`). Keras
    2.2.4 (2) computes it from the probabilities (keras/backend/tensorflow_backend.py
    `categorical_crossentropy`, from_logits=False): `p /= sum(p)`, p clipped to [1e-7, 1 - 1e-7],
    `-sum(target * log(p))`. So a sample whose true class has p > 1 - 1e-7 (or p < 1e-7) gives a
    constant loss and no gradient. Checked against that formula (Keras 2.2.4 cannot be installed here)."""
    if numerics == 3:
        return F.cross_entropy(logits, labels, reduction=reduction)
    probabilities = logits.softmax(dim=1)
    probabilities = probabilities / probabilities.sum(dim=1, keepdim=True)
    picked = probabilities.gather(1, labels.unsqueeze(1)).squeeze(1)
    losses = -picked.clamp(KERAS2_EPSILON, 1 - KERAS2_EPSILON).log()
    return losses.sum() if reduction == "sum" else losses.mean()


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class Evaluation:
    """Loss and accuracy of a model on a split, with each sample's prediction and its confidence."""

    loss: float
    accuracy: float
    predictions: torch.Tensor = field(repr=False)
    confidences: torch.Tensor = field(repr=False)


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    hardware: Hardware,
    batch_size: int = 1000,
    numerics: int = 3,
) -> Evaluation:
    """Mean loss (Keras `numerics`' cross-entropy) and accuracy in eval mode, in large batches; one
    host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    predictions, confidences = [], []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size], hardware.channels_last)
        y = labels[start : start + batch_size]
        with _autocast(hardware):
            logits = model(x)
        logits = logits.float()
        loss_sum += categorical_cross_entropy(logits, y, numerics, reduction="sum")
        confidence, predicted = logits.softmax(dim=1).max(dim=1)
        predictions.append(predicted)
        confidences.append(confidence)
    model.train(was_training)
    predicted = torch.cat(predictions)
    accuracy = (predicted == labels).float().mean()
    return Evaluation(
        loss=(loss_sum / len(images)).item(),
        accuracy=accuracy.item(),
        predictions=predicted.cpu(),
        confidences=torch.cat(confidences).cpu(),
    )


# ---------------------------------------------------------------------------------------------
# The training step


class TrainStep:
    """One optimisation step on the batch `images[index]`; the batch's summed loss and number
    correct accumulate in `totals` on the device, so nothing waits for the host."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: KerasOptimizer,
        hardware: Hardware,
        images: torch.Tensor,
        labels: torch.Tensor,
        compile_mode: str = "default",
        augmentation: Augmentation | None = None,
        numerics: int = 3,
    ) -> None:
        self.optimizer, self.hardware, self.images, self.labels = optimizer, hardware, images, labels
        self.compile_mode, self.augmentation, self.numerics = compile_mode, augmentation, numerics
        self.totals = torch.zeros(2, device=images.device)  # [sum of losses, number correct]
        self.forward, self.optimizer_step = model, optimizer.step
        if hardware.compiled:
            mark_static_addresses(optimizer)
            # Static shapes: the full batch and the epoch's last partial batch get a graph each.
            self.forward = torch.compile(model, mode=compile_mode, dynamic=False)
            if not hardware.cuda_graph:  # inside a CUDA graph the foreach update costs no launches
                self.optimizer_step = torch.compile(optimizer.step, mode=compile_mode, dynamic=False)

    def reset(self) -> None:
        """Zero the running totals (start of an epoch)."""
        self.totals.zero_()

    def __call__(self, index: torch.Tensor) -> None:
        self.run(index)

    def run(self, index: torch.Tensor) -> None:
        """The step itself: forward, loss, metrics, backward, update."""
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
        x = to_input(self.images[index], self.hardware.channels_last)
        if self.augmentation is not None:
            x = augment(x, self.augmentation)  # random draws from the unit's forked generator
        y = self.labels[index]
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.hardware):
            logits = self.forward(x)
        logits = logits.float()
        loss = categorical_cross_entropy(logits, y, self.numerics)
        # Read what we need from the forward's outputs before other graphs run and may reuse them.
        self.totals[0] += loss.detach() * len(y)
        self.totals[1] += (logits.detach().argmax(dim=1) == y).sum()
        loss.backward()
        self.optimizer_step()


class GraphedTrainStep(TrainStep):
    """The whole training step of a full batch (gather, forward, loss, metrics, backward, Adam)
    captured once as a CUDA graph and replayed: a step then costs one copy and one launch.

    Capturing needs a few warm-up steps; they run on a snapshot that is then restored (weights,
    optimizer state, random state, totals), so the training itself is unchanged.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: KerasOptimizer,
        hardware: Hardware,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        compile_mode: str = "default",
        augmentation: Augmentation | None = None,
        numerics: int = 3,
    ) -> None:
        super().__init__(model, optimizer, hardware, images, labels, compile_mode, augmentation, numerics)
        self.model = model
        self.static_index = torch.zeros(batch_size, dtype=torch.long, device=images.device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, index: torch.Tensor) -> None:
        if len(index) != len(self.static_index):
            self.run(index)  # the epoch's partial last batch
            return
        self.static_index.copy_(index)
        if self.graph is None:
            self._capture()
        self.graph.replay()

    def _snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tensors = list(self.model.state_dict().values()) + [self.totals]
        tensors += [t for state in self.optimizer.state.values() for t in state.values()]
        return [(t, t.detach().clone()) for t in tensors]

    def _capture(self) -> None:
        snapshot, rng = self._snapshot(), torch.cuda.get_rng_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compile, autotune and allocate outside the capture
                self.run(self.static_index)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for tensor, saved in snapshot:
                tensor.copy_(saved)
        torch.cuda.set_rng_state(rng)
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.run(self.static_index)


def build_train_step(
    model: torch.nn.Module,
    optimizer: KerasOptimizer,
    hardware: Hardware,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    compile_mode: str = "default",
    augmentation: Augmentation | None = None,
    numerics: int = 3,
) -> TrainStep:
    """The training step `hardware` asks for: captured as a CUDA graph, compiled, or eager; with
    `augmentation`, each batch is augmented on the device first; the loss of Keras `numerics`.

    `compile_mode` is torch.compile's mode when compiled (benchmarks compare modes with it).
    """
    if hardware.cuda_graph:
        return GraphedTrainStep(
            model, optimizer, hardware, images, labels, batch_size, compile_mode, augmentation, numerics
        )
    return TrainStep(model, optimizer, hardware, images, labels, compile_mode, augmentation, numerics)


# ---------------------------------------------------------------------------------------------
# Training


class Reporter(Protocol):
    """Receives training progress (`progress.py` draws it); each method may do nothing."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...
    def update(self, step: int, samples: int, loss: float, accuracy: float) -> None: ...
    def end_epoch(self, record: EpochRecord) -> None: ...
    def note(self, text: str) -> None: ...


class SilentReporter:
    """A reporter that shows nothing."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def update(self, step: int, samples: int, loss: float, accuracy: float) -> None:
        pass

    def end_epoch(self, record: EpochRecord) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class Checkpoint(Protocol):
    """Where a unit's training state goes after every epoch (the run folder keeps it atomically)."""

    def load(self) -> dict[str, Any] | None: ...
    def save(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    """A finished unit: its history, its test evaluation and the trained model, and what the
    epoch-end options decided (the best epoch's weights, an early stop and its reason)."""

    history: list[EpochRecord]
    test: Evaluation
    model: SequentialNet = field(repr=False)
    best_epoch: int | None = None  # 1-based, with a best checkpoint
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    stopped_epoch: int | None = None  # 1-based: the last epoch trained, when early stopping ended training
    stop_reason: str | None = None
    restored_epoch: int | None = None  # 1-based: the epoch whose weights early stopping restored
    untrained_validation: Evaluation | None = field(default=None, repr=False)  # 0 epochs: the weights as given

    @property
    def wall_seconds(self) -> float:
        """Training and validation time over all epochs (compilation included where it happens)."""
        return sum(r.train_seconds + r.val_seconds for r in self.history)


class EpochEnd:
    """The recipe's epoch-end options, as Keras's callbacks: a plateau schedule, early stopping and
    the best checkpoint, each deciding from the epoch's metrics; their state goes into checkpoints."""

    def __init__(self, recipe: Recipe) -> None:
        plateau = recipe.schedule if isinstance(recipe.schedule, ReduceLROnPlateau) else None
        self.plateau = PlateauScheduler(plateau) if plateau else None
        self.stopper = EarlyStopper(recipe.early_stopping) if recipe.early_stopping else None
        self.best = BestTracker(recipe.best_checkpoint) if recipe.best_checkpoint else None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.stopped = False

    def __call__(self, epoch: int, record: EpochRecord, model: torch.nn.Module, optimizer) -> None:
        """After epoch `epoch` (1-based): update the learning rate, the best weights, the stop flag."""
        logs = {"loss": record.loss, "accuracy": record.accuracy, "val_loss": record.val_loss,
                "val_accuracy": record.val_accuracy}  # fmt: skip
        if self.plateau is not None:
            set_learning_rate(optimizer, self.plateau.on_epoch_end(epoch - 1, logs, learning_rate(optimizer)))
        if self.best is not None and self.best.on_epoch_end(epoch - 1, logs):
            self.best_weights = _copy(model.state_dict())
        if self.stopper is not None:
            self.stopped = self.stopper.on_epoch_end(epoch - 1, logs, lambda: _copy(model.state_dict()))

    def state_dict(self) -> dict[str, Any]:
        return {
            "plateau": self.plateau.state_dict() if self.plateau else None,
            "stopper": self.stopper.state_dict() if self.stopper else None,
            "best": self.best.state_dict() if self.best else None,
            "best_weights": self.best_weights,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("plateau", "stopper", "best"):
            part = getattr(self, name)
            if part is not None:
                part.load_state_dict(state[name])
        self.best_weights, self.stopped = state["best_weights"], state["stopped"]


def _copy(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in weights.items()}


@dataclass
class TrainJob:
    """One unit's arguments to `train`, for `train_together`."""

    spec: ModelSpec
    recipe: Recipe
    seed: int
    splits: Splits
    reporter: Reporter | None = None
    checkpoint: Checkpoint | None = None
    initial_weights: dict[str, torch.Tensor] | None = None


def train(
    spec: ModelSpec,
    recipe: Recipe,
    seed: int,
    splits: Splits,
    hardware: Hardware,
    *,
    reporter: Reporter | None = None,
    checkpoint: Checkpoint | None = None,
    build: Callable[[ModelSpec, int, Hardware], torch.nn.Module] | None = None,
    compile_mode: str = "default",
    initial_weights: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train `spec` with `recipe` from `seed` (or from the checkpoint's last epoch) and test it, with
    the recipe's Keras numerics (`keras_numerics`: the network, the loss and the optimizer).

    `initial_weights` (a state dict, `--init-from`) replace the seed's initial weights; the seed still
    draws the data order, dropout and augmentation. With `recipe.epochs == 0` the weights are only
    validated and tested. `build(spec, seed, hardware)` makes the network instead of `new_model` and
    `compile_mode` is torch.compile's mode when compiled: benchmarks compare reference networks and
    modes with them."""
    job = TrainJob(spec, recipe, seed, splits, reporter, checkpoint, initial_weights)
    with _forked_rng(torch.device(hardware.device)):
        return _run_to_end(_training(job, hardware, build, compile_mode))


def _run_to_end(training: Generator[None, None, TrainResult]) -> TrainResult:
    while True:
        try:
            next(training)
        except StopIteration as finished:
            return finished.value


def _training(
    job: TrainJob,
    hardware: Hardware,
    build: Callable[[ModelSpec, int, Hardware], torch.nn.Module] | None = None,
    compile_mode: str = "default",
) -> Generator[None, None, TrainResult]:
    """`train`'s body, pausing after every training step (`train_together` takes turns between units);
    its caller forks the random state."""
    spec, recipe, seed, splits, checkpoint = job.spec, job.recipe, job.seed, job.splits, job.checkpoint
    device = torch.device(hardware.device)
    reporter = job.reporter or SilentReporter()
    initial_weights = job.initial_weights
    torch.manual_seed(seed)  # dropout and augmentation draw from PyTorch's generator, forked for the unit
    numerics = recipe.keras_numerics  # Keras 3's or Keras 2.2.4's: the model, its loss and its optimizer
    model = build(spec, seed, hardware) if build else new_model(spec, seed, hardware, numerics=numerics)
    if initial_weights is not None:  # drawn first all the same, so the seed's random streams are unchanged
        load_weights(model, {k: v.to(device) for k, v in initial_weights.items()})
    optimizer = make_optimizer(model.parameters(), recipe)  # made after the move to the device
    shuffle = torch.Generator().manual_seed(seed + 1)
    epoch_end = EpochEnd(recipe)
    state = checkpoint.load() if checkpoint is not None else None
    history = _restore(state, model, optimizer, shuffle, epoch_end, device) if state else []
    step = build_train_step(
        model, optimizer, hardware, splits.train_images, splits.train_labels, recipe.batch_size, compile_mode,
        recipe.augmentation, numerics,
    )  # fmt: skip
    validation: Evaluation | None = None
    for epoch in range(len(history) + 1, recipe.epochs + 1):
        if epoch_end.stopped:
            break
        train_seconds = yield from _train_epoch(step, model, shuffle, recipe, epoch, reporter, optimizer)
        started = time.perf_counter()
        validation = evaluate(model, splits.val_images, splits.val_labels, hardware, recipe.eval_batch_size, numerics)
        loss_sum, correct = step.totals.tolist()
        n_train = len(splits.train_images)
        record = EpochRecord(
            epoch, loss_sum / n_train, correct / n_train, validation.loss, validation.accuracy, train_seconds,
            time.perf_counter() - started, n_train / train_seconds, learning_rate(optimizer),
        )  # fmt: skip
        history.append(record)
        reporter.end_epoch(record)
        if not math.isfinite(record.loss):  # a failed unit, recorded as such; the run goes on
            raise FloatingPointError(f"training diverged: the loss is {record.loss} in epoch {epoch}")
        epoch_end(epoch, record, model, optimizer)
        if checkpoint is not None:
            checkpoint.save(_state(model, optimizer, history, shuffle, epoch_end, device))
    result = TrainResult(history, validation, model)  # the test evaluation is set below
    if recipe.epochs == 0:
        validation = evaluate(model, splits.val_images, splits.val_labels, hardware, recipe.eval_batch_size, numerics)
        result.untrained_validation = validation
    if epoch_end.stopper is not None:
        if epoch_end.stopped:
            result.stopped_epoch, result.stop_reason = len(history), epoch_end.stopper.reason()
            reporter.note(f"early stopping after epoch {len(history)}: {result.stop_reason}")
        restored = epoch_end.stopper.restore()
        # Keras 3 restores the best weights at the end of training; Keras 2.2.4's EarlyStopping
        # (keras/callbacks.py) only when it stops training early.
        if restored is not None and (numerics == 3 or epoch_end.stopped):
            model.load_state_dict(restored)
            result.restored_epoch, validation = epoch_end.stopper.best_epoch + 1, None
    if epoch_end.best is not None and epoch_end.best.best_epoch is not None:
        result.best_epoch, result.best_weights = epoch_end.best.best_epoch + 1, epoch_end.best_weights
    if splits.val_is_test and validation is not None:
        result.test = validation  # validated on the test split: its last validation is the test score
    else:
        result.test = evaluate(
            model, splits.test_images, splits.test_labels, hardware, recipe.eval_batch_size, numerics
        )
    return result


class _Turn:
    """A job in progress in `train_together`: its paused training, its random state, its CUDA stream."""

    def __init__(self, job: TrainJob, hardware: Hardware, device: torch.device) -> None:
        self.training = _training(job, hardware)
        self.device, self.outcome = device, None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(device))  # the data was made on the default stream
        self.random_state = _random_state(device)

    def take(self) -> bool:
        """One step of this job with its own random state, on its own stream; False once it has ended."""
        _set_random_state(self.device, self.random_state)
        try:
            with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                next(self.training)
        except StopIteration as finished:
            self.outcome = finished.value
        except Exception as exc:  # noqa: BLE001 - this job's failure; the others go on
            self.outcome = exc
        self.random_state = _random_state(self.device)
        return self.outcome is None


def train_together(jobs: Sequence[TrainJob], hardware: Hardware) -> list[TrainResult | Exception]:
    """Train several units at once, taking turns step by step; on CUDA each on its own stream, so
    that the GPU overlaps their small kernels (BENCHMARKS.md, "GPU round two", goal 1).

    Each job keeps its own random streams (the global generators are switched at every turn), so
    its result is the one `train` gives it alone. A job that raises is returned as its exception
    while the others go on; Ctrl-C stops them all."""
    device = torch.device(hardware.device)
    with _forked_rng(device):
        turns = [_Turn(job, hardware, device) for job in jobs]
        running = list(turns)
        while running:
            running = [turn for turn in running if turn.take()]
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the results were made on the jobs' streams
    return [turn.outcome for turn in turns]


def _random_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_random_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _train_epoch(
    step: TrainStep,
    model: torch.nn.Module,
    shuffle: torch.Generator,
    recipe: Recipe,
    epoch: int,
    reporter: Reporter,
    optimizer: KerasOptimizer,
) -> Generator[None, None, float]:
    """One pass over the shuffled training images, pausing after each step; returns its seconds
    (the device's current stream synchronised).

    A step-wise schedule sets each step's learning rate from the number of steps before it, as
    Keras evaluates its schedule at the optimizer's iteration count."""
    model.train()
    n_train = len(step.images)
    steps = math.ceil(n_train / recipe.batch_size)
    reporter.start_epoch(epoch, recipe.epochs, steps)
    device = step.images.device
    order = torch.randperm(n_train, generator=shuffle).to(device)
    step.reset()
    stepwise = recipe.schedule if not isinstance(recipe.schedule, ReduceLROnPlateau) else None
    started = last_report = time.perf_counter()
    for i in range(steps):
        if stepwise is not None:
            set_learning_rate(optimizer, learning_rate_at(stepwise, recipe.learning_rate, (epoch - 1) * steps + i))
        step(order[i * recipe.batch_size : (i + 1) * recipe.batch_size])
        now = time.perf_counter()
        if now - last_report > 0.5 or i == steps - 1:  # a host sync at most twice a second
            seen = min((i + 1) * recipe.batch_size, n_train)
            loss_sum, correct = step.totals.tolist()
            reporter.update(i + 1, seen, loss_sum / seen, correct / seen)
            last_report = now
        yield
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # this unit's stream: others may still be running
    return time.perf_counter() - started


def _forked_rng(device: torch.device):
    """Training leaves the caller's random state untouched: the seed alone decides the unit."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu")


def _state(
    model: torch.nn.Module,
    optimizer: KerasOptimizer,
    history: list[EpochRecord],
    shuffle: torch.Generator,
    epoch_end: EpochEnd,
    device: torch.device,
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "learning_rate": learning_rate(optimizer),
        "epoch_end": epoch_end.state_dict(),
        "history": [asdict(r) for r in history],
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "shuffle_rng": shuffle.get_state(),
    }


class CheckpointMismatch(ValueError):
    """A checkpoint that does not belong to this unit's model, optimizer or random streams."""


def _restore(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: KerasOptimizer,
    shuffle: torch.Generator,
    epoch_end: EpochEnd,
    device: torch.device,
) -> list[EpochRecord]:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "learning_rate" in state:  # checkpoints of cnnlab 0.1 have neither
            set_learning_rate(optimizer, state["learning_rate"])
            epoch_end.load_state_dict(state["epoch_end"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        shuffle.set_state(state["shuffle_rng"].cpu())
        return [EpochRecord(**r) for r in state["history"]]
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointMismatch(str(exc)) from exc
