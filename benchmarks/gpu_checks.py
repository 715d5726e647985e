"""Correctness checks that need a GPU (run by gpu_session.sh first, in seconds).

On CUDA cnnlab captures the whole training step as one CUDA graph. A learning rate or an
augmentation draw that the graph froze at capture would silently train with the wrong values, so
this trains convnet7 on the CUDA-graph path and on the eager CUDA path, with the same seed, under a
step-wise schedule and a plateau schedule with augmentation, and checks that the learning rate in
the history follows the schedule on both paths and that the two paths' losses agree (fp32: same
kernels, only the launch differs). Prints one line per check and exits 1 if any fails.

    python benchmarks/gpu_checks.py --data-dir DATA
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

from cnnlab.catalog import load_spec
from cnnlab.config import DataSelection, HardwareRequest, Recipe
from cnnlab.datasets import load_dataset
from cnnlab.engine import DeviceData, train
from cnnlab.hardware import resolve_hardware
from cnnlab.options import parse_option
from cnnlab.schedules import learning_rate_at


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    selection = DataSelection(data_dir=str(args.data_dir), limit_train=4096, limit_test=1000, val_split=0.1)
    graphed = resolve_hardware(HardwareRequest(device="cuda", precision="fp32", compile="on"))
    eager = dataclasses.replace(graphed, compiled=False, cuda_graph=False)
    data = DeviceData(load_dataset("mnist", data_dir=args.data_dir, cache_dir=Path("/tmp/cnnlab-cache")), selection,
                      torch.device(graphed.device))  # fmt: skip
    spec = load_spec("convnet7")
    failures = 0
    cases = {
        "exponential": Recipe(epochs=3, schedule=parse_option("exponential:decay_steps=10,decay_rate=0.5", "schedule")),
        "plateau+augment": Recipe(epochs=3, schedule=parse_option("plateau:factor=0.5,patience=0,min_delta=10",
                                  "schedule"), augmentation=parse_option("translate=0.1,rotate=0.05", "augmentation")),
    }  # fmt: skip
    for name, recipe in cases.items():
        results = {label: train(spec, recipe, 0, data.splits(0), hardware)
                   for label, hardware in (("graph", graphed), ("eager", eager))}  # fmt: skip
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
        print(f"{'ok  ' if close else 'FAIL'} {name}: graph vs eager losses {losses['graph']} / {losses['eager']}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
