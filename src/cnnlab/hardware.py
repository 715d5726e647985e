"""Turning a `HardwareRequest` into concrete choices for this machine, once per run.

The choices and the measurements behind them are in BENCHMARKS.md: compilation and CUDA graphs
pay for themselves on a GPU and not on the CPU; channels_last (NHWC, Keras's own layout) feeds the
GPU's tensor cores and made convnet7's CPU step faster; bf16 is picked only where the hardware
computes it natively.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from pathlib import Path

import torch

from cnnlab.config import Hardware, HardwareRequest
from cnnlab.errors import ConfigError


def resolve_device(requested: str) -> torch.device:
    """'auto' picks CUDA when available; asking for CUDA without it is a user error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {requested}: no CUDA GPU is available to PyTorch here "
                f"(torch {torch.__version__}); use --device cpu or auto"
            )
        index = torch.device(requested).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device(requested)
    if requested == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got '{requested}'")


def _onednn_isa_limit() -> str:
    """The ISA oneDNN is kept to (`ONEDNN_MAX_CPU_ISA`, or its old name `DNNL_MAX_CPU_ISA`), upper
    case; "ALL" when unset."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX) and PyTorch may use it;
    elsewhere bf16 is emulated and slow. PyTorch kept to AVX2 (`ATEN_CPU_CAPABILITY=avx2`) or
    oneDNN kept below its bf16 instructions (`ONEDNN_MAX_CPU_ISA`) count as no bf16."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    if not any(getattr(torch.cpu, name, lambda: False)() for name in checks):
        return False
    onednn_isa = _onednn_isa_limit()
    onednn_has_bf16 = onednn_isa == "ALL" or any(word in onednn_isa for word in ("BF16", "FP16", "AMX", "AVX10"))
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and onednn_has_bf16


def cpu_has_amx() -> bool:
    """True where bf16 runs on AMX's tiles: the CPU has them and neither PyTorch nor oneDNN is kept
    below them (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`)."""
    if not (cpu_has_fast_bf16() and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()):
        return False
    onednn_isa = _onednn_isa_limit()
    return onednn_isa == "ALL" or "AMX" in onednn_isa  # e.g. AVX512_CORE_AMX, AVX10_1_512_AMX


def resolve_hardware(request: HardwareRequest) -> Hardware:
    """The request's `auto` choices made concrete for this machine."""
    device = resolve_device(request.device)
    on_cuda = device.type == "cuda"
    if request.precision == "auto":
        fast_bf16 = torch.cuda.is_bf16_supported() if on_cuda else cpu_has_fast_bf16()
        precision = "bf16" if fast_bf16 else "fp32"
    else:
        precision = request.precision
    # auto compiles nowhere: on CUDA the step's eager kernels are captured as one CUDA graph, since
    # compiling first costs more than it saves in runs of notebook length (BENCHMARKS.md, "GPU
    # round two": 17-20 s per model on a fresh machine against 1.9-3.3 s saved over 12 epochs).
    compiled = request.compile == "on"
    name = torch.cuda.get_device_name(device) if on_cuda else cpu_name()
    return Hardware(
        str(device),
        name,
        precision,
        compiled,
        channels_last=True,
        threads=request.threads or torch.get_num_threads(),
        cuda_graph=on_cuda and request.compile != "off",
        # One at a time unless asked: taking turns adds no parallelism on a CPU, and on a GPU the overlap
        # was measured for bare steps, not yet for whole runs (BENCHMARKS.md, "GPU round two").
        units_at_once=request.units_at_once or 1,
        # Faster in bf16 on the CPU only (fp32 there: 0.96x; BENCHMARKS.md, "Small convolutions as one
        # matrix product"); those that pad themselves only with AMX ("CPU kind 3").
        small_convs_as_matmul=device.type == "cpu" and precision == "bf16",
        padded_small_convs_as_matmul=device.type == "cpu" and precision == "bf16" and cpu_has_amx(),
        # Cheaper masks on the CPU in either precision (BENCHMARKS.md, "Compact dropout masks").
        compact_dropout_masks=device.type == "cpu",
    )


def check_available(hardware: Hardware) -> torch.device:
    """The recorded device, if this machine has it (a resumed run keeps its resolution)."""
    device = torch.device(hardware.device)
    if device.type == "cuda":
        resolve_device(hardware.device)
    return device


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def keep_freed_memory_for_reuse() -> bool:
    """Ask glibc's allocator to reuse freed memory instead of returning it to the system.

    By default glibc serves large blocks (from 128 KiB, a threshold it raises up to 32 MiB) with
    fresh pages from the system and returns them when freed, so each CPU training step page-faults
    its activations in again: that cost a quarter of convnet3's bf16 step (BENCHMARKS.md, "CPU kind
    2", the levers). Raising the mmap and trim
    thresholds keeps those pages in the process for the next step; the resident size then stays
    near its peak. Process-wide, like the thread count; does nothing (False) without glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    return False
