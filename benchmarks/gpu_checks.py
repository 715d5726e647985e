"""Correctness checks that need a GPU (run by gpu_session.sh first, in seconds).

On CUDA cnnlab captures the whole training step as one CUDA graph. A learning rate or an
augmentation draw that the graph froze at capture would silently train with the wrong values, so
this trains convnet7 on the CUDA-graph path (`--compile auto`: eager kernels), the compiled
CUDA-graph path (`--compile on`) and the plain eager path (`--compile off`), with the same seed,
under a step-wise schedule and a plateau schedule with augmentation. It checks that the learning
rate in each history follows the schedule, and that the graph's losses agree with eager's (fp32,
the same kernels: only the launch differs; the compiled path's fused kernels and its own dropout
stream give other losses, so it is checked for the schedule alone). Then it narrows down where the
graph and eager paths part: the weights after 1 and 5 steps of each, with dropout on and off (off
alike and on apart: the dropout random stream differs inside the graph). Prints one line per check
and exits 1 if any fails.

    python benchmarks/gpu_checks.py --data-dir DATA
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from cnnlab.catalog import load_spec
from cnnlab.config import DataSelection, HardwareRequest, Recipe
from cnnlab.datasets import load_dataset
from cnnlab.engine import DeviceData, build_train_step, new_model, train
from cnnlab.hardware import resolve_hardware
from cnnlab.models import FastDropout
from cnnlab.optim import KerasAdam
from cnnlab.options import parse_option
from cnnlab.schedules import learning_rate_at


def weights_after(spec, hardware, images, labels, steps: int, dropout: bool) -> torch.Tensor:
    """All weights, flattened, after `steps` full-batch steps from seed 0 (train()'s random order)."""
    with torch.random.fork_rng(devices=[images.device] if images.is_cuda else []):
        torch.manual_seed(0)
        model = new_model(spec, 0, hardware).train()
        for module in model.modules():
            if isinstance(module, FastDropout) and not dropout:
                module.threshold = 0  # FastDropout passes its input through
        step = build_train_step(model, KerasAdam(model.parameters()), hardware, images, labels, 128)
        for i in range(steps):
            step(torch.arange(i * 128, (i + 1) * 128, device=images.device))
        return torch.cat([p.detach().flatten() for p in model.parameters()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    selection = DataSelection(data_dir=str(args.data_dir), limit_train=4096, limit_test=1000, val_split=0.1)
    paths = {
        c: resolve_hardware(HardwareRequest(device="cuda", precision="fp32", compile=c)) for c in ("auto", "on", "off")
    }
    paths = {"graph": paths["auto"], "compiled graph": paths["on"], "eager": paths["off"]}
    data = DeviceData(load_dataset("mnist", data_dir=args.data_dir, cache_dir=Path("/tmp/cnnlab-cache")), selection,
                      torch.device(paths["graph"].device))  # fmt: skip
    spec = load_spec("convnet7")
    failures = 0
    cases = {
        "exponential": Recipe(epochs=3, schedule=parse_option("exponential:decay_steps=10,decay_rate=0.5", "schedule")),
        "plateau+augment": Recipe(epochs=3, schedule=parse_option("plateau:factor=0.5,patience=0,min_delta=10",
                                  "schedule"), augmentation=parse_option("translate=0.1,rotate=0.05", "augmentation")),
    }  # fmt: skip
    for name, recipe in cases.items():
        results = {label: train(spec, recipe, 0, data.splits(0), hardware)
                   for label, hardware in paths.items()}  # fmt: skip
        steps = math.ceil(len(data.splits(0).train_images) / recipe.batch_size)
        for label, result in results.items():
            rates = [r.learning_rate for r in result.history]
            if name == "exponential":
                expected = [learning_rate_at(recipe.schedule, recipe.learning_rate, e * steps - 1) for e in (1, 2, 3)]
            else:
                expected = [1e-3, 1e-3, 5e-4]
            ok = all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(rates, expected))
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name} {label}: learning rates {rates} (expected {expected})")
        losses = {label: [r.loss for r in result.history] for label, result in results.items()}
        close = all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(losses["graph"], losses["eager"]))
        failures += not close
        print(f"{'ok  ' if close else 'FAIL'} {name}: graph vs eager losses {losses['graph']} / {losses['eager']} "
              f"(compiled graph, not compared: {losses['compiled graph']})")  # fmt: skip
    splits = data.splits(0)
    for steps in (1, 5):
        differences = {}
        for dropout in (False, True):
            graph, eager = (weights_after(spec, paths[label], splits.train_images, splits.train_labels, steps, dropout)
                            for label in ("graph", "eager"))  # fmt: skip
            differences[dropout] = (graph - eager).abs().max().item()
        ok = differences[False] <= 1e-5
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} graph vs eager weights after {steps} step(s): max difference "
              f"{differences[False]:.2e} with dropout off (same kernels: at most 1e-5), "
              f"{differences[True]:.2e} with dropout on")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
