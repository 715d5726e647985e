"""Size: a spec's counts come from the spec alone, training's memory is estimated before anything is
allocated, and a spec too large for the machine is refused in one line, with no run folder left.

The estimate is checked against a measured peak: one real training step (and one evaluation) under
`torch.profiler` with `profile_memory=True`, which reports every allocation and free made through
PyTorch's CPU allocator (those of oneDNN's convolutions included); the peak of their running sum,
plus the tensors that existed before (weights, buffers, Adam's m, v and step counters), is the step's
peak. The synthetic batch tensors exist before and after and are left out of both sides.
"""

from __future__ import annotations

import math
import resource
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from cnnlab import memory
from cnnlab.api import plan_run
from cnnlab.catalog import builtin_models, load_spec
from cnnlab.config import DataSelection, Hardware, HardwareRequest, Recipe
from cnnlab.datasets import Dataset
from cnnlab.engine import build_train_step, evaluate, new_model
from cnnlab.errors import ConfigError, SpecError
from cnnlab.memory import check_fits_in_memory, estimate_training_memory, format_bytes
from cnnlab.models import build_model, spec_layer_counts, summarize
from cnnlab.optim import KerasAdam
from cnnlab.spec import parse_spec
from cnnlab_cli import cnnlab_command, run_cnnlab
from synthetic import learnable_arrays, learnable_tensors, write_dataset_folder

KERAS_FIXTURES = sorted((Path(__file__).parent / "fixtures" / "keras").glob("*.json"))
FP32_CPU = Hardware("cpu", "cpu", "fp32", compiled=False, channels_last=True, threads=torch.get_num_threads())


def _spec(layers: list[dict], input_shape=(28, 28, 1), num_classes: int = 10, name: str = "huge"):
    return parse_spec(
        {"name": name, "input_shape": list(input_shape), "num_classes": num_classes, "layers": layers},
        source=f"{name}.toml",
    )


def _dense(units: int, **extra) -> dict:
    return {"type": "Dense", "units": units, **extra}


# ---------------------------------------------------------------------------------------------
# Counts from the spec alone

# Small specs with every way a layer can own parameters (flags, padding, trailing softmax).
SMALL_SPECS = {
    "batchnorm_flags": [
        {"type": "Conv2D", "filters": 4, "kernel_size": 3, "use_bias": False},
        {"type": "BatchNormalization", "center": False},
        {"type": "Conv2D", "filters": 5, "kernel_size": [2, 3], "padding": "same"},
        {"type": "BatchNormalization", "scale": False},
        {"type": "BatchNormalization", "center": False, "scale": False},
        {"type": "Flatten"},
        _dense(7, use_bias=False),
        {"type": "BatchNormalization"},
        {"type": "Activation", "activation": "tanh"},
        _dense(10),
        {"type": "Activation", "activation": "softmax"},
    ],
    "pools_and_dropout": [
        {"type": "Conv2D", "filters": 3, "kernel_size": 5, "strides": 2, "activation": "elu"},
        {"type": "MaxPooling2D", "pool_size": 3, "strides": 1, "padding": "same"},
        {"type": "Dropout", "rate": 0.3},
        {"type": "Flatten"},
        _dense(10, activation="softmax"),
    ],
}


def _count_cases():
    cases = [pytest.param(load_spec(name), id=name) for name in builtin_models()]
    for path in KERAS_FIXTURES:
        if path.name == "expected_params.json":
            continue
        try:
            cases.append(pytest.param(load_spec(path), id=path.stem))
        except SpecError:
            continue  # a fixture that cnnlab is meant to reject
    cases += [pytest.param(_spec(layers, name=name), id=name) for name, layers in SMALL_SPECS.items()]
    return cases


@pytest.mark.parametrize("spec", _count_cases())
def test_spec_counts_equal_the_built_module_layer_by_layer(spec):
    model = build_model(spec)
    counts = spec_layer_counts(spec)
    assert len(counts) == len(model.layers) == len(spec.layers)
    for layer_spec, module, count in zip(spec.layers, model.layers, counts):
        built = (sum(p.numel() for p in module.parameters()), sum(b.numel() for b in module.buffers()))
        assert (count.trainable, count.non_trainable) == built, layer_spec
    summary = summarize(spec)
    assert summary.total_params == sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert summary.non_trainable_params == sum(b.numel() for b in model.buffers())


