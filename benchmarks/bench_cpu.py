"""CPU benchmark: steady-state training speed of cnnlab's defaults against plain eager PyTorch and
Keras 3 (the seed notebook's own model code), measured side by side in one run.

Three peers train each seed model (convnet3, convnet5, convnet7) on Fashion-MNIST batches of 128:

- cnnlab: its training step as `engine.train` builds it (`engine.new_model`, Keras Adam,
  `engine.build_train_step`), with `Recipe()` and `HardwareRequest()`'s defaults resolved for this
  machine; one timed step is `step(index)` for 128 random indices.
- eager PyTorch: benchmarks/peers/torch_peer.py, fp32 as pytorch/examples mnist/main.py writes it
  (hand-written nn.Module, F.dropout, log_softmax + nll_loss, torch.optim.Adam(lr=1e-3, eps=1e-7),
  `loss.item()` every batch, the float input made per batch from the uint8 images).
- Keras: benchmarks/peers/keras_peer.py in its own interpreter (TensorFlow + Keras), kept alive for
  the whole run so each model compiles once; one timed step is one `train_on_batch`.

Timing discipline (the machine may be shared and noisy): warm-up first (Keras's build and compile
reported separately), then `--rounds` rounds in which every peer of every model runs
`--steps-per-round` timed steps in turn (the order rotates each round); each peer's number is the
median of all its timed steps, so a slow spell hits every peer alike. In the same run it measures
the fp32 and bf16 matmul rates, cnnlab's evaluation time on the 10,000 test images and the peak
RSS of a cnnlab process per model (a short child process: load data, train, evaluate).

    python benchmarks/bench_cpu.py                       # the full benchmark (about 10 minutes on 2 cores)
    python benchmarks/bench_cpu.py --quick --models convnet7
    python benchmarks/bench_cpu.py --append BENCHMARKS.md --json benchmarks/results/cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import queue
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import cnnlab
from cnnlab.catalog import load_spec
from cnnlab.config import DataSelection, Hardware, HardwareRequest, Recipe
from cnnlab.datasets import Dataset, load_dataset
from cnnlab.engine import DeviceData, Splits, TrainStep, build_train_step, evaluate, new_model
from cnnlab.hardware import cpu_name, keep_freed_memory_for_reuse, resolve_hardware
from cnnlab.models import summarize
from cnnlab.optim import KerasAdam
from peers import torch_peer

MODELS = ["convnet3", "convnet5", "convnet7"]
BATCH = 128
EPOCH_IMAGES = 60_000
REPO = Path(__file__).resolve().parents[1]
KERAS_PEER = Path(__file__).resolve().parent / "peers" / "keras_peer.py"
DEFAULT_KERAS_PYTHON = Path("/work/venv-bench/bin/python")
PEERS = ("cnnlab", "eager", "keras")
OPENMP_ENV_PREFIXES = ("OMP_", "GOMP_", "KMP_")  # libgomp (PyTorch's wheels) and Intel's OpenMP


@dataclass
class Settings:
    """How long to measure; `--quick` shrinks everything to about two minutes in all."""

    models: list[str]
    rounds: int = 12
    steps_per_round: int = 5
    warmup_steps: int = 5
    eval_repeats: int = 3
    eval_images: int | None = None  # time evaluate on this many test images and scale to all (quick)
    bf16_budget_seconds: float = 3.0
    keras: bool = True
    keras_python: str | None = None
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_run(cls, models: list[str]) -> Settings:
        return cls(
            models,
            rounds=3,
            steps_per_round=2,
            warmup_steps=2,
            eval_repeats=1,
            eval_images=2000,
            bf16_budget_seconds=2.0,
            quick=True,
        )


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the results table."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Timing a training step in this process (cnnlab's, or the eager PyTorch peer's)


class BatchIndices:
    """Batches of 128 random indices from a shuffled epoch, drawn outside the timed region."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(n, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.position + BATCH > self.n:
            self.order, self.position = torch.randperm(self.n, generator=self.generator), 0
        self.position += BATCH
        return self.order[self.position - BATCH : self.position]


