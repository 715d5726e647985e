"""Goal 1 on a GPU: does one step of N seeds trained together cost less than N one-seed steps?

GitHub issue "Speed, round two", goal 1 (aim: 5 seeds for at most 2x one seed's time on a GPU).
`explore_batched_seeds.py` answered it for the CPU (no); this times the same batched arms on CUDA,
where these small models are bound by kernel launches rather than arithmetic, against cnnlab's own
one-seed step with its GPU defaults (bf16, the whole step as one CUDA graph of eager kernels).

Arms, each one training step (forward, loss, backward, KerasAdam) on random uint8 images:
- `one`: cnnlab's `build_train_step` for one seed with `resolve_hardware`'s CUDA defaults (eager
  kernels, the whole step as one CUDA graph). N sequential seeds, what cnnlab runs today, cost N
  times this (the steps are independent).
- `one_compiled`: the same with `--compile on` (torch.compile, then the graph).
- `streams` / `streams_compiled`: N seeds' own `one` (or `one_compiled`) steps, each replayed on its
  own CUDA stream so that the GPU may overlap them: the same arithmetic as N separate runs.
- `groups` / `groups_graph`: the N seeds as channel groups (`explore_batched_seeds.GroupedSeeds`:
  grouped convolutions, batched dense layers, per-seed batch norm), eager, and captured as one CUDA graph.
- `vmap_graph`: `torch.func.vmap` over stacked weights (`VmapSeeds`), captured as one CUDA graph.

`--together convnet3 convnet5 convnet7` times instead one step of each of those models (seed 0)
one after another against the same on one stream each: the seed comparison's units run at once
(compiled too where `--arms` names `one_compiled`).

Timing: after warm-up (and capture), `--rounds` interleaved rounds of `--steps` steps per arm,
synchronised at both ends; the median ms per step. An arm that fails records its error and the
rest go on. Results go to `--out` (JSON) after each model. (The first run, 2026-11-27 13:17 UTC,
results/h200_compiled_batched_seeds_gpu.json, came before `--compile auto` stopped compiling: its
`one` is today's `one_compiled` and its `one_graph` today's `one`.)

    python benchmarks/explore/explore_batched_seeds_gpu.py --out results.json [--models ...] [--seeds 5 10]
    python benchmarks/explore/explore_batched_seeds_gpu.py --device cpu --rounds 1 --steps 1   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import explore_batched_seeds as cpu_probe  # noqa: E402  (puts the project's src/ on the path)

from cnnlab.catalog import load_spec  # noqa: E402
from cnnlab.config import Hardware, HardwareRequest  # noqa: E402
from cnnlab.engine import build_train_step, new_model  # noqa: E402
from cnnlab.hardware import resolve_hardware  # noqa: E402
from cnnlab.optim import KerasAdam  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OneSeed:
    """cnnlab's own step for `seed`, fed row `row` of each (N, B) index."""

    def __init__(self, spec, hardware: Hardware, images, labels, seed: int = 0, row: int = 0):
        model = new_model(spec, seed, hardware).train()
        self.step = build_train_step(model, KerasAdam(model.parameters()), hardware, images, labels, cpu_probe.BATCH)
        self.totals, self.row = self.step.totals, row

    def __call__(self, index: torch.Tensor) -> None:
        self.step(index[self.row])


class OnStreams:
    """Several independent steps, each enqueued on its own CUDA stream (or all on the current one)."""

    def __init__(self, steps: list, concurrent: bool):
        self.steps = steps
        self.streams = [torch.cuda.Stream() if concurrent else None for _ in steps]
        self.totals = torch.stack([s.totals for s in steps])

    def __call__(self, index: torch.Tensor) -> None:
        current = torch.cuda.current_stream()
        for step, stream in zip(self.steps, self.streams):
            if stream is None:
                step(index)
                continue
            stream.wait_stream(current)  # the index was made on the current stream
            with torch.cuda.stream(stream):
                step(index)
        for stream in self.streams:
            if stream is not None:
                current.wait_stream(stream)
        self.totals = torch.stack([s.totals for s in self.steps])


def to_device(arm, device: torch.device):
    """A CPU-built batched arm moved to `device`, its optimizer rebuilt there (KerasAdam makes its
    state eagerly, on the parameters' device)."""
    if isinstance(arm, cpu_probe.VmapSeeds):
        arm.params = {k: v.detach().to(device).requires_grad_(not arm.use_grad) for k, v in arm.params.items()}
        arm.buffers = {k: v.to(device) for k, v in arm.buffers.items()}
        arm.base.to(device)
        arm.optimizer = KerasAdam(list(arm.params.values()))
    else:
        arm.layers.to(device)
        arm.optimizer = KerasAdam(arm.layers.parameters())
    arm.totals = arm.totals.to(device)
    return arm


class Graphed:
    """An arm's whole step captured as one CUDA graph (as engine.GraphedTrainStep does for one seed)."""

    def __init__(self, arm, n: int, device: torch.device):
        self.arm, self.totals = arm, arm.totals
        self.static = torch.zeros(n, cpu_probe.BATCH, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, index: torch.Tensor) -> None:
        self.static.copy_(index)
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.arm(self.static)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.arm(self.static)
        self.graph.replay()