# Huge layers: (layers, expected total parameters), counted in Python ints.
HUGE = {
    "dense_1e9": (
        [{"type": "Flatten"}, _dense(10**9, activation="relu"), _dense(10, activation="softmax")],
        785 * 10**9 + 10 * 10**9 + 10,
    ),
    "conv_1e9_filters": (
        [{"type": "Conv2D", "filters": 10**9, "kernel_size": 3, "activation": "relu"}, {"type": "Flatten"}, _dense(10)],
        10 * 10**9 + 26 * 26 * 10**9 * 10 + 10,
    ),
    "large_kernel_many_channels": (
        [
            {"type": "Conv2D", "filters": 8192, "kernel_size": 1},
            {"type": "Conv2D", "filters": 8192, "kernel_size": 27, "padding": "same"},
            {"type": "MaxPooling2D", "pool_size": 28},
            {"type": "Flatten"},
            _dense(10),
        ],
        2 * 8192 + 27 * 27 * 8192 * 8192 + 8192 + 8192 * 10 + 10,
    ),
    "units_1e20": ([{"type": "Flatten"}, _dense(10**20), _dense(10)], 785 * 10**20 + 10 * 10**20 + 10),
    "units_1e300": ([{"type": "Flatten"}, _dense(10**300), _dense(10)], 785 * 10**300 + 10 * 10**300 + 10),
}


@pytest.mark.parametrize("case", list(HUGE))
def test_summary_of_a_huge_spec_is_arithmetic(case):
    layers, total = HUGE[case]
    started = time.perf_counter()
    summary = summarize(_spec(layers, name=case))
    text = summary.to_text()
    assert summary.total_params == total and f"Total params: {total:,}" in text
    assert time.perf_counter() - started < 1


def _write_huge_specs(folder: Path) -> dict[str, Path]:
    import tomli_w

    paths = {}
    for case, (layers, _) in HUGE.items():
        data = {"name": case, "input_shape": [28, 28, 1], "num_classes": 10, "layers": layers}
        paths[case] = folder / f"{case}.toml"
        paths[case].write_text(tomli_w.dumps(data) if max(_ints(layers)) < 2**63 else _toml_by_hand(data))
    return paths


def _ints(layers: list[dict]) -> list[int]:
    return [v for layer in layers for v in layer.values() if isinstance(v, int)] + [0]


def _toml_by_hand(data: dict) -> str:
    """TOML with integers beyond 64 bits (tomli_w refuses them; Python's tomllib reads them)."""
    lines = [f'name = "{data["name"]}"', "input_shape = [28, 28, 1]", "num_classes = 10"]
    for layer in data["layers"]:
        lines.append("[[layers]]")
        lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in layer.items()]
    return "\n".join(lines) + "\n"


