"""Extra seeds for a `bench_accuracy.py` comparison, one configuration at a time (BENCHMARKS.md,
"Compact dropout masks, and ReLU after max-pooling": convnet7's seeds 10-19). bench_accuracy trains
the defaults and the fp32 reference of every seed; this trains one of them, with the code of the
tree given (its `src` and `benchmarks` first on the path: another commit's worktree trains that
commit's defaults), and writes bench_accuracy's JSON format, resuming from the file if it exists.

    python explore_accuracy_extra_seeds.py TREE OUT.json MODEL EPOCHS FIRST LAST [defaults|reference]
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

tree, out, model, epochs, first, last = sys.argv[1], Path(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:7])
reference = len(sys.argv) > 7 and sys.argv[7] == "reference"
sys.path[:0] = [f"{tree}/src", f"{tree}/benchmarks"]

import torch  # noqa: E402

import bench_accuracy  # noqa: E402
from cnnlab.config import DataSelection, HardwareRequest, Recipe  # noqa: E402
from cnnlab.datasets import load_dataset  # noqa: E402
from cnnlab.engine import DeviceData  # noqa: E402
from cnnlab.hardware import keep_freed_memory_for_reuse, resolve_hardware  # noqa: E402

data_dir = "/work/shared/data"
dataset = load_dataset("mnist", data_dir=data_dir, cache_dir=Path.home() / ".cache" / "cnnlab")
hardware = resolve_hardware(HardwareRequest())
keep_freed_memory_for_reuse()
data = DeviceData(dataset, DataSelection("mnist", data_dir, None, None), torch.device(hardware.device))
runs = json.loads(out.read_text())["runs"] if out.exists() else []
done = {r["seed"] for r in runs}
for seed in range(first, last + 1):
    if seed in done:
        continue
    splits = data.splits(seed)  # validation on the first 1,000 test images, as bench_accuracy does
    splits = replace(
        splits, val_images=splits.test_images[:1000], val_labels=splits.test_labels[:1000], val_is_test=False
    )
    run = bench_accuracy.train_once(model, seed, Recipe(epochs=epochs), splits, hardware, reference)
    runs.append(run)
    print(
        f"{model} seed {seed} {run['config']} test acc {run['test_accuracy']:.4f} ({run['seconds']:.0f} s)", flush=True
    )
    out.write_text(json.dumps({"meta": {"tree": tree, "hardware": str(hardware)}, "runs": runs}, indent=1))