class TorchPeer:
    """A training step in this process, timed step by step (the CPU runs it synchronously)."""

    def __init__(self, step: Callable[[torch.Tensor], object], n_images: int, seed: int) -> None:
        self.step, self.indices = step, BatchIndices(n_images, seed)

    def time_steps(self, steps: int) -> list[float]:
        seconds = []
        for _ in range(steps):
            index = self.indices.next()
            started = time.perf_counter()
            self.step(index)
            seconds.append(time.perf_counter() - started)
        return seconds


def eager_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor
) -> Callable[[torch.Tensor], float]:
    """The PyTorch peer's training step on a batch made from the uint8 images."""

    def step(index: torch.Tensor) -> float:
        return torch_peer.train_step(model, optimizer, torch_peer.to_input(images[index]), labels[index])

    return step


# ---------------------------------------------------------------------------------------------
# The Keras peer: a long-lived child process speaking keras_peer.py's line protocol.


class KerasPeerError(RuntimeError):
    """The Keras peer failed to start or to answer; the benchmark goes on without it."""


class KerasPeer:
    """benchmarks/keras_peer.py under an interpreter with TensorFlow; stderr goes to a log file."""

    def __init__(self, python: str, data_folder: Path, seed: int, timeout_s: float = 900.0) -> None:
        self.timeout_s = timeout_s
        self.stderr_path = data_folder / "keras_peer.stderr.txt"
        self._stderr = self.stderr_path.open("w")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [python, str(KERAS_PEER), str(data_folder), "--seed", str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.info = self._reply()
        except KerasPeerError:
            self.close()
            raise

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)  # the peer exited

    def _reply(self) -> dict:
        try:
            line = self._lines.get(timeout=self.timeout_s)
        except queue.Empty:
            raise KerasPeerError(f"no answer from the Keras peer in {self.timeout_s:.0f} s") from None
        if line is None:
            raise KerasPeerError(f"the Keras peer exited (code {self.process.wait()}): {self.stderr_tail()}")
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            raise KerasPeerError(f"the Keras peer answered {line.strip()[:200]!r}, not JSON") from None
        if not message.get("ok"):
            raise KerasPeerError(f"the Keras peer failed: {message.get('error')}")
        return message

    def request(self, line: str) -> dict:
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise KerasPeerError(f"the Keras peer is gone ({exc}): {self.stderr_tail()}") from None
        return self._reply()

    def stderr_tail(self, lines: int = 5) -> str:
        self._stderr.flush()
        text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no stderr)"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stderr.close()


class KerasModelPeer:
    """One model of the Keras peer, with the same `time_steps` as TorchPeer."""

    def __init__(self, peer: KerasPeer, name: str) -> None:
        self.peer, self.name = peer, name

    def time_steps(self, steps: int) -> list[float]:
        return self.peer.request(f"{self.name} {steps}")["seconds"]