ADDRESS_SPACE = 2 * 2**30  # `import torch` maps about 0.7 GiB here


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def test_summary_of_huge_specs_runs_under_a_memory_cap(tmp_path):
    """`cnnlab summary` in a process that cannot map more than 2 GiB: counts, exit 0, no traceback.

    (Building a 10^9-unit layer would need terabytes; a process capped like this fails at once.)"""
    paths = _write_huge_specs(tmp_path)
    started = time.perf_counter()
    running = {
        case: subprocess.Popen(
            cnnlab_command("summary", str(paths[case])),
            preexec_fn=_cap_memory,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case in ("dense_1e9", "conv_1e9_filters", "large_kernel_many_channels", "units_1e20")
    }
    for case, process in running.items():
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, f"{case} under a {format_bytes(ADDRESS_SPACE)} cap: {stderr}"
        assert "Traceback" not in stdout + stderr
        assert f"Total params: {HUGE[case][1]:,}" in stdout, case
    assert time.perf_counter() - started < 60


# ---------------------------------------------------------------------------------------------
# The estimate against measured peaks


def _profiled_peak(run) -> int:
    """The peak, above what existed before, of the CPU allocator's running total while `run()` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu),
        key=lambda e: e.start_ns(),
    )
    total = peak = 0
    for event in events:
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def _held(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = [*model.parameters(), *model.buffers(), *(t for s in optimizer.state.values() for t in s.values())]
    return sum(t.untyped_storage().nbytes() for t in tensors)


BATCH, EVAL_BATCH = 128, 500


@pytest.mark.parametrize("name", builtin_models())
def test_estimate_is_within_30_percent_of_the_measured_peak(name):
    """One fp32 training step at batch 128 (channels_last, the CPU's default) and one evaluation at
    batch 500 (the first step's gradients still held, as after an epoch), each measured against its
    part of the estimate: weights, buffers and Adam state plus the step's (or evaluation's) peak."""
    spec = load_spec(name)
    images, labels = learnable_tensors(EVAL_BATCH)
    torch.manual_seed(0)
    model = new_model(spec, 0, FP32_CPU)
    optimizer = KerasAdam(model.parameters())
    step = build_train_step(model, optimizer, FP32_CPU, images, labels, BATCH)
    held = _held(model, optimizer)
    measured_step = held + _profiled_peak(lambda: step(torch.arange(BATCH)))
    gradients = sum(p.grad.untyped_storage().nbytes() for p in model.parameters())
    measured_eval = held + gradients + _profiled_peak(lambda: evaluate(model, images, labels, FP32_CPU, EVAL_BATCH))

    estimate = estimate_training_memory(
        spec, Recipe(batch_size=BATCH, eval_batch_size=EVAL_BATCH), FP32_CPU, train_images=BATCH, test_images=EVAL_BATCH
    )
    estimated_step = estimate.parameters + estimate.optimizer_state + estimate.training_step
    estimated_eval = estimate.parameters + estimate.optimizer_state + estimate.evaluation
    print(
        f"{name}: step measured {measured_step:,} estimated {estimated_step:,}; "
        f"evaluation measured {measured_eval:,} estimated {estimated_eval:,}"
    )
    assert estimated_step == pytest.approx(measured_step, rel=0.3)
    assert estimated_eval == pytest.approx(measured_eval, rel=0.3)


def test_estimate_parts_are_consistent():
    spec = load_spec("convnet3")
    estimate = estimate_training_memory(spec, Recipe(), FP32_CPU, 60000, 10000)
    params = summarize(spec).total_params
    assert estimate.parameters == 4 * params and estimate.gradients == 4 * params
    assert estimate.optimizer_state == 8 * params + 4 * 10  # m, v and a step counter per tensor
    assert estimate.batch_size == 128 and estimate.eval_batch_size == 1000
    assert estimate.total == estimate.held + max(estimate.backward_peak, estimate.update, estimate.evaluation)
    bigger = estimate_training_memory(spec, Recipe(batch_size=256), FP32_CPU, 60000, 10000)
    assert bigger.activations > 1.9 * estimate.activations
    bf16 = estimate_training_memory(spec, Recipe(), Hardware("cpu", "cpu", "bf16", False, True, 1), 60000, 10000)
    assert bf16.activations < 0.75 * estimate.activations and bf16.weight_copies > 0
    capped = estimate_training_memory(spec, Recipe(batch_size=10**7), FP32_CPU, 300, 10)
    assert (capped.batch_size, capped.eval_batch_size) == (300, 10)


# ---------------------------------------------------------------------------------------------
# Refusing what does not fit


def _dataset(train: int = 512, test: int = 16) -> Dataset:
    return Dataset(
        "mnist",
        tuple(str(i) for i in range(10)),
        torch.zeros(train, 28, 28, dtype=torch.uint8),
        torch.zeros(train, dtype=torch.int64),
        torch.zeros(test, 28, 28, dtype=torch.uint8),
        torch.zeros(test, dtype=torch.int64),
        Path("."),
        verified=True,
    )


def _plan(spec, batch_size: int = 128):
    return plan_run(
        [spec],
        recipes=[Recipe(batch_size=batch_size)],
        data=DataSelection(),
        hardware=HardwareRequest(device="cpu", precision="fp32"),
    )


AVAILABLE = 16 * 2**30


@pytest.fixture()
def sixteen_gib(monkeypatch):
    """A machine with 16 GiB available, whatever this one has."""
    monkeypatch.setattr(memory, "available_memory", lambda device: AVAILABLE)


# A convolution whose activations are huge and weights small: fine at batch 1, not at batch 512.
WIDE_CONV = [
    {"type": "Conv2D", "filters": 65536, "kernel_size": 3, "padding": "same", "activation": "relu"},
    {"type": "MaxPooling2D", "pool_size": 28},
    {"type": "Flatten"},
    _dense(10),
]

REFUSED = {  # case: (layers, batch size, the largest layer, the words naming its size)
    "dense_1e9": (
        HUGE["dense_1e9"][0],
        128,
        "dense_1",
        "(Dense, 1,000,000,000 units on 784 inputs: 2.9 TiB of weights",
    ),
    "conv_1e9_filters": (
        HUGE["conv_1e9_filters"][0],
        128,
        "conv2d_1",
        "(Conv2D, 1,000,000,000 filters of 3x3 on 1 channel: 314.8 TiB of activations at batch size 128)",
    ),
    "large_kernel_many_channels": (
        HUGE["large_kernel_many_channels"][0],
        128,
        "conv2d_2",
        "(Conv2D, 8,192 filters of 27x27 on 8,192 channels: 182.3 GiB of weights",
    ),
    "units_1e20": (
        HUGE["units_1e20"][0],
        128,
        "dense_1",
        "(Dense, 100,000,000,000,000,000,000 units on 784 inputs: 266.0 ZiB of weights",
    ),
    "units_1e300": (HUGE["units_1e300"][0], 128, "dense_1", "units on 784 inputs: 3.1e+303 bytes of weights"),
    "wide_conv_batch_1e7": (WIDE_CONV, 10**7, "conv2d_1", "of activations at batch size 512"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_spec_too_large_is_refused_in_one_line(case, sixteen_gib):
    layers, batch_size, largest, words = REFUSED[case]
    with pytest.raises(ConfigError) as info:
        check_fits_in_memory(_plan(_spec(layers, name=case), batch_size), _dataset())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{case}.toml: model '{case}' needs about ")
    assert f"the largest layer is {largest} " in message and words in message, message
    assert "this machine has 16.0 GiB available (80% = 12.8 GiB)" in message


def test_fine_at_batch_1_refused_at_a_large_batch_with_the_batch_that_fits(sixteen_gib):
    spec = _spec(WIDE_CONV, name="wide")
    check_fits_in_memory(_plan(spec, 1), _dataset())
    with pytest.raises(ConfigError) as info:
        check_fits_in_memory(_plan(spec, 512), _dataset())
    fits = int(str(info.value).split("use --batch-size ")[1].split()[0].replace(",", ""))
    assert 1 <= fits < 512
    check_fits_in_memory(_plan(spec, fits), _dataset())
    with pytest.raises(ConfigError):
        check_fits_in_memory(_plan(spec, fits + 1), _dataset())


@pytest.mark.parametrize("name", builtin_models())
def test_the_built_in_models_fit_with_the_notebooks_recipe(name, sixteen_gib):
    check_fits_in_memory(_plan(load_spec(name)), _dataset(60000, 10000))
    assert estimate_training_memory(load_spec(name), Recipe(), FP32_CPU, 60000, 10000).total < 2**30


def test_available_memory_on_the_cpu():
    available = memory.available_memory("cpu")
    total = (
        int(
            next(
                line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
            ).split()[1]
        )
        * 1024
    )
    assert 0 < available <= total


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (41 * 2**30 + 2**27, "41.1 GiB"),
        (2**20 - 1, "1.0 MiB"),
        (3 * 2**80, "3.0 YiB"),
        (10**400, "1.0e+400 bytes"),
        (3149 * 10**300, "3.1e+303 bytes"),
        (9999 * 10**30, "1.0e+34 bytes"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    "case, extra",
    [
        ("dense_1e9", []),
        ("conv_1e9_filters", []),
        ("large_kernel_many_channels", []),
        ("units_1e20", []),
        ("wide_conv", ["--batch-size", str(10**7)]),
    ],
)
def test_train_refuses_a_huge_spec_before_writing_anything(case, extra, tmp_path):
    """`cnnlab train` exits 2 with one line naming the largest layer and the sizes; no run folder."""
    write_dataset_folder(tmp_path / "data" / "mnist", learnable_arrays(512, 16))
    paths = _write_huge_specs(tmp_path)
    if case == "wide_conv":
        paths[case] = tmp_path / "wide_conv.toml"
        paths[case].write_text(_toml_by_hand({"name": case, "layers": WIDE_CONV}))
    result = run_cnnlab(
        "train",
        str(paths[case]),
        "--data-dir",
        str(tmp_path / "data"),
        "--runs-dir",
        "tmp/runs",
        "--device",
        "cpu",
        "--epochs",
        "1",
        *extra,
        cwd=tmp_path,
        timeout=120,
    )
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: {paths[case]}: model '{case}' needs about "), errors
    assert "the largest layer is " in errors[0] and "available (80% = " in errors[0]
    assert not (tmp_path / "tmp" / "runs").exists() or not any((tmp_path / "tmp" / "runs").iterdir())


def test_estimating_is_cheap():
    spec = _spec(HUGE["units_1e300"][0])
    started = time.perf_counter()
    estimate = estimate_training_memory(spec, Recipe(), FP32_CPU, 60000, 10000)
    assert time.perf_counter() - started < 0.5
    assert estimate.total > 10**300 and math.log10(estimate.total) < 305
