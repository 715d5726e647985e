"""Training and evaluation: a recipe, with the data on the device and no per-step host sync.

Keras's metric semantics are kept: an epoch's training loss and accuracy are running means over
its batches (weighted by batch size) with dropout active; validation runs in eval mode after
every epoch. Randomness (initial weights, shuffling, dropout) flows from the one seed, so the same
seed gives the same history on the CPU, and a unit resumed from a checkpoint continues the same
random streams.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from cnnlab.config import DataSelection, Hardware, Recipe
from cnnlab.datasets import Dataset
from cnnlab.errors import ConfigError
from cnnlab.models import SequentialNet, build_model
from cnnlab.optim import KerasAdam
from cnnlab.results import EpochRecord
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
    """A run's data, limited as its `DataSelection` says and moved to the device once for all units."""

    def __init__(self, dataset: Dataset, selection: DataSelection, device: torch.device) -> None:
        train_images, train_labels = dataset.train_images, dataset.train_labels
        test_images, test_labels = dataset.test_images, dataset.test_labels
        if selection.limit_train is not None:
            train_images, train_labels = train_images[: selection.limit_train], train_labels[: selection.limit_train]
        if selection.limit_test is not None:
            test_images, test_labels = test_images[: selection.limit_test], test_labels[: selection.limit_test]
        if len(train_images) == 0 or len(test_images) == 0:
            raise ConfigError("no training or test images left after the limits")
        self.val_split = selection.val_split
        self.validation_count = 0
        if self.val_split > 0:
            self.validation_count = int(round(len(train_images) * self.val_split))
            if self.validation_count < 1 or self.validation_count >= len(train_images):
                raise ConfigError(
                    f"--val-split {self.val_split} leaves {self.validation_count} of "
                    f"{len(train_images)} training images for validation; choose a fraction "
                    "that keeps both sides non-empty"
                )
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        self.train_images, self.train_labels = move(train_images), move(train_labels.long())
        self.test_images, self.test_labels = move(test_images), move(test_labels.long())

    def splits(self, seed: int) -> Splits:
        """The unit's splits: with a validation split, its held-out images are drawn from the seed."""
        if not self.val_split:
            return Splits(
                self.train_images,
                self.train_labels,
                self.test_images,
                self.test_labels,
                self.test_images,
                self.test_labels,
                val_is_test=True,
            )
        order = torch.randperm(len(self.train_images), generator=torch.Generator().manual_seed(seed))
        order = order.to(self.train_images.device)
        val_index, train_index = order[: self.validation_count], order[self.validation_count :]
        return Splits(
            self.train_images[train_index],
            self.train_labels[train_index],
            self.train_images[val_index],
            self.train_labels[val_index],
            self.test_images,
            self.test_labels,
            val_is_test=False,
        )


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


def new_model(spec: ModelSpec, seed: int | None, hardware: Hardware) -> SequentialNet:
    """The spec's network with Keras's initialisation (seeded), on the device in its memory layout."""
    model = build_model(spec, seed=seed).to(torch.device(hardware.device))
    return model.to(memory_format=torch.channels_last) if hardware.channels_last else model


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
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, hardware: Hardware, batch_size: int = 1000
) -> Evaluation:
    """Mean loss and accuracy in eval mode, in large batches; one host sync at the end."""
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
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
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
        optimizer: torch.optim.Optimizer,
        hardware: Hardware,
        images: torch.Tensor,
        labels: torch.Tensor,
        compile_mode: str = "default",
    ) -> None:
        self.optimizer, self.hardware, self.images, self.labels = optimizer, hardware, images, labels
        self.compile_mode = compile_mode
        self.totals = torch.zeros(2, device=images.device)  # [sum of losses, number correct]
        self.forward, self.optimizer_step = model, optimizer.step
        if hardware.compiled:
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
        y = self.labels[index]
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.hardware):
            logits = self.forward(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y)
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
        optimizer: torch.optim.Optimizer,
        hardware: Hardware,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        compile_mode: str = "default",
    ) -> None:
        super().__init__(model, optimizer, hardware, images, labels, compile_mode)
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
    optimizer: torch.optim.Optimizer,
    hardware: Hardware,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    compile_mode: str = "default",
) -> TrainStep:
    """The training step `hardware` asks for: captured as a CUDA graph, compiled, or eager.

    `compile_mode` is torch.compile's mode when compiled (benchmarks compare modes with it).
    """
    if hardware.cuda_graph:
        return GraphedTrainStep(model, optimizer, hardware, images, labels, batch_size, compile_mode)
    return TrainStep(model, optimizer, hardware, images, labels, compile_mode)


# ---------------------------------------------------------------------------------------------
# Training