def find_keras_python(requested: str | None) -> tuple[str | None, str]:
    """The interpreter to run keras_peer.py with, or None and why Keras is skipped."""
    if requested:
        return (requested, "") if Path(requested).exists() else (None, f"--keras-python {requested} does not exist")
    candidates = [str(DEFAULT_KERAS_PYTHON)] if DEFAULT_KERAS_PYTHON.exists() else []
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:  # `pip install -e .[bench]` in this venv
        candidates.append(sys.executable)
    for python in candidates:
        check = subprocess.run(
            [python, "-c", "import tensorflow, keras"],
            capture_output=True,
            text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        if check.returncode == 0:
            return python, ""
    if not candidates:
        return None, (
            f"Keras skipped: {DEFAULT_KERAS_PYTHON} is missing and TensorFlow is not installed here "
            "(pip install -e .[bench], or pass --keras-python)"
        )
    return None, f"Keras skipped: TensorFlow/Keras failed to import under {', '.join(candidates)}"


# ---------------------------------------------------------------------------------------------
# The machine


def cpu_description() -> dict:
    """CPU model, cores and the vector/matrix extensions that decide the matmul rates."""
    flags: set[str] = set()
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if key.strip() == "flags":
                flags = set(value.split())
                break
    return {
        "model": cpu_name(),
        # Same flags, different cores: the vendor's family and model tell them apart (AMD family 25: Zen 3 and 4, 26: Zen 5).
        "family_model": f"family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}",
        "vector_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # Set to emulate a lesser CPU kind (both peers' oneDNN and PyTorch's own kernels obey them).
        "isa_limits": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
        # How PyTorch's OpenMP threads wait between parallel regions: part of its step time, not TensorFlow's.
        "openmp_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(OPENMP_ENV_PREFIXES)},
        "avx2": "avx2" in flags,
        "avx512": any(f.startswith("avx512") for f in flags),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": any(f.startswith("amx") for f in flags),
    }


def cpu_pressure() -> str:
    """Load average and (where the kernel has it) CPU pressure: how busy the shared machine was."""
    load = "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    with contextlib.suppress(OSError, IndexError):
        some = Path("/proc/pressure/cpu").read_text().split()[1]
        return f"{load}, CPU pressure {some}"
    return load


def matmul_gflops(dtype: torch.dtype, n: int, budget_seconds: float, max_reps: int = 7) -> tuple[float, int]:
    """torch.mm rate (GFLOP/s, median over reps) for n x n operands, stopping once `budget_seconds` is spent."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up
    seconds, spent = [], 0.0
    while len(seconds) < max_reps and (spent < budget_seconds or len(seconds) < 1):
        started = time.perf_counter()
        torch.mm(a, b)
        seconds.append(time.perf_counter() - started)
        spent += seconds[-1]
    return 2 * n**3 / statistics.median(seconds) / 1e9, len(seconds)


def bf16_matmul_gflops(budget_seconds: float) -> tuple[float, int]:
    """bf16 is emulated (slow) without AVX512-BF16/AMX: grow the size only while one mm stays short."""
    n = 256
    rate, _ = matmul_gflops(torch.bfloat16, n, 0.0, max_reps=1)
    while n < 2048 and 2 * (2 * n) ** 3 / (rate * 1e9) < budget_seconds / 8:
        n *= 2
    rate, _ = matmul_gflops(torch.bfloat16, n, budget_seconds)
    return rate, n


def peak_rss_mib() -> float:
    """This process's peak resident set size: VmHWM on Linux, else getrusage (psutil on Windows).

    Linux's getrusage ru_maxrss survives fork and exec, so a child started by a big parent would
    report the parent's peak; VmHWM belongs to the process's own address space."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# ---------------------------------------------------------------------------------------------
# cnnlab


@dataclass
class CnnlabModel:
    """cnnlab's training step for one model, built as engine.train builds it."""

    name: str
    step: TrainStep
    model: nn.Module
    splits: Splits
    hardware: Hardware
    recipe: Recipe = field(default_factory=Recipe)


def cpu_hardware() -> Hardware:
    """cnnlab's defaults (`HardwareRequest()`) resolved for this machine, which must be the CPU,
    with the allocator setting cnnlab makes before training on it (process-wide)."""
    hardware = resolve_hardware(HardwareRequest())
    if torch.device(hardware.device).type != "cpu":
        raise SystemExit("bench_cpu.py measures the CPU; this machine resolves to CUDA (use bench_gpu.py)")
    keep_freed_memory_for_reuse()
    return hardware


def build_cnnlab(name: str, data: DeviceData, seed: int) -> CnnlabModel:
    """The model, Keras Adam and the training step as `engine.train` makes them, with the defaults."""
    recipe, hardware = Recipe(), cpu_hardware()
    splits = data.splits(seed)
    torch.manual_seed(seed)
    model = new_model(load_spec(name), seed, hardware)
    optimizer = KerasAdam(
        model.parameters(), lr=recipe.learning_rate, beta_1=recipe.beta_1, beta_2=recipe.beta_2, epsilon=recipe.epsilon
    )
    model.train()
    step = build_train_step(model, optimizer, hardware, splits.train_images, splits.train_labels, recipe.batch_size)
    return CnnlabModel(name, step, model, splits, hardware, recipe)


def device_data(dataset: Dataset) -> DeviceData:
    """The whole Fashion-MNIST run's data on the CPU, as `cnnlab compare` would hold it."""
    selection = DataSelection(dataset.name)
    return DeviceData(dataset, selection, torch.device(cpu_hardware().device))


def evaluation_seconds(cnnlab_model: CnnlabModel, repeats: int, images: int | None) -> float:
    """Median wall time of `evaluate` on the test split (it puts the model in eval mode), after a
    warm-up batch. With `images`, only that many are timed and the time is scaled to the whole
    split: evaluation runs in equal batches of 1000, so its time is proportional to the images."""
    m, splits = cnnlab_model, cnnlab_model.splits
    batch = m.recipe.eval_batch_size
    evaluate(m.model, splits.val_images[:batch], splits.val_labels[:batch], m.hardware, batch)
    used = min(images or len(splits.val_images), len(splits.val_images))
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        evaluate(m.model, splits.val_images[:used], splits.val_labels[:used], m.hardware, batch)
        seconds.append(time.perf_counter() - started)
    m.model.train()
    return statistics.median(seconds) * len(splits.val_images) / used


def rss_probe(name: str, data_dir: Path, seed: int) -> None:
    """Child-process mode: what one cnnlab process training `name` holds at its peak, printed as JSON."""
    data = device_data(load_dataset("fashion-mnist", data_dir=data_dir, progress=False))
    m = build_cnnlab(name, data, seed)
    TorchPeer(m.step, len(m.splits.train_images), seed).time_steps(2)
    batch = m.recipe.eval_batch_size  # one full evaluation batch: evaluation's peak is per batch
    evaluate(m.model, m.splits.val_images[:batch], m.splits.val_labels[:batch], m.hardware, batch)
    print(json.dumps({"model": name, "peak_rss_mib": peak_rss_mib()}))


def measure_rss(name: str, data_dir: Path, seed: int) -> float | None:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--rss-probe",
        name,
        "--data-dir",
        str(data_dir),
        "--seed",
        str(seed),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        log(f"  peak RSS probe for {name} failed: {result.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mib"]


# ---------------------------------------------------------------------------------------------
# The run


def summary_of(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
    return {
        "median_ms": statistics.median(seconds) * 1e3,
        "p25_ms": q[0] * 1e3,
        "p75_ms": q[2] * 1e3,
        "min_ms": min(seconds) * 1e3,
        "max_ms": max(seconds) * 1e3,
        "n": len(seconds),
    }


def run(settings: Settings, data_dir: Path) -> dict:
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join([sys.executable] + sys.argv),
        "settings": asdict(settings),
        "machine": cpu_description(),
        "pressure_start": cpu_pressure(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "cnnlab": cnnlab.__version__,
        },
        "notes": [],
        "models": {},
    }
    started = time.perf_counter()
    if keep_freed_memory_for_reuse():
        results["notes"].append(
            "cnnlab keeps freed memory for reuse before training on the CPU (`hardware.keep_freed_memory_for_reuse`, "
            "glibc's mmap and trim thresholds); it is process-wide, so the eager peer, in the same process, gets it too."
        )
    if os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive":
        note = (
            "OMP_WAIT_POLICY=PASSIVE: PyTorch's OpenMP threads sleep between parallel regions, which slows both "
            "PyTorch peers (cnnlab's convnet7 step by 27-43% on a quiet 2-core machine; BENCHMARKS.md, the OpenMP "
            "wait policy) and not Keras, whose TensorFlow threads are its own. Unset it to compare peers."
        )
        results["notes"].append(note)
        log(note)
    machine = results["machine"]
    log(f"machine: {machine['model']}, {machine['usable_cores']} cores, {results['pressure_start']}")
    data = device_data(load_dataset("fashion-mnist", data_dir=data_dir, progress=False))
    train_images, train_labels = data.train_images[:EPOCH_IMAGES], data.train_labels[:EPOCH_IMAGES]
    with tempfile.TemporaryDirectory(prefix="bench_cpu_") as temp:
        keras_peer = start_keras(settings, train_images, train_labels, Path(temp), results)
        try:
            measure(settings, data, train_images, train_labels, keras_peer, results, data_dir)
        finally:
            if keras_peer is not None:
                keras_peer.close()
    results["pressure_end"] = cpu_pressure()
    results["wall_seconds"] = time.perf_counter() - started
    log(f"done in {results['wall_seconds']:.0f} s; {results['pressure_end']}")
    return results


def start_keras(
    settings: Settings, images: torch.Tensor, labels: torch.Tensor, folder: Path, results: dict
) -> KerasPeer | None:
    if not settings.keras:
        results["notes"].append("Keras not measured (--no-keras).")
        return None
    python, why = find_keras_python(settings.keras_python)
    if python is None:
        results["notes"].append(why)
        log(why)
        return None
    np.save(folder / "train_images.npy", images.numpy())
    np.save(folder / "train_labels.npy", labels.numpy())
    log(f"starting the Keras peer under {python} ...")
    started = time.perf_counter()
    try:
        peer = KerasPeer(python, folder, settings.seed)
    except (KerasPeerError, OSError) as exc:
        note = f"Keras skipped: {exc}"
        results["notes"].append(note)
        log(note)
        return None
    results["keras_peer"] = {"python": python, "start_seconds": time.perf_counter() - started, **peer.info}
    results["versions"].update(tensorflow=peer.info["tensorflow"], keras=peer.info["keras"])
    log(
        f"  TensorFlow {peer.info['tensorflow']}, Keras {peer.info['keras']} "
        f"(import {peer.info['import_seconds']:.1f} s)"
    )
    return peer


def measure(
    settings: Settings,
    data: DeviceData,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    keras_peer: KerasPeer | None,
    results: dict,
    data_dir: Path,
) -> None:
    """Matmul rates, warm-up, the interleaved rounds, evaluation time and peak RSS, into `results`."""
    fp32_start, _ = matmul_gflops(torch.float32, 2048, 2.0)
    bf16_rate, bf16_n = bf16_matmul_gflops(settings.bf16_budget_seconds)
    log(f"matmul: fp32 {fp32_start:.1f} GFLOP/s (2048), bf16 {bf16_rate:.1f} GFLOP/s ({bf16_n})")
    peers, cnnlab_models = build_peers(settings, data, train_images, train_labels, keras_peer, results)
    times, round_medians = interleave(settings, peers, results)
    fp32_end, _ = matmul_gflops(torch.float32, 2048, 2.0)
    results["matmul"] = {
        "fp32_gflops_start": fp32_start,
        "fp32_gflops_end": fp32_end,
        "fp32_gflops": max(fp32_start, fp32_end),
        "fp32_size": 2048,
        "bf16_gflops": bf16_rate,
        "bf16_size": bf16_n,
    }
    for name in settings.models:
        entry = results["models"][name]
        for peer_name, seconds in times[name].items():
            entry[peer_name] = summary_of(seconds)
            entry[peer_name]["seconds"] = seconds
        cnnlab_s = statistics.median(times[name]["cnnlab"])
        for peer_name in ("keras", "eager"):
            if times[name].get(peer_name):
                entry[f"speedup_vs_{peer_name}"] = statistics.median(times[name][peer_name]) / cnnlab_s
                # The same ratio taken round by round: robust to the machine's load drifting.
                entry[f"speedup_vs_{peer_name}_per_round_median"] = statistics.median(
                    p / c for p, c in zip(round_medians[name][peer_name], round_medians[name]["cnnlab"])
                )
        gflops = entry["training_flops_per_sample"] * BATCH / cnnlab_s / 1e9
        entry["cnnlab_gflops"] = gflops
        entry["fraction_of_fp32_matmul"] = gflops / results["matmul"]["fp32_gflops"]
        entry["fraction_of_bf16_matmul"] = gflops / bf16_rate
        log(f"{name}: timing evaluate on the test images ...")
        entry["eval_seconds"] = evaluation_seconds(cnnlab_models[name], settings.eval_repeats, settings.eval_images)
        entry["steps_per_epoch"] = math.ceil(EPOCH_IMAGES / BATCH)
        entry["epoch_seconds_with_validation"] = entry["steps_per_epoch"] * cnnlab_s + entry["eval_seconds"]
    results["bench_process_peak_rss_mib"] = peak_rss_mib()  # all models and both torch peers together
    for name in settings.models:
        log(f"{name}: peak RSS probe (a cnnlab process: load data, train, evaluate) ...")
        results["models"][name]["peak_rss_mib"] = measure_rss(name, data_dir, settings.seed)


Peer = TorchPeer | KerasModelPeer


def build_peers(
    settings: Settings,
    data: DeviceData,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    keras_peer: KerasPeer | None,
    results: dict,
) -> tuple[dict[str, dict[str, Peer]], dict[str, CnnlabModel]]:
    """Every model's peers, each warmed up (Keras: built, compiled and stepped) before any timing."""
    peers: dict[str, dict[str, Peer]] = {}
    cnnlab_models: dict[str, CnnlabModel] = {}
    for name in settings.models:
        entry = results["models"].setdefault(name, {})
        summary = summarize(load_spec(name))
        entry["training_flops_per_sample"] = summary.training_flops
        cnnlab_models[name] = m = build_cnnlab(name, data, settings.seed)
        entry["hardware"] = asdict(m.hardware)
        torch.manual_seed(settings.seed)
        eager_model = torch_peer.build(name)
        eager_params = torch_peer.parameter_count(eager_model)
        if eager_params != summary.trainable_params:  # the hand-written peer must be the same network
            raise SystemExit(f"eager {name} has {eager_params:,} parameters, the spec {summary.trainable_params:,}")
        optimizer = torch_peer.make_optimizer(eager_model)
        peers[name] = {
            "cnnlab": TorchPeer(m.step, len(m.splits.train_images), settings.seed),
            "eager": TorchPeer(
                eager_step(eager_model, optimizer, train_images, train_labels), len(train_images), settings.seed
            ),
        }
        for peer_name, peer in peers[name].items():
            started = time.perf_counter()
            peer.time_steps(settings.warmup_steps)
            entry[f"{peer_name}_warmup_seconds"] = time.perf_counter() - started
        if keras_peer is not None:
            try:
                built = keras_peer.request(f"build {name}")
                keras_model = KerasModelPeer(keras_peer, name)
                started = time.perf_counter()
                keras_model.time_steps(settings.warmup_steps)
                entry["keras_build"] = {**built, "warmup_steps_seconds": time.perf_counter() - started}
                entry["keras_warmup_seconds"] = (
                    built["build_seconds"] + built["first_step_seconds"] + entry["keras_build"]["warmup_steps_seconds"]
                )
                peers[name]["keras"] = keras_model
                log(
                    f"{name}: Keras build {built['build_seconds']:.1f} s + first step (compile) "
                    f"{built['first_step_seconds']:.1f} s"
                )
            except KerasPeerError as exc:
                results["notes"].append(f"Keras {name}: {exc}")
                log(f"Keras {name} failed: {exc}")
        log(f"{name}: warmed up ({', '.join(peers[name])})")
    return peers, cnnlab_models


def interleave(
    settings: Settings, peers: dict[str, dict[str, Peer]], results: dict
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[float]]]]:
    """The timed rounds: every peer of every model in turn, the order rotating; returns each peer's
    step times and its per-round medians."""
    times = {name: {peer: [] for peer in peers[name]} for name in settings.models}
    round_medians = {name: {peer: [] for peer in peers[name]} for name in settings.models}
    for r in range(settings.rounds):
        started = time.perf_counter()
        models = settings.models[r % len(settings.models) :] + settings.models[: r % len(settings.models)]
        for name in models:
            order = list(peers[name])
            order = order[r % len(order) :] + order[: r % len(order)]  # nobody always runs first
            for peer_name in order:
                try:
                    seconds = peers[name][peer_name].time_steps(settings.steps_per_round)
                except KerasPeerError as exc:
                    results["notes"].append(f"Keras {name} stopped in round {r + 1}: {exc}")
                    del peers[name][peer_name]
                    continue
                times[name][peer_name].extend(seconds)
                round_medians[name][peer_name].append(statistics.median(seconds))
        log(
            f"round {r + 1}/{settings.rounds} ({time.perf_counter() - started:.1f} s): "
            + "; ".join(
                f"{name} " + " ".join(f"{p} {1e3 * statistics.median(t):.0f}" for p, t in times[name].items() if t)
                for name in settings.models
            )
            + " ms"
        )
    return times, round_medians


