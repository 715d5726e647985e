"""CPU benchmark of `cnnlab predict`'s model step: single-image latency and batch throughput of
`Predictor.predict` (uint8 pixels in, probabilities out: engine.to_input, the forward pass in eval
mode, softmax) for each built-in model, with the model already loaded.

The weights are untrained (Keras's initialisation, seed 0): the time of a forward pass does not
depend on the values of the weights. Image reading and preprocessing are not timed.

- latency: one 28x28 image per call, the median of `--calls` calls after 20 warm-up calls;
- throughput: batches of 256 and 1024 images, images per second of the median of `--batches` calls
  after 2 warm-up calls.

    python benchmarks/bench_predict.py                  # about a minute on 2 cores
    python benchmarks/bench_predict.py --calls 50 --batches 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime

import numpy as np
import torch

from cnnlab.catalog import builtin_models, load_spec
from cnnlab.config import Arm, Hardware, Recipe, Unit
from cnnlab.engine import new_model
from cnnlab.predict import Predictor

BATCHES = (256, 1024)


def timed(call, repeats: int, warmup: int) -> float:
    """The median wall time of `call()` in seconds."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def predictor(name: str) -> Predictor:
    spec = load_spec(name)
    hardware = Hardware("cpu", "", "fp32", compiled=False, channels_last=False, threads=torch.get_num_threads())
    unit = Unit(Arm(name, name, spec, Recipe()), 0)
    return Predictor(unit, new_model(spec, 0, hardware), [str(i) for i in range(10)], "mnist", "benchmark")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed single-image calls per model")
    parser.add_argument("--batches", type=int, default=5, help="timed batch calls per model and batch size")
    parser.add_argument("--models", nargs="*", default=builtin_models())
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(BATCHES), 28, 28), dtype=np.uint8)
    rows = []
    for name in args.models:
        p = predictor(name)
        latency = timed(lambda p=p: p.predict(images[:1]), args.calls, 20)
        rates = [n / timed(lambda p=p, n=n: p.predict(images[:n]), args.batches, 2) for n in BATCHES]
        rows.append((name, latency, rates))
        print(f"{name}: {latency * 1e3:.2f} ms/image, " + ", ".join(f"{r:,.0f} img/s" for r in rates), file=sys.stderr)

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    cpu = platform.processor() or platform.machine()
    print(f"### predict on the CPU ({datetime.now():%Y-%m-%d})\n")
    print(
        f"`Predictor.predict` with the model loaded (untrained weights: the values do not change the time), "
        f"fp32, eval mode, uint8 pixels in, probabilities out; reading and preprocessing files not timed. "
        f"Machine: {platform.platform()}, {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}. Command: `{command}`.\n"
    )
    print(f"| Model | Latency, 1 image (median of {args.calls}) | " + " | ".join(
        f"Throughput, batch {n} (median of {args.batches})" for n in BATCHES) + " |")  # fmt: skip
    print("|---|---:|" + "---:|" * len(BATCHES))
    for name, latency, rates in rows:
        print(f"| {name} | {latency * 1e3:.2f} ms | " + " | ".join(f"{r:,.0f} images/s" for r in rates) + " |")


if __name__ == "__main__":
    main()
