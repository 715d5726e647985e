"""Sweep benchmark: the same sweep of convnet7 units on the local backend (one unit at a time with
all the machine's threads) and on Ray (as many units at a time as there are cores, one thread each).

Both runs go through `api.prepare` and `api.execute` as `cnnlab sweep` does; each wall time runs
from before `prepare` (loading the data) to the end of the last unit, so Ray's start-up and shut-down
are included. The Markdown entry it prints (and with --append adds to a file) gives both wall times,
their ratio, each unit's mean wall time and the runs' mean test accuracy, and Ray's bare start-up and
shut-down time measured after both runs.

    python benchmarks/bench_sweep.py --data-dir ../shared/data
    python benchmarks/bench_sweep.py --data-dir ../shared/data --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import cnnlab
from cnnlab.api import execute, plan_run, prepare
from cnnlab.config import DataSelection, HardwareRequest, Recipe
from cnnlab.hardware import cpu_name

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags() -> dict[str, bool]:
    """Which of FLAGS /proc/cpuinfo lists."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {flag: flag in flags for flag in FLAGS}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def run_sweep(args: argparse.Namespace, runs_dir: Path, *, backend: str, threads: int) -> dict[str, float]:
    """Plan, prepare and execute the sweep; its wall time, units' mean wall time and mean test accuracy."""
    plan = plan_run(
        ["convnet7"],
        recipes=[Recipe(epochs=args.epochs, learning_rate=lr) for lr in args.learning_rates],
        seeds=range(args.seeds),
        data=DataSelection(
            data_dir=str(args.data_dir), limit_train=args.limit_train, limit_test=args.limit_test, val_split=0.1
        ),
        hardware=HardwareRequest(device="cpu", precision="fp32", compile="off", threads=threads),
    )
    started = time.perf_counter()
    prepared = prepare(plan, runs_dir=runs_dir, name=backend)
    outcome = execute(prepared, backend=backend)
    wall = time.perf_counter() - started
    if outcome.failed or len(outcome.results) != len(plan.units()):
        sys.exit(f"{backend}: {len(outcome.failed)} units failed: {outcome.failed}")
    return {
        "wall": wall,
        "units": len(outcome.results),
        "unit_wall": statistics.mean(r.metrics["wall_seconds"] for r in outcome.results),
        "test_accuracy": statistics.mean(r.test_accuracy for r in outcome.results),
    }


def ray_start_stop_seconds() -> float:
    """A bare local Ray instance's start-up and shut-down, as run_units_on_ray makes them."""
    import ray

    started = time.perf_counter()
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    ray.shutdown()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--limit-train", type=int, default=4096)
    parser.add_argument("--limit-test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-3, 3e-4])
    parser.add_argument("--append", type=Path, help="Add the Markdown entry to this file.")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load_before = load_average()
    with tempfile.TemporaryDirectory() as runs:
        local = run_sweep(args, Path(runs), backend="local", threads=cores)
        on_ray = run_sweep(args, Path(runs), backend="ray", threads=1)
    start_stop = ray_start_stop_seconds()
    load_after = load_average()

    import ray

    flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in cpu_flags().items())
    units = local["units"]
    command = shlex.join(["python", *sys.argv])
    entry = f"""
## Sweeps: local vs Ray (2-core CPU)

- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {cpu_name()}, {cores} usable cores; {flags}.
- Versions: Python {platform.python_version()}, torch {torch.__version__}, Ray {ray.__version__}, cnnlab {cnnlab.__version__}.
- Other load on the machine (load average): {load_before} at the start, {load_after} at the end.
- Command: `{command}`
- Sweep: {units} convnet7 units ({len(args.learning_rates)} learning rates x {args.seeds} seeds), {args.epochs} epochs,
  MNIST limited to {args.limit_train} training images (val_split 0.1) and {args.limit_test} test images, fp32, no
  compilation, batch 128. Local: one unit at a time with {cores} torch threads; Ray: a local instance
  of {cores} CPUs, {cores} units at a time with 1 torch thread each (`--cpus-per-unit 1`). Wall time from loading
  the data to the last unit's results, Ray's start-up and shut-down included.

| backend | torch threads per unit | units at a time | sweep wall time | mean unit wall time | mean test accuracy |
| --- | ---: | ---: | ---: | ---: | ---: |
| local | {cores} | 1 | {local["wall"]:.1f} s | {local["unit_wall"]:.1f} s | {local["test_accuracy"]:.4f} |
| ray | 1 | {cores} | {on_ray["wall"]:.1f} s | {on_ray["unit_wall"]:.1f} s | {on_ray["test_accuracy"]:.4f} |

- Ray / local wall time: {on_ray["wall"] / local["wall"]:.2f} (Ray's speed-up over local: {local["wall"] / on_ray["wall"]:.2f}x);
  a bare local Ray instance's start-up and shut-down alone took {start_stop:.1f} s.
- The two runs' numbers are not bit-identical: the thread count (here 1 against {cores}) is part of a CPU result's bits,
  and after {args.epochs} short epochs, near chance, such differences flip many predictions. With the same thread count
  the Ray backend's numbers equal the local backend's exactly (tests/test_ray_backend.py).
"""
    print(entry)
    if args.append is not None:
        with args.append.open("a", encoding="utf-8") as file:
            file.write(entry)


if __name__ == "__main__":
    main()