def build_arm(name: str, spec, n: int, hardware: Hardware, images, labels):
    device = torch.device(hardware.device)
    eager = dataclasses.replace(hardware, compiled=False, cuda_graph=False)
    compiled = dataclasses.replace(hardware, compiled=True)
    if name in ("one", "one_compiled"):
        return OneSeed(spec, compiled if name == "one_compiled" else hardware, images, labels)
    seeds = list(range(n))
    if name in ("streams", "streams_compiled"):
        chosen = compiled if name == "streams_compiled" else hardware
        return OnStreams([OneSeed(spec, chosen, images, labels, seed=s, row=s) for s in seeds], concurrent=True)
    if name.startswith("vmap"):
        arm = to_device(cpu_probe.VmapSeeds(spec, seeds, eager, images, labels), device)
    else:
        arm = to_device(cpu_probe.GroupedSeeds(spec, seeds, eager, images, labels), device)
    if name.endswith("graph"):
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        return Graphed(arm, n, device)
    return arm


def time_model(model: str, n: int, arms: list[str], hardware: Hardware, args) -> dict:
    spec = load_spec(model)
    builders = {a: lambda images, labels, a=a: build_arm(a, spec, n, hardware, images, labels) for a in arms}
    return time_arms(f"{model} N={n}", n, builders, hardware, args)


def time_together(models: list[str], hardware: Hardware, args) -> dict:
    """One step of each model, one after another on one stream, against each on its own stream."""

    def arm(concurrent: bool, compiled: bool):
        chosen = dataclasses.replace(hardware, compiled=compiled)
        return lambda images, labels: OnStreams(
            [OneSeed(load_spec(m), chosen, images, labels) for m in models], concurrent
        )

    arms = {"sequential": arm(False, False), "streams": arm(True, False)}
    if "one_compiled" in args.arms:
        arms |= {"sequential_compiled": arm(False, True), "streams_compiled": arm(True, True)}
    return time_arms("+".join(models), 1, arms, hardware, args, base="sequential")


def time_arms(label: str, n: int, builders: dict, hardware: Hardware, args, base: str = "one") -> dict:
    """Build each arm (`builders[name](images, labels)`), warm it up, then time the arms interleaved."""
    device = torch.device(hardware.device)
    images, labels = (t.to(device) for t in cpu_probe.fake_data())
    batches = [b.to(device) for b in cpu_probe.seed_batches(list(range(n)), cpu_probe.N_TRAIN // cpu_probe.BATCH)]
    built, out, cursor = {}, {}, 0
    for name, builder in builders.items():
        started = time.perf_counter()
        try:
            built[name] = builder(images, labels)
            for i in range(args.warmup):
                built[name](batches[i % len(batches)])
            synchronize(device)
            out[name] = {"setup_s": round(time.perf_counter() - started, 2)}
        except Exception as exc:  # noqa: BLE001 - recorded; the other arms go on
            built.pop(name, None)
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            print(f"{label} {name}: failed: {out[name]['error'][:300]}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, arm in built.items():
            synchronize(device)
            started = time.perf_counter()
            for _ in range(args.steps):
                arm(batches[cursor % len(batches)])
                cursor += 1
            synchronize(device)
            times[name].append((time.perf_counter() - started) * 1e3 / args.steps)
    one = statistics.median(times[base]) if times.get(base) else None
    for name, ms in times.items():
        med = statistics.median(ms)
        finite = bool(torch.isfinite(built[name].totals).all())
        out[name] |= {"median_ms": round(med, 4), "rounds_ms": [round(t, 4) for t in ms], "finite": finite}
        if one:
            out[name][f"x_{base}"] = round(med / one, 3)  # the aim: N seeds at most 2x one seed
        print(f"{label} {hardware.precision} {name:22s} {med:8.3f} ms/step"
              + (f"  = {med / one:5.2f} x {base}" if one else "")
              + ("" if finite else "  NON-FINITE"), flush=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["convnet3", "convnet5", "convnet7"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[5, 10], help="N values timed")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["one", "one_compiled", "streams", "streams_compiled", "groups_graph", "vmap_graph"],
    )
    parser.add_argument("--together", nargs="*", default=None, help="time these models' steps side by side")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="steps per arm per round")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    hardware = resolve_hardware(HardwareRequest(device=args.device, precision=args.precision))
    on_cuda = hardware.device.startswith("cuda")
    arms = args.arms if on_cuda else [a for a in args.arms if not a.endswith("graph") and "streams" not in a]
    results = {
        "question": "one step of N seeds trained together vs cnnlab's one-seed step, GPU",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if hardware.device.startswith("cuda") else hardware.device_name,
        "torch": torch.__version__,
        "hardware": dataclasses.asdict(hardware),
        "batch": cpu_probe.BATCH,
        "timing": {},
    }
    print(results["device"], torch.__version__, hardware, flush=True)
    jobs = [(f"{m}/N={n}", lambda m=m, n=n: time_model(m, n, arms, hardware, args)) for m in args.models
            for n in args.seeds]  # fmt: skip
    if args.together and on_cuda:
        jobs = [("+".join(args.together), lambda: time_together(args.together, hardware, args))]
    for key, job in jobs:
        results["timing"][key] = job()
        if args.out:
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(args.out)


if __name__ == "__main__":
    main()
