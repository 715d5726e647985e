"""GPU benchmark: the whole seed comparison (3 models x 12 epochs x 60,000 images, validation after
every epoch) with cnnlab's defaults, against plain eager PyTorch fp32 on the same GPU.

Runs unattended on a CUDA machine; writes a JSON of results and prints a Markdown section for
BENCHMARKS.md. Usage (data: a folder with fashion-mnist/ IDX files):

    python benchmarks/bench_gpu.py --data-dir DATA [--epochs 12] [--out results.json] [--cudnn-benchmark]
    python benchmarks/bench_gpu.py --data-dir DATA --device cpu --epochs 1 --baseline-steps 2 \
        --limit-train 512 --limit-test 500        # a smoke test of the script, on the CPU

cnnlab: its network (`engine.new_model`) and its training step (`engine.build_train_step`, with
`--compile` auto (cnnlab's default: one CUDA graph of eager kernels), on (torch.compile too), off,
or a torch.compile mode to try instead of cnnlab's own settings), trained by
`engine.train` itself (with `compile_mode=` for the mode comparison). The peer: peers/torch_peer.py, timed per step.
`--cudnn-benchmark` turns on cuDNN's autotuning for the whole process (cnnlab leaves it off).

Timing discipline: compile/warm-up time is reported separately from training time; training wall
time is measured with CUDA synchronisation at epoch boundaries (as `cnnlab` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import torch

from cnnlab.catalog import load_spec
from cnnlab.config import DataSelection, HardwareRequest, Recipe
from cnnlab.datasets import load_dataset
from cnnlab.engine import DeviceData, train
from cnnlab.hardware import resolve_hardware
from cnnlab.models import summarize
from peers import torch_peer


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, which runs synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MODELS = ["convnet3", "convnet5", "convnet7"]


def eager_pytorch_epoch_seconds(name: str, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """The PyTorch peer (plain eager fp32, pytorch/examples' loop with the data already on the GPU):
    per-batch .item() of the loss, torch.optim.Adam; returns the extrapolated seconds per 60k epoch."""
    device = images.device
    torch.manual_seed(0)
    model = torch_peer.build(name).to(device)
    optimizer = torch_peer.make_optimizer(model)
    order = torch.randperm(len(images), device=device)
    timings = []
    for i in range(steps + 5):
        index = order[(i * 128) % (len(images) - 128) :][:128]
        data, target = torch_peer.to_input(images[index]), labels[index]
        synchronize(device)
        start = time.perf_counter()
        torch_peer.train_step(model, optimizer, data, target)  # .item(): the per-batch logging every example does
        synchronize(device)
        if i >= 5:
            timings.append(time.perf_counter() - start)
    timings.sort()
    return timings[len(timings) // 2] * math.ceil(60000 / 128)


def run_cnnlab(name: str, data: DeviceData, args, compile_setting: str) -> dict:
    """cnnlab's defaults on one model: a warm-up epoch (compilation), then the timed full run.

    `compile_setting` is auto/on/off, or a torch.compile mode to try instead of the default one
    (compiled, without the whole-step CUDA graph)."""
    mode = "default"
    if compile_setting not in ("auto", "on", "off"):
        compile_setting, mode = "on", compile_setting
    hardware = resolve_hardware(HardwareRequest(device=args.device, compile=compile_setting))
    if mode != "default":
        hardware = dataclasses.replace(hardware, cuda_graph=False)
    device = torch.device(hardware.device)
    spec = load_spec(name)
    splits = data.splits(0)
    started = time.perf_counter()
    train(spec, Recipe(epochs=1), 0, splits, hardware, compile_mode=mode)
    warm_seconds = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(spec, Recipe(epochs=args.epochs), 0, splits, hardware, compile_mode=mode)
    synchronize(device)
    wall = time.perf_counter() - started
    epoch_seconds = [r.train_seconds + r.val_seconds for r in result.history]
    later = epoch_seconds[1:] or epoch_seconds
    steady = sorted(later)[len(later) // 2]
    train_seconds = sum(r.train_seconds for r in result.history)
    flops = summarize(spec).training_flops * len(splits.train_images) * args.epochs
    return dict(
        precision=hardware.precision,
        compiled=hardware.compiled,
        compile_mode=mode,
        cuda_graph=hardware.cuda_graph,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        channels_last=hardware.channels_last,
        warmup_seconds=warm_seconds,
        wall_seconds=wall,
        train_seconds=train_seconds,
        val_seconds=sum(r.val_seconds for r in result.history),
        median_epoch_seconds=steady,
        first_epoch_seconds=epoch_seconds[0],
        samples_per_second=result.history[-1].samples_per_second,
        test_accuracy=result.test.accuracy,
        final_train_accuracy=result.history[-1].accuracy,
        max_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        tflops_per_second=flops / train_seconds / 1e12,
        speedup_vs_eager=None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--baseline-steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    parser.add_argument("--compile", default="auto")
    parser.add_argument("--limit-train", type=int, default=None, help="smoke tests only")
    parser.add_argument("--limit-test", type=int, default=None, help="smoke tests only")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test)")
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN time its algorithms for each shape (cnnlab's default leaves it off)",
    )
    args = parser.parse_args()
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # a per-process switch: cnnlab itself leaves it off
    device = torch.device(args.device)
    selection = DataSelection("fashion-mnist", str(args.data_dir), args.limit_train, args.limit_test)
    data = DeviceData(load_dataset(selection.dataset, data_dir=args.data_dir, progress=False), selection, device)
    results: dict = {
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke test)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "epochs": args.epochs,
        "models": {},
    }

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2))

    for name in MODELS:
        results["models"][name] = {
            "eager_fp32_epoch_seconds": eager_pytorch_epoch_seconds(
                name, data.train_images, data.train_labels, args.baseline_steps
            )
        }
        print(name, results["models"][name], flush=True)
        save()

    total_train = 0.0
    for name in MODELS:
        entry = results["models"][name]
        # Fall back to compiling without CUDA graphs, then to eager, if a setting fails.
        for compile_setting in dict.fromkeys([args.compile, "reduce-overhead", "off"]):
            try:
                entry.update(run_cnnlab(name, data, args, compile_setting))
                break
            except Exception as exc:  # noqa: BLE001 - recorded, then the fallback runs
                entry[f"error_compile_{compile_setting}"] = f"{type(exc).__name__}: {exc}"[:2000]
                print(
                    name, "failed with compile", compile_setting, entry[f"error_compile_{compile_setting}"], flush=True
                )
        if "median_epoch_seconds" in entry:
            entry["speedup_vs_eager"] = entry["eager_fp32_epoch_seconds"] / entry["median_epoch_seconds"]
        total_train += entry.get("wall_seconds", float("nan"))
        print(name, json.dumps(entry), flush=True)
        save()
    results["total_wall_seconds"] = total_train
    save()
    print(
        f"\nWhole comparison ({len(MODELS)} models x {args.epochs} epochs x 60,000 images, validation each "
        f"epoch): {total_train:.1f} s of training wall time on {results['gpu']}"
    )
    print("| model | eager fp32 s/epoch | cnnlab s/epoch | speed-up | samples/s | TFLOP/s | test acc | warm-up s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, e in results["models"].items():
        if "median_epoch_seconds" not in e:
            continue
        print(
            f"| {name} | {e['eager_fp32_epoch_seconds']:.2f} | {e['median_epoch_seconds']:.2f} | "
            f"{e['speedup_vs_eager']:.1f}x | {e['samples_per_second']:,.0f} | {e['tflops_per_second']:.1f} | "
            f"{e['test_accuracy']:.4f} | {e['warmup_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
