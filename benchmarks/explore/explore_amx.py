"""cnnlab's CPU step on an Intel Xeon with AMX (the third CPU kind): what runs where, and why its times wander.

Usage (from this folder): python explore_amx.py PART [MODELS]
  cores            bf16 and fp32 1024^2 matmul rates on one thread pinned to each core in turn, then on
                   both at once (one process per core): does one core run slower than the other?
  onednn MODELS    one process per model: the wall time of 4 cnnlab steps next to the time oneDNN's
                   verbose log gives its primitives in each, and the primitives of the last step by
                   time, with their GFLOP/s (convolutions and matmuls)
  rng MODELS       cnnlab's step with FastDropout's random words from PyTorch's generator (the default),
                   against words from NumPy's SFC64 seeded from it, and (a bound, not a lever) against
                   the same words every step, drawn once: 15 interleaved rounds x 5 steps
Default MODELS: convnet7,convnet5,convnet3 (comma separated).

The padded-convolution lever measured here first (convnet5's last convolution as one matrix product,
padding and all; this file's part `padded` at commit af71695 swapped the layer in by hand) is now a
switch: `python explore_cpu_rest.py step_ab bf16 convnet5 padded_small_convs_as_matmul` times it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import torch
from explore_bf16_levers import interleaved  # run from this folder, as every explore script
from explore_cpu_rest import default_step

import cnnlab.models as models
from cnnlab.config import HardwareRequest
from cnnlab.hardware import keep_freed_memory_for_reuse, resolve_hardware

SIZE = 1024


def matmul_rates(rounds: int = 8) -> str:
    """`rounds` pairs of bf16 / fp32 GFLOP/s on this process's threads."""
    a, b = torch.randn(SIZE, SIZE).bfloat16(), torch.randn(SIZE, SIZE).bfloat16()
    a32, b32 = a.float(), b.float()
    for _ in range(5):
        a @ b
    pairs = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        bf16 = (time.perf_counter() - start) / 20
        start = time.perf_counter()
        for _ in range(4):
            a32 @ b32
        fp32 = (time.perf_counter() - start) / 4
        pairs.append(f"{2 * SIZE**3 / bf16 / 1e9:.0f}/{2 * SIZE**3 / fp32 / 1e9:.0f}")
    return " ".join(pairs)


def cores() -> None:
    me = [sys.executable, __file__, "_rates"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for core in (0, 1, 0, 1):
        out = subprocess.run(["taskset", "-c", str(core), *me], env=env, capture_output=True, text=True).stdout
        print(f"core {core} alone, bf16/fp32 GFLOP/s: {out.strip()}", flush=True)
    both = [
        subprocess.Popen(["taskset", "-c", str(c), *me], env=env, stdout=subprocess.PIPE, text=True) for c in (0, 1)
    ]
    for core, process in enumerate(both):
        print(f"core {core} while core {1 - core} also multiplies: {process.communicate()[0].strip()}", flush=True)


def onednn_child(name: str) -> None:
    """Runs under ONEDNN_VERBOSE=1: steps marked on stdout between oneDNN's lines."""
    keep_freed_memory_for_reuse()
    step = default_step(name, resolve_hardware(HardwareRequest(device="cpu")))
    for _ in range(3):
        step()
    for i in range(4):
        start = time.perf_counter()
        step()
        print(f"STEP {i} {(time.perf_counter() - start) * 1000:.1f}", flush=True)


def _flops(kind: str, shape: str) -> int:
    conv = re.match(r"mb(\d+)_ic(\d+)oc(\d+)_ih\d+oh(\d+)kh(\d+)sh\d+dh\d+ph\d+_iw\d+ow(\d+)kw(\d+)", shape)
    if kind == "convolution" and conv:
        batch, cin, cout, out_h, kernel_h, out_w, kernel_w = map(int, conv.groups())
        return 2 * batch * cin * cout * out_h * out_w * kernel_h * kernel_w
    matmul = re.match(r"(\d+)x(\d+):\d+x(\d+)", shape)
    if kind == "matmul" and matmul:
        m, k, n = map(int, matmul.groups())
        return 2 * m * k * n
    return 0


def onednn(names: list[str]) -> None:
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    for name in names:
        out = subprocess.run(
            [sys.executable, __file__, "_onednn", name], env=env, capture_output=True, text=True
        ).stdout
        in_step: list[tuple[str, str, str, str, float]] = []
        for line in out.splitlines():
            if line.startswith("STEP"):
                _, index, wall = line.split()
                print(
                    f"{name} step {index}: {wall} ms, oneDNN primitives {sum(r[-1] for r in in_step):.1f} ms",
                    flush=True,
                )
                last, in_step = in_step, []
            elif ",exec,cpu," in line:
                fields = line.split(",")
                in_step.append((fields[5], fields[6], fields[7], fields[-2], float(fields[-1])))
        by_primitive: dict[tuple[str, str, str, str], float] = defaultdict(float)
        for kind, implementation, direction, shape, ms in last:
            by_primitive[(kind, implementation, direction, shape)] += ms
        for (kind, implementation, direction, shape), ms in sorted(by_primitive.items(), key=lambda kv: -kv[1])[:12]:
            rate = _flops(kind, shape) / ms / 1e6 if ms else 0.0
            print(f"  {ms:6.2f} ms {rate:6.0f} GFLOP/s {kind} {implementation} {direction} {shape}", flush=True)


def _sfc64_words(count: int) -> torch.Tensor:
    """`count` 64-bit words from NumPy's SFC64, seeded by two words of PyTorch's global generator."""
    seed = torch.empty(2, dtype=torch.int64).random_(-(2**63), None).numpy().view(np.uint64)
    return torch.from_numpy(np.random.SFC64(seed).random_raw(count).view(np.int64))


def rng(names: list[str]) -> None:
    keep_freed_memory_for_reuse()
    hardware = resolve_hardware(HardwareRequest(device="cpu"))
    torch_words = models._random_words

    def with_words(step, words):
        def run() -> None:
            models._random_words = words
            try:
                step()
            finally:
                models._random_words = torch_words

        return run

    drawn: dict[int, torch.Tensor] = {}

    def drawn_once(count: int) -> torch.Tensor:
        if count not in drawn:
            drawn[count] = torch_words(count)
        return drawn[count].clone()  # the masks are made from the words in place

    for name in names:
        arms = {
            "torch": with_words(default_step(name, hardware), torch_words),
            "sfc64": with_words(default_step(name, hardware), _sfc64_words),
            "drawn_once": with_words(default_step(name, hardware), drawn_once),
        }
        ms = {arm: seconds * 1000 for arm, seconds in interleaved(arms, rounds=15, per_round=5).items()}
        print(
            f"{name} {hardware.precision}: torch {ms['torch']:.2f} ms, sfc64 {ms['sfc64']:.2f} ms "
            f"({ms['torch'] / ms['sfc64']:.3f}x), drawn once {ms['drawn_once']:.2f} ms ({ms['torch'] / ms['drawn_once']:.3f}x)",
            flush=True,
        )


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else "cores"
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["convnet7", "convnet5", "convnet3"]
    if part == "_rates":
        print(matmul_rates())
    elif part == "_onednn":
        onednn_child(names[0])
    elif part in ("onednn", "rng"):
        torch.set_num_threads(2)
        globals()[part](names)
    elif part == "cores":
        cores()
    else:
        sys.exit(f"unknown part {part!r}: cores, onednn or rng")
