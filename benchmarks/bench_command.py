"""From command to table: a `cnnlab` command line timed from start to exit, and where its time goes.

Each repetition runs the command in a fresh Python process (as a user's shell does) and records,
besides the wall time measured from outside, the phases inside it: the interpreter and imports
before cnnlab's first call, `api.prepare` (data, run folder), training (`engine.train` /
`engine.train_together`, the per-epoch validation included, of which `engine.evaluate` is shown
apart), the rest of `api.execute` (final test, predictions, writing results) and `api.report`
(figures, report, tables). It also records whether the heavy optional modules (torch._dynamo,
scipy.stats) were imported. With `--baseline-src`, the same command runs from a second source tree
(a worktree of an older commit) in alternation, so that both are measured in the same minutes.

    python benchmarks/bench_command.py --repeats 5 --json out.json -- \
        compare --dataset fashion-mnist --epochs 1 --limit-train 1280 --data-dir ../shared/data
    python benchmarks/bench_command.py --baseline-src /tmp/old/src --repeats 5 -- compare ...

The command's run folders go to a temporary folder (its `--runs-dir`), removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PHASES = ("startup", "prepare", "training", "of which evaluate", "rest of execute", "report", "other")


def child(marks_path: str, argv: list[str]) -> None:
    """Run `cnnlab argv` in this process with timers around its phases; write them as JSON."""
    import runpy

    spans: dict[str, float] = {}
    start = time.perf_counter()

    def timed(module, name: str, phase: str) -> None:
        function = getattr(module, name)

        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spans[phase] = spans.get(phase, 0.0) + time.perf_counter() - began
                spans.setdefault(f"first {phase}", began - start)

        setattr(module, name, wrapper)

    import cnnlab.api as api
    import cnnlab.engine as engine
    import cnnlab.runner as runner

    timed(api, "prepare", "prepare")
    timed(api, "execute", "execute")
    timed(api, "report", "report")
    timed(runner, "train", "training")
    timed(runner, "train_together", "training")
    timed(engine, "evaluate", "evaluate")
    sys.argv = ["cnnlab", *argv]
    code = 0
    try:
        runpy.run_module("cnnlab", run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    spans["in process"] = time.perf_counter() - start
    spans["exit code"] = code
    spans["imported torch._dynamo"] = "torch._dynamo" in sys.modules
    spans["imported scipy.stats"] = "scipy.stats" in sys.modules
    Path(marks_path).write_text(json.dumps(spans))
    sys.exit(code)


def run_once(src: Path, argv: list[str], runs_dir: Path) -> dict[str, float]:
    """One repetition in a fresh process: the wall time from outside and the phases from inside."""
    with tempfile.NamedTemporaryFile(suffix=".json") as marks:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--child", marks.name, "--", *argv, "--runs-dir", str(runs_dir)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - began
        if done.returncode != 0:
            sys.exit(f"the command failed ({done.returncode}):\n{done.stderr[-2000:]}")
        spans = json.loads(Path(marks.name).read_text())
    training, evaluate = spans.get("training", 0.0), spans.get("evaluate", 0.0)
    phases = {
        "total": wall,
        # Interpreter, imports and option parsing: everything before the first phase begins.
        "startup": wall - spans["in process"] + spans.get("first prepare", 0.0),
        "prepare": spans.get("prepare", 0.0),
        "training": training,
        "of which evaluate": evaluate,
        "rest of execute": spans.get("execute", 0.0) - training,
        "report": spans.get("report", 0.0),
    }
    phases["other"] = wall - sum(phases[p] for p in PHASES if p not in ("other", "of which evaluate"))
    phases["imported torch._dynamo"] = spans["imported torch._dynamo"]
    phases["imported scipy.stats"] = spans["imported scipy.stats"]
    return phases


def machine() -> str:
    """The CPU as bench_cpu.py describes it: model, cores, the extensions that decide its speed."""
    from bench_cpu import cpu_description  # imports torch: in this parent process only

    m = cpu_description()
    extensions = " ".join(name for name in ("avx2", "avx512", "avx512_bf16", "amx") if m[name])
    limits = "".join(f"; {k}={v}" for k, v in m["isa_limits"].items())
    return f"{m['model']}; {m['usable_cores']} cores; {extensions}; PyTorch CPU capability {m['torch_cpu_capability']}{limits}"


def main() -> None:
    """Time the command (and the baseline's) `--repeats` times in alternation; print and save medians."""
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--baseline-src", type=Path, help="a second source tree (another commit's src/) to alternate with"
    )
    parser.add_argument("--label", default="", help="a name for this command in the JSON")
    parser.add_argument("--json", type=Path, help="append the results (a list of entries) to this JSON file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the cnnlab command line")
    args = parser.parse_args()
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        parser.error("give the cnnlab command after --")
    if any(arg == "--runs-dir" or arg.startswith("--runs-dir=") for arg in argv):
        parser.error("leave out --runs-dir: each repetition's run folders go to a temporary folder")
    trees = {"this tree": SRC} | ({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as runs_dir:
        for _ in range(args.repeats):
            for name, src in trees.items():
                results[name].append(run_once(src, argv, Path(runs_dir)))
    print(f"cnnlab {' '.join(argv)}  ({machine()}; medians of {args.repeats})")
    print(f"| tree | total s | {' | '.join(PHASES)} | torch._dynamo | scipy.stats |")
    print("|---|---:|" + "---:|" * len(PHASES) + "---|---|")
    medians = {}
    for name, runs in results.items():
        medians[name] = {key: statistics.median(run[key] for run in runs) for key in ("total", *PHASES)}
        cells = " | ".join(f"{medians[name][p]:.2f}" for p in PHASES)
        imported = [("yes" if runs[0][k] else "no") for k in ("imported torch._dynamo", "imported scipy.stats")]
        print(f"| {name} | {medians[name]['total']:.2f} | {cells} | {' | '.join(imported)} |")
    if args.json:
        entries = json.loads(args.json.read_text()) if args.json.exists() else []
        entries.append({"label": args.label, "command": argv, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                        "machine": machine(), "repeats": args.repeats, "medians": medians, "runs": results})  # fmt: skip
        args.json.write_text(json.dumps(entries, indent=1))


if __name__ == "__main__":
    main()
