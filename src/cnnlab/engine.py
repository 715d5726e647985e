"""Training and evaluation: the seed's recipe, with the data on the device and no per-step host sync.

Keras's metric semantics are kept: an epoch's training loss and accuracy are running means over
its batches (weighted by batch size) with dropout active; validation runs in eval mode after
every epoch. Randomness (initial weights, shuffling, dropout) flows from the one seed, so the same
seed gives the same history on the CPU, and a run resumed from a checkpoint continues the same
random streams.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from cnnlab.errors import ConfigError
from cnnlab.models import SequentialNet, build_model
from cnnlab.optim import KerasAdam
from cnnlab.spec import ModelSpec


@dataclass
class TrainConfig:
    """How to train: the seed notebook's recipe by default."""

    epochs: int = 12
    batch_size: int = 128
    learning_rate: float = 1e-3
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7          # Keras's Adam epsilon (PyTorch's default is 1e-8)
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    precision: str = "auto"        # auto | fp32 | bf16
    compile: str = "auto"          # auto | on | off
    eval_batch_size: int = 1000
    limit_train: int | None = None
    limit_test: int | None = None
    val_split: float = 0.0         # > 0: validate on this fraction of the training split, not the test split

    def validate(self) -> None:
        """Raise ConfigError for impossible settings."""
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.learning_rate > 0, "--lr must be positive"),
            (0 <= self.val_split < 1, "--val-split must be in [0, 1), e.g. 0.1"),
            (self.precision in ("auto", "fp32", "bf16"), "--precision must be auto, fp32 or bf16"),
            (self.compile in ("auto", "on", "off"), "--compile must be auto, on or off"),
            (self.limit_train is None or self.limit_train >= 1, "--limit-train must be at least 1"),
            (self.limit_test is None or self.limit_test >= 1, "--limit-test must be at least 1"),
            (self.eval_batch_size >= 1, "eval batch size must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class Hardware:
    """What the run resolved `auto` to, recorded in the run folder."""

    device: str
    device_name: str
    precision: str
    compiled: bool
    channels_last: bool
    threads: int
    compile_mode: str = "default"  # torch.compile mode when compiled
    cuda_graph: bool = False       # capture each full-batch training step as one CUDA graph
    cudnn_benchmark: bool = False  # let cuDNN time its algorithms for each shape (CUDA; not yet measured)


@dataclass
class EpochRecord:
    """One row of a model's history, in Keras's names."""

    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    train_seconds: float
    val_seconds: float
    samples_per_second: float


@dataclass
class Splits:
    """Tensors on the device: images uint8 (N, 28, 28), labels int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    val_is_test: bool


@dataclass
class Evaluation:
    """Loss and accuracy of a model on a split, with each sample's prediction and its confidence."""

    loss: float
    accuracy: float
    predictions: torch.Tensor = field(repr=False)
    confidences: torch.Tensor = field(repr=False)


@dataclass
class TrainResult:
    """A finished training run."""

    history: list[EpochRecord]
    test: Evaluation
    hardware: Hardware
    model: SequentialNet = field(repr=False)

    @property
    def wall_seconds(self) -> float:
        """Training and validation time over all epochs (compilation included where it happens)."""
        return sum(r.train_seconds + r.val_seconds for r in self.history)


class Reporter(Protocol):
    """Receives training progress (`progress.py` draws it); each method may do nothing."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...
    def update(self, step: int, samples: int, loss: float, accuracy: float) -> None: ...
    def end_epoch(self, record: EpochRecord) -> None: ...


class _SilentReporter:
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def update(self, step: int, samples: int, loss: float, accuracy: float) -> None:
        pass

    def end_epoch(self, record: EpochRecord) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Resolving `auto`


def resolve_device(requested: str) -> torch.device:
    """'auto' picks CUDA when available; asking for CUDA without it is a user error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: no CUDA GPU is available to PyTorch here "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        return torch.device(requested)
    if requested == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got '{requested}'")


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_hardware(config: TrainConfig) -> Hardware:
    """Turn the config's `auto` choices into concrete ones for this machine."""
    device = resolve_device(config.device)
    on_cuda = device.type == "cuda"
    if config.precision == "auto":
        fast_bf16 = torch.cuda.is_bf16_supported() if on_cuda else cpu_has_fast_bf16()
        precision = "bf16" if fast_bf16 else "fp32"
    else:
        precision = config.precision
    # Benchmarks (BENCHMARKS.md): compilation pays for itself on a GPU; on the CPU it is opt-in.
    compiled = config.compile == "on" or (config.compile == "auto" and on_cuda)
    name = torch.cuda.get_device_name(device) if on_cuda else _cpu_name()
    # channels_last (NHWC, Keras's own layout) on both: on the GPU it feeds the tensor cores; on the
    # CPU oneDNN's NHWC convolutions made convnet7's step 1.22x faster and the others +-4% (measured).
    return Hardware(str(device), name, precision, compiled, channels_last=True,
                    threads=torch.get_num_threads(), compile_mode="default", cuda_graph=compiled and on_cuda)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Data


def make_splits(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                test_labels: torch.Tensor, config: TrainConfig, device: torch.device, seed: int) -> Splits:
    """Apply --limit-train/--limit-test/--val-split and move everything to the device once."""
    if config.limit_train is not None:
        train_images, train_labels = train_images[: config.limit_train], train_labels[: config.limit_train]
    if config.limit_test is not None:
        test_images, test_labels = test_images[: config.limit_test], test_labels[: config.limit_test]
    val_images, val_labels, val_is_test = test_images, test_labels, True
    if config.val_split > 0:
        n_val = int(round(len(train_images) * config.val_split))
        if n_val < 1 or n_val >= len(train_images):
            raise ConfigError(f"--val-split {config.val_split} leaves {n_val} of {len(train_images)} "
                              "training images for validation; choose a fraction that keeps both sides non-empty")
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
        val_index, train_index = order[:n_val], order[n_val:]
        val_images, val_labels = train_images[val_index], train_labels[val_index]
        train_images, train_labels = train_images[train_index], train_labels[train_index]
        val_is_test = False
    if len(train_images) == 0 or len(test_images) == 0:
        raise ConfigError("no training or test images left after the limits")
    move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return Splits(move(train_images), move(train_labels.long()), move(val_images), move(val_labels.long()),
                  move(test_images), move(test_labels.long()), val_is_test)


def _to_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> float (N, C, H, W) in [0, 1], the seed's `x / 255`."""
    x = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _autocast(hardware: Hardware):
    if hardware.precision == "bf16":
        return torch.autocast(device_type=torch.device(hardware.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, hardware: Hardware,
             batch_size: int = 1000) -> Evaluation:
    """Mean loss and accuracy in eval mode, in large batches; one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    predictions, confidences = [], []
    for start in range(0, len(images), batch_size):
        x = _to_input(images[start:start + batch_size], hardware.channels_last)
        y = labels[start:start + batch_size]
        with _autocast(hardware):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        probabilities = logits.softmax(dim=1)
        confidence, predicted = probabilities.max(dim=1)
        predictions.append(predicted)
        confidences.append(confidence)
    model.train(was_training)
    predicted = torch.cat(predictions)
    accuracy = (predicted == labels).float().mean()
    return Evaluation(loss=(loss_sum / len(images)).item(), accuracy=accuracy.item(),
                      predictions=predicted.cpu(), confidences=torch.cat(confidences).cpu())


# ---------------------------------------------------------------------------------------------
# Training


class TrainStep:
    """One optimisation step on the batch `images[index]`; the batch's summed loss and number
    correct accumulate in `totals` on the device, so nothing waits for the host."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, hardware: Hardware,
                 images: torch.Tensor, labels: torch.Tensor) -> None:
        self.optimizer, self.hardware, self.images, self.labels = optimizer, hardware, images, labels
        self.totals = torch.zeros(2, device=images.device)  # [sum of losses, number correct]
        self.forward, self.optimizer_step = model, optimizer.step
        if hardware.compiled:
            # Static shapes: the full batch and the epoch's last partial batch get a graph each.
            self.forward = torch.compile(model, mode=hardware.compile_mode, dynamic=False)
            if not hardware.cuda_graph:  # inside a CUDA graph the foreach update costs no launches
                self.optimizer_step = torch.compile(optimizer.step, mode=hardware.compile_mode, dynamic=False)

    def reset(self) -> None:
        """Zero the running totals (start of an epoch)."""
        self.totals.zero_()

    def __call__(self, index: torch.Tensor) -> None:
        self.run(index)

    def run(self, index: torch.Tensor) -> None:
        """The step itself: forward, loss, metrics, backward, update."""
        if self.hardware.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
        x = _to_input(self.images[index], self.hardware.channels_last)
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

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, hardware: Hardware,
                 images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        super().__init__(model, optimizer, hardware, images, labels)
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


def train(spec: ModelSpec, splits: Splits, config: TrainConfig, seed: int = 0,
          reporter: Reporter | None = None, checkpoint_path: Path | None = None,
          save_checkpoint: Callable[[Path, dict], None] | None = None,
          hardware: Hardware | None = None) -> TrainResult:
    """Train `spec` from scratch (or from `checkpoint_path` if it exists) and evaluate on the test split.

    `save_checkpoint(path, state)` is called after every epoch when given (the run folder writes it
    atomically), so an interrupted run can resume from its last completed epoch. `hardware`
    overrides what `config` resolves to (benchmarks compare settings with it).
    """
    config.validate()
    hardware = hardware or resolve_hardware(config)
    device = torch.device(hardware.device)
    reporter = reporter or _SilentReporter()
    # Dropout draws from PyTorch's global generator: fork it, so training leaves the caller's
    # random state untouched and the seed alone decides the run.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"), \
            _cudnn_benchmark(hardware.cudnn_benchmark and device.type == "cuda"):
        torch.manual_seed(seed)
        model = build_model(spec, seed=seed).to(device)
        if hardware.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = KerasAdam(model.parameters(), lr=config.learning_rate, beta_1=config.beta_1,
                              beta_2=config.beta_2, epsilon=config.epsilon)  # made after .to(device)
        shuffle_generator = torch.Generator().manual_seed(seed + 1)
        history: list[EpochRecord] = []
        if checkpoint_path is not None and checkpoint_path.exists():
            history = _restore(checkpoint_path, model, optimizer, shuffle_generator, device)
        if hardware.cuda_graph:
            step = GraphedTrainStep(model, optimizer, hardware, splits.train_images, splits.train_labels,
                                    config.batch_size)
        else:
            step = TrainStep(model, optimizer, hardware, splits.train_images, splits.train_labels)
        n_train = len(splits.train_images)
        steps = math.ceil(n_train / config.batch_size)
        last_val: Evaluation | None = None
        for epoch in range(len(history) + 1, config.epochs + 1):
            model.train()
            reporter.start_epoch(epoch, config.epochs, steps)
            order = torch.randperm(n_train, generator=shuffle_generator).to(device)
            step.reset()
            started = time.perf_counter()
            last_report = started
            for i in range(steps):
                index = order[i * config.batch_size:(i + 1) * config.batch_size]
                step(index)
                now = time.perf_counter()
                if now - last_report > 0.5 or i == steps - 1:  # a host sync at most twice a second
                    seen = min((i + 1) * config.batch_size, n_train)
                    loss_sum, correct = step.totals.tolist()
                    reporter.update(i + 1, seen, loss_sum / seen, correct / seen)
                    last_report = now
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - started
            started = time.perf_counter()
            last_val = evaluate(model, splits.val_images, splits.val_labels, hardware, config.eval_batch_size)
            loss_sum, correct = step.totals.tolist()
            record = EpochRecord(epoch, loss_sum / n_train, correct / n_train, last_val.loss,
                                 last_val.accuracy, train_seconds, time.perf_counter() - started,
                                 n_train / train_seconds)
            history.append(record)
            reporter.end_epoch(record)
            if save_checkpoint is not None and checkpoint_path is not None:
                save_checkpoint(checkpoint_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "history": [asdict(r) for r in history], "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "shuffle_rng": shuffle_generator.get_state(),
                })
        if splits.val_is_test and last_val is not None:
            test = last_val  # the seed validates on the test split: its last validation is the test score
        else:
            test = evaluate(model, splits.test_images, splits.test_labels, hardware, config.eval_batch_size)
    return TrainResult(history=history, test=test, hardware=hardware, model=model)


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool):
    """cuDNN's algorithm autotuning for one run: the switch is process-wide, so it is restored after."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or previous
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _restore(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             shuffle_generator: torch.Generator, device: torch.device) -> list[EpochRecord]:
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if state.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    shuffle_generator.set_state(state["shuffle_rng"].cpu())
    return [EpochRecord(**r) for r in state["history"]]
