"""Accuracy evidence: do cnnlab's speed levers cost accuracy? Its defaults against an fp32 reference.

For each seed model and seed, the same recipe (the seed notebook's: Keras initializers, Keras Adam,
batch 128) is trained twice:

- **defaults**: `engine.train` with what `HardwareRequest()` resolves to on this machine
  (precision, channels_last, compilation, CUDA graphs) and cnnlab's cheap dropout masks;
- **reference**: plain fp32 in PyTorch's default NCHW layout, not compiled, with `nn.Dropout`'s
  `bernoulli_` masks instead of cnnlab's: the spec's network from `models.build_model` with each
  `FastDropout` swapped for an `nn.Dropout` of the same rate, trained with cnnlab's public step
  by `engine.train` itself, given the reference network's builder (`build=`).

Same seed, same initial weights and the same shuffles; only the arithmetic and the dropout random
stream differ. It reports each run's test accuracy after the last epoch, the means over seeds, the
difference in percentage points, Welch's test, and the issue's bar as a paired equivalence test:
two one-sided t-tests (TOST) on each seed's difference, margin 0.15 pp (`stats.paired_equivalence`):
"equivalent", "different", or "unresolved" (more seeds needed). Pairing by seed is what makes it
cheap: a seed's two runs share initial weights and data order, so their difference varies far less
than the accuracies do. Results are written to JSON after every run, so an interrupted run keeps what it has.

    python benchmarks/bench_accuracy.py                                # 3 models x 3 seeds x 3 epochs
    python benchmarks/bench_accuracy.py --models convnet7 --seeds 2 --epochs 1 --limit-train 2000
    python benchmarks/bench_accuracy.py --json benchmarks/results/accuracy.json --append BENCHMARKS.md
    python benchmarks/bench_accuracy.py --from-json benchmarks/results/accuracy.json   # the entry for saved runs

To tell bf16's effect from the other defaults', run the defaults again in fp32 (`--precision fp32`),
taking the reference runs from the first JSON instead of training them again (`--reference-from`:
the reference is deterministic), then pair the two runs' defaults by seed:

    python benchmarks/bench_accuracy.py --precision fp32 --reference-from bf16.json --json fp32.json ...
    python benchmarks/bench_accuracy.py --from-json bf16.json --against fp32.json

One switch of the defaults is told apart the same way, turning it off with `--without FIELD` (a
`Hardware` switch, e.g. `padded_small_convs_as_matmul`) in the second run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from torch import nn

import cnnlab
from cnnlab.catalog import load_spec
from cnnlab.config import DataSelection, Hardware, HardwareRequest, Recipe
from cnnlab.datasets import load_dataset
from cnnlab.engine import DeviceData, Splits, train
from cnnlab.hardware import keep_freed_memory_for_reuse, resolve_hardware
from cnnlab.models import FastDropout, build_model
from cnnlab.spec import ModelSpec
from cnnlab.stats import aggregate, paired_equivalence, welch

REPO = Path(__file__).resolve().parents[1]
MODELS = ["convnet3", "convnet5", "convnet7"]
REFERENCE = "fp32, NCHW, not compiled, `nn.Dropout` (`bernoulli_`) masks"  # what the reference runs are
# What must match for two runs of this script to have trained alike (given the precision).
SAME_RUNS = ("epochs", "data", "machine", "torch", "cnnlab")
BAR_PP = 0.15  # the bar: mean test accuracy within 0.15 percentage points of fp32 training


def reference_model(spec: ModelSpec, seed: int, hardware: Hardware) -> nn.Module:
    """The spec's network with the same initial weights as cnnlab's (`build_model`, seeded) and every
    FastDropout swapped for an `nn.Dropout` of the same rate (the reference's `bernoulli_` masks)."""
    model = build_model(spec, seed=seed)
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, FastDropout):
                setattr(parent, name, nn.Dropout(child.rate))
    model = model.to(torch.device(hardware.device))
    return model.to(memory_format=torch.channels_last) if hardware.channels_last else model


def train_once(model_name: str, seed: int, recipe: Recipe, splits: Splits, defaults: Hardware, reference: bool) -> dict:
    """One training run; returns its settings, final test accuracy and time."""
    spec = load_spec(model_name)
    started = time.perf_counter()
    if reference:
        hardware = replace(
            defaults,
            precision="fp32",
            channels_last=False,
            compiled=False,
            cuda_graph=False,
            small_convs_as_matmul=False,
        )
        result = train(spec, recipe, seed, splits, hardware, build=reference_model)
    else:
        hardware = defaults
        result = train(spec, recipe, seed, splits, hardware)
    seconds = time.perf_counter() - started
    last = result.history[-1]
    return {
        "model": model_name,
        "seed": seed,
        "config": "reference" if reference else "defaults",
        "precision": hardware.precision,
        "channels_last": hardware.channels_last,
        "compiled": hardware.compiled,
        "dropout": "bernoulli_" if reference else "cnnlab",
        "test_accuracy": result.test.accuracy,
        "test_loss": result.test.loss,
        "train_accuracy": last.accuracy,
        "seconds": seconds,
        "history": [asdict(r) for r in result.history],
    }