# ---------------------------------------------------------------------------------------------
# Reporting


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(results: dict) -> str:
    header = (
        "| model | cnnlab ms/step | eager PyTorch ms/step | Keras ms/step | cnnlab/Keras speed-up | "
        "cnnlab/eager speed-up | cnnlab GFLOP/s | % of fp32 matmul | % of bf16 matmul | "
        "cnnlab s/epoch incl. validation | peak RSS |"
    )
    rows = [header, "| --- " + "| ---: " * 10 + "|"]
    for name, e in results["models"].items():
        if "cnnlab" not in e:
            continue
        ms = lambda peer, e=e: e.get(peer, {}).get("median_ms")
        rows.append(
            f"| {name} | {_fmt(ms('cnnlab'), '.1f')} | {_fmt(ms('eager'), '.1f')} | {_fmt(ms('keras'), '.1f')} | "
            f"{_fmt(e.get('speedup_vs_keras'), '.2f', 'x')} | {_fmt(e.get('speedup_vs_eager'), '.2f', 'x')} | "
            f"{e['cnnlab_gflops']:.1f} | {100 * e['fraction_of_fp32_matmul']:.0f}% | "
            f"{100 * e['fraction_of_bf16_matmul']:.0f}% | {e['epoch_seconds_with_validation']:.1f} | "
            f"{_fmt(e.get('peak_rss_mib'), '.0f', ' MiB')} |"
        )
    return "\n".join(rows)


