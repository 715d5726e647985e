"""What the training options buy: convnet7 with augmentation and a plateau schedule against the
notebook's recipe, the same held-out validation images for both, several seeds each.

One run folder holds both arms (cnnlab's Python API with two recipes), so the report compares them
with its usual statistics; the script resumes that folder when interrupted (`--resume RUN_DIR`) and
prints a BENCHMARKS.md entry from it.

    python benchmarks/bench_options.py --data-dir ../shared/data [--seeds 5 --epochs 12] [--append BENCHMARKS.md]
    python benchmarks/bench_options.py --resume runs/bench/20261127-...-options --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

from cnnlab import api
from cnnlab.config import DataSelection, HardwareRequest, Recipe
from cnnlab.hardware import cpu_name
from cnnlab.options import parse_option
from cnnlab.progress import PlainReporter

AUGMENT = "translate=0.1,rotate=0.05,zoom=0.1"
PLATEAU = "plateau:factor=0.5,patience=2,min_lr=1e-5"


def cpu_flags() -> str:
    """The CPU flags that decide the kernels: AVX2, AVX-512 and its bf16, AMX."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "?"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(flag for flag in flags.split(":", 1)[1].split() if flag in wanted)


def entry(summary: api.ReportSummary, command: str) -> str:
    """The BENCHMARKS.md entry: test accuracy with intervals, time per epoch, the verdict."""
    plan = summary.analysis.plan
    lines = [
        f"### Training options on convnet7 ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {cpu_name()} ({torch.get_num_threads()} threads; flags: {cpu_flags()}), "
        f"torch {torch.__version__}, {summary.analysis.hardware.precision if summary.analysis.hardware else '?'}. "
        f"Data: the offline MNIST training subset ({plan.data.limit_train or 'all'} of 22,699 images, "
        f"{plan.data.val_split:g} held out for validation, stratified, split seed {plan.data.split_seed}, the same "
        f"for both arms), all 10,000 test images. Seeds {', '.join(map(str, plan.seeds))}, "
        f"{plan.arms[0].recipe.epochs} epochs.",
        f"Command: `{command}`",
        "",
        "| arm | test accuracy (mean ± SD) | 95% CI | validation accuracy | s/epoch (median) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row, details in zip(summary.rows, summary.analysis.details):
        val = sum(u.metrics.get("val_accuracy", float("nan")) for u in details.units) / len(details.units)
        # The median over every epoch of every seed: robust to epochs slowed by other work on a shared machine.
        epoch_seconds = statistics.median(r.train_seconds + r.val_seconds for u in details.units for r in u.history)
        lines.append(
            f"| {row.arm} | {row.test_accuracy.mean:.4f} ± {row.test_accuracy.std:.4f} | "
            f"{row.test_accuracy.ci_low:.4f} to {row.test_accuracy.ci_high:.4f} | {val:.4f} | "
            f"{epoch_seconds:.1f} |"
        )
    lines.append("")
    lines += [f"- {c.sentence()}" for c in summary.comparisons]
    if summary.analysis.choice is not None:
        lines.append(f"- {summary.analysis.choice.sentence()}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--val-split", type=float, default=0.1)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench"))
    parser.add_argument("--resume", type=Path, default=None, help="finish this run folder of an earlier call")
    parser.add_argument("--append", type=Path, default=None, help="append the entry to this Markdown file")
    args = parser.parse_args()

    def reporter(unit):
        return PlainReporter(unit.label, sys.stdout)

    if args.resume is not None:
        prepared = api.prepare_resume(args.resume)
    else:
        notebook = Recipe(epochs=args.epochs)
        options = Recipe(
            epochs=args.epochs,
            augmentation=parse_option(AUGMENT, "augmentation"),
            schedule=parse_option(PLATEAU, "schedule"),
        )
        plan = api.plan_run(
            ["convnet7"],
            recipes=[notebook, options],
            seeds=range(args.seeds),
            data=DataSelection(data_dir=str(args.data_dir), limit_train=args.limit_train, val_split=args.val_split),
            hardware=HardwareRequest(),
        )
        prepared = api.prepare(plan, runs_dir=args.runs_dir, name="options")
    print(f"Run folder: {prepared.folder}", flush=True)
    api.execute(prepared, make_reporter=reporter)
    summary = api.report(prepared.folder.path)
    text = entry(summary, "python " + shlex.join(sys.argv))
    print(text)
    if args.append:
        with args.append.open("a", encoding="utf-8") as out:
            out.write("\n" + text)
    print(f"platform: {platform.platform()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
