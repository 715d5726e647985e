"""`cnnlab.engine.train`'s loop for benchmarks that choose the network or torch.compile's mode.

`engine.train` builds its own model (`new_model`) and compiles in the default mode. bench_gpu.py
compares compile modes and bench_accuracy.py trains a reference network with `nn.Dropout` masks,
so they drive cnnlab's public training step (`engine.build_train_step`) with this loop. It keeps
`train`'s conventions, so that the same seed gives the same initial weights, shuffles and order of
random draws: the caller's random state forked, `torch.manual_seed(seed)` before the network is
built, Keras Adam, a shuffle generator seeded `seed + 1` drawing one permutation per epoch,
running training metrics, validation after every epoch and the test evaluation at the end. It
leaves out what only the CLI needs: progress reports and checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from cnnlab.config import Hardware, Recipe
from cnnlab.engine import Splits, TrainResult, build_train_step, evaluate
from cnnlab.optim import KerasAdam
from cnnlab.results import EpochRecord


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, which runs synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_model(build: Callable[[], torch.nn.Module], recipe: Recipe, seed: int, splits: Splits,
                hardware: Hardware, compile_mode: str = "default") -> TrainResult:
    """Train the network `build()` returns (on the device, in `hardware`'s layout) as `engine.train`
    trains a spec's, with `build_train_step(..., compile_mode=compile_mode)`."""
    device = torch.device(hardware.device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(seed)  # dropout draws from PyTorch's generator, as in engine.train
        model = build()
        optimizer = KerasAdam(model.parameters(), lr=recipe.learning_rate, beta_1=recipe.beta_1,
                              beta_2=recipe.beta_2, epsilon=recipe.epsilon)
        shuffle = torch.Generator().manual_seed(seed + 1)
        step = build_train_step(model, optimizer, hardware, splits.train_images, splits.train_labels,
                                recipe.batch_size, compile_mode=compile_mode)
        n_train, history, validation = len(splits.train_images), [], None
        for epoch in range(1, recipe.epochs + 1):
            model.train()
            order = torch.randperm(n_train, generator=shuffle).to(device)
            step.reset()
            started = time.perf_counter()
            for start in range(0, n_train, recipe.batch_size):
                step(order[start:start + recipe.batch_size])
            synchronize(device)
            train_seconds = time.perf_counter() - started
            started = time.perf_counter()
            validation = evaluate(model, splits.val_images, splits.val_labels, hardware, recipe.eval_batch_size)
            loss_sum, correct = step.totals.tolist()
            history.append(EpochRecord(epoch, loss_sum / n_train, correct / n_train, validation.loss,
                                       validation.accuracy, train_seconds, time.perf_counter() - started,
                                       n_train / train_seconds))
        if splits.val_is_test and validation is not None:
            test = validation
        else:
            test = evaluate(model, splits.test_images, splits.test_labels, hardware, recipe.eval_batch_size)
    return TrainResult(history=history, test=test, model=model)