def summarise(runs: list[dict], models: list[str]) -> list[dict]:
    """Per model: mean and spread of each configuration, the difference and Welch's test."""
    rows = []
    for model_name in models:
        accuracies = {
            c: [r["test_accuracy"] for r in runs if r["model"] == model_name and r["config"] == c]
            for c in ("defaults", "reference")
        }
        if not accuracies["defaults"] or not accuracies["reference"]:
            continue
        a, b = aggregate(accuracies["defaults"]), aggregate(accuracies["reference"])
        test = welch(accuracies["defaults"], accuracies["reference"], "defaults", "reference")
        by_seed = {
            c: {r["seed"]: r["test_accuracy"] for r in runs if r["model"] == model_name and r["config"] == c}
            for c in ("defaults", "reference")
        }
        paired = sorted(set(by_seed["defaults"]) & set(by_seed["reference"]))
        tost = paired_equivalence(
            [by_seed["defaults"][s] for s in paired], [by_seed["reference"][s] for s in paired], BAR_PP / 100
        )
        difference_pp = (a.mean - b.mean) * 100
        rows.append(
            {
                "model": model_name,
                "seeds": min(a.n, b.n),
                "defaults": accuracies["defaults"],
                "reference": accuracies["reference"],
                "defaults_mean": a.mean,
                "defaults_std": a.std,
                "reference_mean": b.mean,
                "reference_std": b.std,
                "difference_pp": difference_pp,
                "p_value": test.p_value,
                "ci_pp": [test.ci_low * 100, test.ci_high * 100],
                "pairs": len(paired),
                "paired_difference_pp": tost.difference * 100,
                "paired_ci90_pp": [tost.ci_low * 100, tost.ci_high * 100],
                "tost_p": tost.p_value,
                "verdict": tost.verdict,
            }
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    """A dated BENCHMARKS.md entry."""
    lines = [
        f"## Accuracy: cnnlab's defaults against fp32 training, {meta['date']}",
        "",
        f"- Machine: {meta['machine']}; torch {meta['torch']}, Python {meta['python']}, cnnlab {meta['cnnlab']}.",
        f"- Command: `{meta['command']}`",
        f"- Data: {meta['data']}. Recipe: the seed's (Keras initializers and Adam, batch 128), "
        f"{meta['epochs']} epochs; accuracy on the whole test set after the last.",
        f"- defaults: {meta['defaults']}; reference: {meta.get('reference', REFERENCE)}. Same seed, same "
        "initial weights and shuffles.",
        "",
        "| model | seeds | defaults test acc (mean ± std) | reference test acc | difference | Welch p "
        f"| paired difference, its 90% CI | TOST p (margin {BAR_PP} pp) | verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        p = "n/a" if r["p_value"] != r["p_value"] else f"{r['p_value']:.2f}"
        tost = "n/a" if r["tost_p"] != r["tost_p"] else f"{r['tost_p']:.3f}"
        lines.append(
            f"| {r['model']} | {r['seeds']} | {r['defaults_mean'] * 100:.2f} ± {r['defaults_std'] * 100:.2f} % "
            f"| {r['reference_mean'] * 100:.2f} ± {r['reference_std'] * 100:.2f} % "
            f"| {r['difference_pp']:+.2f} pp | {p} | {r['paired_difference_pp']:+.3f} pp "
            f"({r['paired_ci90_pp'][0]:+.3f} to {r['paired_ci90_pp'][1]:+.3f}) | {tost} | {r['verdict']} |"
        )
    lines.append("")
    lines.append(
        "Per seed (defaults / reference): "
        + "; ".join(
            f"{r['model']} " + ", ".join(f"{a * 100:.2f}/{b * 100:.2f}" for a, b in zip(r["defaults"], r["reference"]))
            for r in rows
        )
        + f". Wall time {meta['wall_minutes']:.0f} min."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("CNNLAB_DATA_DIR", REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--max-seeds",
        type=int,
        default=None,
        help="past --seeds, add seeds to the models whose equivalence test is unresolved, up to this many "
        "(a sequential design: the verdict's alpha is then nominal)",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="the defaults' precision: fp32 keeps every other default, to tell bf16's effect from the rest's",
    )
    parser.add_argument(
        "--without",
        nargs="+",
        default=[],
        metavar="FIELD",
        help="turn off these on/off switches of the resolved defaults (Hardware fields, e.g. "
        "padded_small_convs_as_matmul) to measure one lever",
    )
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--limit-test", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here (after every run)")
    parser.add_argument("--append", type=Path, default=None, help="append a dated Markdown entry to this file")
    parser.add_argument(
        "--resume", action="store_true", help="keep the runs already saved in --json and train only the missing ones"
    )
    parser.add_argument(
        "--reference-from",
        type=Path,
        default=None,
        help="take the reference runs from this JSON instead of training them (the same recipe, data, "
        "machine and versions give the same runs), e.g. to run the defaults again in fp32",
    )
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        help="with --from-json: pair its defaults by seed with the defaults saved in this JSON instead of "
        "with the reference (bf16 against fp32, every other default kept)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        help="train nothing: print (and --append) the entry for the runs saved in this JSON (or in several, "
        "e.g. one per model trained in parallel processes)",
    )
    args = parser.parse_args()
    if args.against and not args.from_json:
        parser.error("--against pairs saved runs: give --from-json too")
    if args.from_json:
        saved = merged([json.loads(path.read_text()) for path in args.from_json])
        runs, meta = saved["runs"], saved["meta"]
        if args.against:
            runs, meta = against(saved, json.loads(args.against.read_text()), args.against)
        seen = list(dict.fromkeys(r["model"] for r in runs))
        models = [m for m in MODELS if m in seen] + [m for m in seen if m not in MODELS]
        emit(markdown(summarise(runs, models), meta), args.append)
        return

    dataset = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=Path.home() / ".cache" / "cnnlab")
    recipe = Recipe(epochs=args.epochs)
    selection = DataSelection(args.dataset, str(args.data_dir), args.limit_train, args.limit_test)
    resolved = resolve_hardware(HardwareRequest(precision=args.precision))
    switches = {f.name for f in fields(Hardware) if f.type in (bool, "bool")} - {"compiled", "channels_last"}
    unknown = [name for name in args.without if name not in switches]
    if unknown:
        parser.error(
            f"--without {' '.join(unknown)}: not a switch of the defaults; choose from {', '.join(sorted(switches))}"
        )
    resolved = replace(resolved, **dict.fromkeys(args.without, False))
    if resolved.device == "cpu":
        keep_freed_memory_for_reuse()  # as cnnlab's runner does before training on the CPU
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{resolved.device_name} ({resolved.device}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cnnlab": cnnlab.__version__,
        "command": "python " + shlex.join(["benchmarks/bench_accuracy.py", *sys.argv[1:]]),
        "data": (
            f"{args.dataset} from {args.data_dir}: {len(dataset.train_images)} training images"
            f"{f' (first {args.limit_train})' if args.limit_train else ''}, "
            f"{args.limit_test or len(dataset.test_images)} test images"
        ),
        "epochs": args.epochs,
        "defaults": (
            f"{resolved.precision}, {'channels_last' if resolved.channels_last else 'NCHW'}, "
            f"{'compiled' if resolved.compiled else 'not compiled'}"
            f"{', one CUDA graph per step' if resolved.cuda_graph else ''}"
            f"{', small convolutions as matrix products' if resolved.small_convs_as_matmul else ''}"
            f"{' (those padding themselves too)' if resolved.small_convs_as_matmul and resolved.padded_small_convs_as_matmul else ''}"
            f", cnnlab's {'compact ' if resolved.compact_dropout_masks else ''}dropout masks"
            f"{''.join(f'; {name} off' for name in args.without)}"
        ),
    }
    runs: list[dict] = []
    if args.resume and args.json and args.json.exists():
        saved = json.loads(args.json.read_text())
        runs, meta["wall_minutes_before"] = saved["runs"], saved["meta"].get("wall_minutes", 0.0)
        print(f"resuming: {len(runs)} runs already in {args.json}", file=sys.stderr)
    if args.reference_from:
        runs += reference_runs(json.loads(args.reference_from.read_text()), meta, args, runs)
    done = {(r["model"], r["seed"], r["config"]) for r in runs}
    data = DeviceData(dataset, selection, torch.device(resolved.device))  # on the device once for all runs
    started = time.perf_counter()
    seed = 0
    while True:  # seed-major, so an interrupted run has every model's first seeds
        models = args.models
        if seed >= args.seeds:  # past --seeds: only the unresolved models, up to --max-seeds
            unresolved = {r["model"] for r in summarise(runs, args.models) if r["verdict"] == "unresolved"}
            models = [m for m in args.models if m in unresolved] if seed < (args.max_seeds or 0) else []
        if not models:
            break
        for model_name in models:
            if all((model_name, seed, c) in done for c in ("defaults", "reference")):
                continue
            splits = data.splits(seed)
            # Per-epoch validation changes nothing in training (no randomness, no state), so it runs
            # on the first 1,000 test images; the final test below is on the whole test split.
            splits = replace(
                splits, val_images=splits.test_images[:1000], val_labels=splits.test_labels[:1000], val_is_test=False
            )
            for reference in (False, True):
                if (model_name, seed, "reference" if reference else "defaults") in done:
                    continue
                run = train_once(model_name, seed, recipe, splits, resolved, reference)
                runs.append(run)
                print(
                    f"{model_name} seed {seed} {run['config']:9s} test acc {run['test_accuracy']:.4f} "
                    f"({run['seconds']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                meta["wall_minutes"] = meta.get("wall_minutes_before", 0.0) + (time.perf_counter() - started) / 60
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    tmp = args.json.with_suffix(".tmp")
                    tmp.write_text(
                        json.dumps({"meta": meta, "runs": runs, "summary": summarise(runs, args.models)}, indent=1)
                    )
                    tmp.replace(args.json)
        seed += 1
    emit(markdown(summarise(runs, args.models), meta), args.append)


def mismatched(metas: list[dict], keys: tuple[str, ...] = SAME_RUNS) -> list[str]:
    """The keys whose values differ between these runs' descriptions (their JSONs' `meta`)."""
    return [key for key in keys if len({str(meta.get(key)) for meta in metas}) > 1]


def reference_runs(saved: dict, meta: dict, args: argparse.Namespace, runs: list[dict]) -> list[dict]:
    """The reference runs of `saved` (another run's JSON) for this run's models and seeds that `runs`
    lacks; exits if `saved` was trained otherwise (recipe, data, machine, versions)."""
    different = mismatched([saved["meta"], meta])
    if different:
        sys.exit(f"--reference-from {args.reference_from}: its runs differ from this run in {', '.join(different)}")
    have = {(r["model"], r["seed"], r["config"]) for r in runs}
    wanted = {m: range(max(args.seeds, args.max_seeds or 0)) for m in args.models}
    taken = [
        r
        for r in saved["runs"]
        if r["config"] == "reference"
        and r["seed"] in wanted.get(r["model"], ())
        and (r["model"], r["seed"], "reference") not in have
    ]
    print(f"{len(taken)} reference runs taken from {args.reference_from}", file=sys.stderr)
    meta["reference_from"] = str(args.reference_from)
    return taken


def merged(saved: list[dict]) -> dict:
    """Several runs' JSONs as one: their runs together; the first's description, with every command,
    and the longest wall time (they ran side by side)."""
    if len(saved) == 1:
        return saved[0]
    different = mismatched([s["meta"] for s in saved], (*SAME_RUNS, "defaults"))
    if different:
        sys.exit(
            f"--from-json: the files differ in {', '.join(different)}; give files of one recipe, machine and defaults"
        )
    meta = {
        **saved[0]["meta"],
        "command": "` and `".join(s["meta"]["command"] for s in saved),  # markdown() adds the outer backticks
        "wall_minutes": max(s["meta"].get("wall_minutes", 0.0) for s in saved),
    }
    return {"meta": meta, "runs": [run for s in saved for run in s["runs"]]}


def against(saved: dict, other: dict, other_path: Path) -> tuple[list[dict], dict]:
    """`saved`'s defaults as the runs to test and `other`'s defaults as their reference, with the
    entry's description saying so; exits if the two were trained otherwise (recipe, data, machine)."""
    different = mismatched([saved["meta"], other["meta"]])
    if different:
        sys.exit(f"--against {other_path}: its runs differ from the others in {', '.join(different)}")
    mine = {(r["model"], r["seed"]): r for r in saved["runs"] if r["config"] == "defaults"}
    theirs = {(r["model"], r["seed"]): r for r in other["runs"] if r["config"] == "defaults"}
    both = [key for key in mine if key in theirs]  # the seeds trained in both, so that every figure pairs
    runs = [mine[key] for key in both] + [{**theirs[key], "config": "reference"} for key in both]
    meta = {
        **saved["meta"],
        # markdown() puts the command in backticks: this gives two commands, each in its own.
        "command": f"{saved['meta']['command']}` against the defaults of `{other['meta']['command']}",
        "reference": f"the defaults of {other_path}: {other['meta']['defaults']}",
    }
    return runs, meta


def emit(entry: str, append: Path | None) -> None:
    """Print the Markdown entry and append it to `append` when given."""
    print(entry)
    if append:
        with append.open("a", encoding="utf-8") as handle:
            handle.write("\n" + entry)


if __name__ == "__main__":
    main()