def markdown_entry(results: dict) -> str:
    """A dated BENCHMARKS.md section: machine, versions, command, the table and what to know about it."""
    m, v, s, mm = results["machine"], results["versions"], results["settings"], results["matmul"]
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    quick = " (--quick: few steps, indicative only)" if s["quick"] else ""
    hardware = next(e["hardware"] for e in results["models"].values() if "hardware" in e)
    lines = [
        f"## CPU training throughput, {results['date']}{quick}",
        "",
        f"- Machine: {m['model']}, {m['usable_cores']} usable of {m['logical_cores']} logical cores, "
        f"torch threads {m['torch_threads']}; AVX2 {yes(m['avx2'])}, AVX-512 {yes(m['avx512'])} "
        f"(BF16 {yes(m['avx512_bf16'])}), AMX {yes(m['amx'])}; PyTorch CPU capability {m['torch_cpu_capability']}"
        + "".join(f"; {k}={v}" for k, v in m.get("isa_limits", {}).items())
        + f"; OpenMP environment: {', '.join(f'{k}={v}' for k, v in m.get('openmp_env', {}).items()) or 'none set'}.",
        f"- Other load on the machine: {results['pressure_start']} at the start; {results['pressure_end']} at the end.",
        f"- Versions: Python {v['python']}, torch {v['torch']}, cnnlab {v['cnnlab']}, "
        f"TensorFlow {v.get('tensorflow', 'n/a')}, Keras {v.get('keras', 'n/a')}.",
        f"- Command: `{results['command']}`",
        f"- Method: batch 128 on Fashion-MNIST; {s['warmup_steps']} warm-up steps per peer, then {s['rounds']} "
        f"interleaved rounds x {s['steps_per_round']} timed steps of every peer and model; medians. "
        f"cnnlab: `build_train_step` with `Recipe()` and `HardwareRequest()`'s defaults, resolved here to {hardware['precision']}, "
        f"{'channels_last' if hardware.get('channels_last') else 'NCHW'}, "
        f"{'compiled' if hardware['compiled'] else 'not compiled'}, {hardware['threads']} threads; "
        "eager PyTorch: pytorch/examples style fp32, torch.optim.Adam, `loss.item()` per batch; "
        "Keras: the seed's Sequential models, `train_on_batch`. Speed-up = peer time / cnnlab time.",
        f"- Matmul (torch.mm): fp32 {mm['fp32_gflops']:.1f} GFLOP/s ({mm['fp32_size']}^2; "
        f"{mm['fp32_gflops_start']:.1f} at the start, {mm['fp32_gflops_end']:.1f} at the end), "
        f"bf16 {mm['bf16_gflops']:.1f} GFLOP/s ({mm['bf16_size']}^2). GFLOP/s = training FLOPs "
        "(3 x forward conv/dense FLOPs) x 128 / median step.",
        "- s/epoch = 469 steps x median step + `evaluate` on the 10,000 test images"
        + (f" (timed on {s['eval_images']:,} and scaled)" if s["eval_images"] else "")
        + "; peak RSS: a separate cnnlab process per model (load data, train, evaluate a batch of 1000).",
    ]
    spread = [
        f"{name} "
        + ", ".join(f"{peer} {e[peer]['p25_ms']:.0f}-{e[peer]['p75_ms']:.0f}" for peer in PEERS if e.get(peer))
        for name, e in results["models"].items()
    ]
    lines.append(f"- Step-time interquartile ranges (ms): {'; '.join(spread)}.")
    per_round = [
        f"{name} "
        + ", ".join(
            f"vs {peer} {e[f'speedup_vs_{peer}_per_round_median']:.2f}x"
            for peer in ("keras", "eager")
            if f"speedup_vs_{peer}_per_round_median" in e
        )
        for name, e in results["models"].items()
    ]
    lines.append(f"- Speed-ups as the median of each round's ratio (robust to load drifting): {'; '.join(per_round)}.")
    if not (m["avx512_bf16"] or m["amx"]):
        lines.append(
            "- This CPU has no bf16 hardware (no AVX512-BF16/AMX): bf16 is emulated, so cnnlab keeps "
            "fp32 and the % of bf16 matmul column exceeds 100%."
        )
    keras = [
        f"{name} {e['keras_warmup_seconds']:.1f} s"
        for name, e in results["models"].items()
        if "keras_warmup_seconds" in e
    ]
    if keras:
        lines.append(
            f"- Keras warm-up (build + compile + first steps, not in the table): {', '.join(keras)}; "
            f"TensorFlow import {results['keras_peer']['import_seconds']:.1f} s."
        )
    lines += [f"- Note: {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n\n" + markdown_table(results) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
        temp = Path(f.name)
    temp.chmod(0o644)
    os.replace(temp, path)


def append_entry(path: Path, entry: str) -> None:
    existing = path.read_text() if path.exists() else "# Benchmarks\n"
    separator = "" if existing.endswith("\n\n") else ("\n" if existing.endswith("\n") else "\n\n")
    write_atomic(path, existing + separator + entry)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--data-dir", type=Path, default=REPO.parent / "shared" / "data", help="folder with fashion-mnist/ IDX files"
    )
    parser.add_argument("--models", nargs="+", default=MODELS, help="seed models to measure (space or comma separated)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="about two minutes: 3 rounds x 2 steps, evaluation timed on 2,000 test images",
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 12, quick 3)")
    parser.add_argument(
        "--steps-per-round", type=int, default=None, help="timed steps per peer per round (default 5, quick 2)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="untimed steps per peer first (default 5, quick 2)"
    )
    parser.add_argument("--no-keras", action="store_true", help="skip the Keras peer")
    parser.add_argument(
        "--keras-python",
        default=None,
        help=f"interpreter with TensorFlow for keras_peer.py (default {DEFAULT_KERAS_PYTHON}, "
        "else this one if it imports tensorflow)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument("--append", type=Path, default=None, help="append a dated Markdown entry to this file")
    parser.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)  # internal: child-process mode
    args = parser.parse_args()
    if args.rss_probe:
        rss_probe(args.rss_probe, args.data_dir, args.seed)
        return
    models = [m for item in args.models for m in item.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}")
    settings = Settings.quick_run(models) if args.quick else Settings(models)
    for option in ("rounds", "steps_per_round", "warmup_steps"):
        value = getattr(args, option)
        if value is not None:
            if value < 1:
                parser.error(f"--{option.replace('_', '-')} must be at least 1")
            setattr(settings, option, value)
    settings.keras, settings.keras_python, settings.seed = not args.no_keras, args.keras_python, args.seed

    results = run(settings, args.data_dir)
    table = markdown_table(results)
    print(table)
    for note in results["notes"]:
        print(f"Note: {note}")
    if args.json is not None:
        write_atomic(args.json, json.dumps(results, indent=2) + "\n")
        log(f"raw results: {args.json}")
    if args.append is not None:
        append_entry(args.append, markdown_entry(results))
        log(f"appended an entry to {args.append}")


if __name__ == "__main__":
    main()