class Reporter(Protocol):
    """Receives training progress (`progress.py` draws it); each method may do nothing."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...
    def update(self, step: int, samples: int, loss: float, accuracy: float) -> None: ...
    def end_epoch(self, record: EpochRecord) -> None: ...


class SilentReporter:
    """A reporter that shows nothing."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def update(self, step: int, samples: int, loss: float, accuracy: float) -> None:
        pass

    def end_epoch(self, record: EpochRecord) -> None:
        pass


class Checkpoint(Protocol):
    """Where a unit's training state goes after every epoch (the run folder keeps it atomically)."""

    def load(self) -> dict[str, Any] | None: ...
    def save(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    """A finished unit: its history, its test evaluation and the trained model."""

    history: list[EpochRecord]
    test: Evaluation
    model: SequentialNet = field(repr=False)

    @property
    def wall_seconds(self) -> float:
        """Training and validation time over all epochs (compilation included where it happens)."""
        return sum(r.train_seconds + r.val_seconds for r in self.history)


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
) -> TrainResult:
    """Train `spec` with `recipe` from `seed` (or from the checkpoint's last epoch) and test it.

    `build(spec, seed, hardware)` makes the network instead of `new_model` and `compile_mode` is
    torch.compile's mode when compiled: benchmarks compare reference networks and modes with them."""
    device = torch.device(hardware.device)
    reporter = reporter or SilentReporter()
    with _forked_rng(device):
        torch.manual_seed(seed)  # dropout draws from PyTorch's generator, forked for the unit
        model = (build or new_model)(spec, seed, hardware)
        optimizer = KerasAdam(
            model.parameters(),
            lr=recipe.learning_rate,
            beta_1=recipe.beta_1,
            beta_2=recipe.beta_2,
            epsilon=recipe.epsilon,
        )  # made after the move to the device
        shuffle = torch.Generator().manual_seed(seed + 1)
        state = checkpoint.load() if checkpoint is not None else None
        history = _restore(state, model, optimizer, shuffle, device) if state else []
        step = build_train_step(
            model, optimizer, hardware, splits.train_images, splits.train_labels, recipe.batch_size, compile_mode
        )
        validation: Evaluation | None = None
        for epoch in range(len(history) + 1, recipe.epochs + 1):
            train_seconds = _train_epoch(step, model, shuffle, recipe, epoch, reporter)
            started = time.perf_counter()
            validation = evaluate(model, splits.val_images, splits.val_labels, hardware, recipe.eval_batch_size)
            loss_sum, correct = step.totals.tolist()
            n_train = len(splits.train_images)
            record = EpochRecord(
                epoch,
                loss_sum / n_train,
                correct / n_train,
                validation.loss,
                validation.accuracy,
                train_seconds,
                time.perf_counter() - started,
                n_train / train_seconds,
            )
            history.append(record)
            reporter.end_epoch(record)
            if checkpoint is not None:
                checkpoint.save(_state(model, optimizer, history, shuffle, device))
        if splits.val_is_test and validation is not None:
            test = validation  # validated on the test split: its last validation is the test score
        else:
            test = evaluate(model, splits.test_images, splits.test_labels, hardware, recipe.eval_batch_size)
    return TrainResult(history=history, test=test, model=model)


def _train_epoch(
    step: TrainStep, model: torch.nn.Module, shuffle: torch.Generator, recipe: Recipe, epoch: int, reporter: Reporter
) -> float:
    """One pass over the shuffled training images; returns its seconds (the device synchronised)."""
    model.train()
    n_train = len(step.images)
    steps = math.ceil(n_train / recipe.batch_size)
    reporter.start_epoch(epoch, recipe.epochs, steps)
    device = step.images.device
    order = torch.randperm(n_train, generator=shuffle).to(device)
    step.reset()
    started = last_report = time.perf_counter()
    for i in range(steps):
        step(order[i * recipe.batch_size : (i + 1) * recipe.batch_size])
        now = time.perf_counter()
        if now - last_report > 0.5 or i == steps - 1:  # a host sync at most twice a second
            seen = min((i + 1) * recipe.batch_size, n_train)
            loss_sum, correct = step.totals.tolist()
            reporter.update(i + 1, seen, loss_sum / seen, correct / seen)
            last_report = now
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _forked_rng(device: torch.device):
    """Training leaves the caller's random state untouched: the seed alone decides the unit."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu")


def _state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    history: list[EpochRecord],
    shuffle: torch.Generator,
    device: torch.device,
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
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
    optimizer: torch.optim.Optimizer,
    shuffle: torch.Generator,
    device: torch.device,
) -> list[EpochRecord]:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        shuffle.set_state(state["shuffle_rng"].cpu())
        return [EpochRecord(**r) for r in state["history"]]
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointMismatch(str(exc)) from exc
