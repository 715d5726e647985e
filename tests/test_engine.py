"""The training loop: Keras's metric semantics, determinism, every parameter trained, and resuming."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import engine
from cnnlab.catalog import builtin_models, load_spec
from cnnlab.config import DataSelection, Hardware, HardwareRequest, Recipe
from cnnlab.datasets import Dataset
from cnnlab.engine import DeviceData, build_train_step, evaluate, new_model, train
from cnnlab.errors import ConfigError
from cnnlab.hardware import cpu_has_fast_bf16, resolve_device, resolve_hardware
from cnnlab.optim import KerasAdam
from cnnlab.spec import parse_spec

SMALL = parse_spec(
    {
        "name": "small",
        "input_shape": [28, 28, 1],
        "num_classes": 10,
        "layers": [
            {"type": "Conv2D", "filters": 4, "kernel_size": 3, "strides": 2, "activation": "relu"},
            {"type": "MaxPooling2D"},
            {"type": "Dropout", "rate": 0.25},
            {"type": "Flatten"},
            {"type": "Dense", "units": 16, "activation": "relu"},
            {"type": "BatchNormalization"},
            {"type": "Dense", "units": 10, "activation": "softmax"},
        ],
    }
)
CPU = Hardware("cpu", "Test CPU", "fp32", compiled=False, channels_last=True, threads=torch.get_num_threads())


def device_data(images, labels, **selection) -> DeviceData:
    dataset = Dataset("mnist", tuple("0123456789"), images, labels, images[:64], labels[:64], Path("."), True)
    return DeviceData(dataset, DataSelection(**selection), torch.device("cpu"))


def fit(images, labels, seed=0, hardware=CPU, checkpoint=None, reporter=None, **recipe):
    recipe = Recipe(**{"epochs": 3, "batch_size": 32, "learning_rate": 3e-3, **recipe})
    return train(
        SMALL,
        recipe,
        seed,
        device_data(images, labels).splits(seed),
        hardware,
        checkpoint=checkpoint,
        reporter=reporter,
    )


def history_numbers(history):
    return [(r.loss, r.accuracy, r.val_loss, r.val_accuracy) for r in history]


def test_same_seed_same_history_on_cpu(tiny_images):
    a, b = fit(*tiny_images, seed=3), fit(*tiny_images, seed=3)
    assert history_numbers(a.history) == history_numbers(b.history)
    assert history_numbers(fit(*tiny_images, seed=4).history) != history_numbers(a.history)


def test_training_learns_and_validates_on_the_test_split(tiny_images):
    result = fit(*tiny_images, epochs=6)
    assert [r.epoch for r in result.history] == list(range(1, 7))
    assert result.history[-1].loss < 0.5 * result.history[0].loss
    assert result.history[-1].val_accuracy > 0.8  # the bar's row gives the class away (chance: 0.1)
    # Validated on the test split: the final test score is the last validation, not a new evaluation.
    assert result.test.accuracy == result.history[-1].val_accuracy
    assert result.test.loss == pytest.approx(result.history[-1].val_loss)


def test_epoch_metrics_are_running_means_over_training_batches(tiny_images, monkeypatch):
    """Keras's semantics: the epoch's loss is the batch-size-weighted mean of each training batch's
    loss as it was computed (dropout on, weights changing), not an evaluation at the end of the epoch."""
    images, labels = tiny_images
    batch_losses: list[tuple[float, int, int]] = []
    make = engine.new_model

    def recording_model(spec, seed, hardware, numerics=3):
        model = make(spec, seed, hardware, numerics)
        model.register_forward_hook(
            lambda module, args, out: batch_losses.append((out.detach(), module.training)) if module.training else None
        )
        return model

    monkeypatch.setattr(engine, "new_model", recording_model)
    result = fit(images, labels, epochs=1, batch_size=40)  # 128 = 3 * 40 + 8: a partial last batch
    order = torch.randperm(128, generator=torch.Generator().manual_seed(0 + 1))
    total, correct = 0.0, 0
    for i, (logits, training) in enumerate(batch_losses):
        assert training
        y = labels[order[i * 40 : (i + 1) * 40]]
        total += F.cross_entropy(logits.float(), y).item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
    assert len(batch_losses) == 4
    record = result.history[0]
    assert record.loss == pytest.approx(total / 128, rel=1e-5)
    assert record.accuracy == correct / 128
    at_end = evaluate(result.model, images, labels, CPU)
    assert at_end.loss != pytest.approx(record.loss, rel=1e-3)  # an end-of-epoch evaluation differs


def test_evaluation_is_in_eval_mode_and_batch_independent(tiny_images):
    result = fit(*tiny_images, epochs=1)
    images, labels = tiny_images
    result.model.train()
    small = evaluate(result.model, images, labels, CPU, batch_size=7)
    large = evaluate(result.model, images, labels, CPU, batch_size=1000)
    assert small.accuracy == large.accuracy
    assert small.loss == pytest.approx(large.loss, rel=1e-5)
    assert result.model.training  # evaluate restores the caller's mode
    assert len(large.predictions) == 128 and float(large.confidences.min()) > 0


def test_limits_and_validation_split(tiny_images):
    images, labels = tiny_images
    data = device_data(images, labels, limit_train=100, limit_test=20, val_split=0.2)
    splits = data.splits(seed=0)
    assert (len(splits.train_images), len(splits.val_images), len(splits.test_images)) == (80, 20, 20)
    assert not splits.val_is_test
    held_out = {tuple(x.flatten().tolist()) for x in splits.val_images}
    assert not held_out & {tuple(x.flatten().tolist()) for x in splits.train_images}
    result = train(SMALL, Recipe(epochs=1, batch_size=32), 0, splits, CPU)
    assert len(result.test.predictions) == 20  # the final score is on the test split


def test_impossible_data_selections_are_config_errors(tiny_images):
    images, labels = tiny_images
    with pytest.raises(ConfigError, match="--val-split 0.5 leaves 0 of 1"):
        device_data(images[:1], labels[:1], val_split=0.5)
    with pytest.raises(ConfigError, match="--val-split must be in"):
        DataSelection(val_split=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_auto_choices_on_this_machine():
    hardware = resolve_hardware(HardwareRequest())
    if not torch.cuda.is_available():
        assert hardware.device == "cpu" and hardware.compiled is False and hardware.cuda_graph is False
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        assert hardware.precision == ("bf16" if native_bf16 else "fp32")
    assert hardware.channels_last is True  # NHWC everywhere: measured faster on the CPU and the GPU
    assert resolve_hardware(HardwareRequest(precision="fp32")).precision == "fp32"
    assert resolve_hardware(HardwareRequest(compile="on", device="cpu")).compiled is True


@pytest.mark.parametrize(
    ("capability", "onednn_isa", "fast"),
    [("AVX512", None, True), ("AVX512", "ALL", True), ("AVX512", "avx512_core_bf16", True),
     ("AVX512", "AVX512_CORE_AMX", True), ("AVX512", "AVX2", False), ("AVX512", "AVX512_CORE_VNNI", False),
     ("AVX2", None, False)],
)  # fmt: skip
def test_bf16_counts_as_fast_only_where_pytorch_and_onednn_may_use_it(monkeypatch, capability, onednn_isa, fast):
    """A CPU with native bf16 whose PyTorch is kept to AVX2, or whose oneDNN is kept below its bf16
    instructions, emulates bf16: `--precision auto` must then pick fp32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if onednn_isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_isa)
    assert cpu_has_fast_bf16() is fast
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert cpu_has_fast_bf16() is False


def test_pytorch_kept_to_avx2_trains_in_fp32():
    """The real switch, in a fresh interpreter (on a CPU without native bf16 fp32 is picked anyway)."""
    script = "from cnnlab.config import HardwareRequest; from cnnlab.hardware import resolve_hardware\n"
    script += "print(resolve_hardware(HardwareRequest(device='cpu')).precision)"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "fp32"


def test_cuda_resolution_graphs_by_default_and_compiles_only_when_asked(monkeypatch):
    # What --compile resolves to on a CUDA machine (faked: CI has no GPU): auto captures the eager
    # step as one CUDA graph without torch.compile; on adds torch.compile; off is plain eager.
    import cnnlab.hardware as hardware_module

    monkeypatch.setattr(hardware_module, "resolve_device", lambda requested: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    resolved = {c: resolve_hardware(HardwareRequest(compile=c)) for c in ("auto", "on", "off")}
    assert [(h.compiled, h.cuda_graph) for h in resolved.values()] == [(False, True), (True, True), (False, False)]
    assert {h.precision for h in resolved.values()} == {"bf16"} and resolved["auto"].device == "cuda"
    assert not any(h.small_convs_as_matmul for h in resolved.values())  # a CPU kernel choice only
    assert not any(h.padded_small_convs_as_matmul for h in resolved.values())
    assert not any(h.compact_dropout_masks for h in resolved.values())  # CPU masks only


def test_small_convolutions_become_matmuls_in_bf16_on_the_cpu_only():
    assert resolve_hardware(HardwareRequest(device="cpu", precision="bf16")).small_convs_as_matmul is True
    assert resolve_hardware(HardwareRequest(device="cpu", precision="fp32")).small_convs_as_matmul is False
    # A run recorded before the choice existed resumes with the kernels it started with.
    recorded = dataclasses.asdict(resolve_hardware(HardwareRequest(device="cpu", precision="bf16")))
    del recorded["small_convs_as_matmul"]
    assert Hardware.from_dict(recorded).small_convs_as_matmul is False
    bf16 = dataclasses.replace(CPU, precision="bf16", small_convs_as_matmul=True)
    kinds = [type(m).__name__ for m in new_model(load_spec("convnet7"), 0, bf16).modules() if isinstance(m, nn.Conv2d)]
    assert kinds == ["Conv2d"] * 5 + ["MatmulConv2d"] * 2  # the two layers on 3x3-pixel images


def test_small_convolutions_that_pad_themselves_become_matmuls_with_amx_only(monkeypatch):
    import cnnlab.hardware as hardware_module

    for amx in (True, False):
        monkeypatch.setattr(hardware_module, "cpu_has_amx", lambda amx=amx: amx)
        bf16 = resolve_hardware(HardwareRequest(device="cpu", precision="bf16"))
        assert bf16.padded_small_convs_as_matmul is amx and bf16.small_convs_as_matmul is True
        assert resolve_hardware(HardwareRequest(device="cpu", precision="fp32")).padded_small_convs_as_matmul is False
    # A run recorded before the choice existed resumes with the kernels it started with.
    recorded = dataclasses.asdict(dataclasses.replace(CPU, padded_small_convs_as_matmul=True))
    del recorded["padded_small_convs_as_matmul"]
    assert Hardware.from_dict(recorded).padded_small_convs_as_matmul is False
    both = dataclasses.replace(CPU, precision="bf16", small_convs_as_matmul=True, padded_small_convs_as_matmul=True)
    convs = [m for m in new_model(load_spec("convnet5"), 0, both).modules() if isinstance(m, nn.Conv2d)]
    assert [type(m).__name__ for m in convs] == ["Conv2d"] * 4 + ["MatmulConv2d"]  # 5x5 'same' on 3x3 pixels
    assert convs[-1].padding == (2, 2)
    kinds = [type(m).__name__ for m in new_model(load_spec("convnet7"), 0, both).modules() if isinstance(m, nn.Conv2d)]
    assert kinds == ["Conv2d"] * 5 + ["MatmulConv2d"] * 2  # convnet7's pad outside the convolution: as before
    # On its own the switch changes nothing: it widens small_convs_as_matmul.
    alone = dataclasses.replace(CPU, precision="bf16", padded_small_convs_as_matmul=True)
    assert not any(type(m).__name__ == "MatmulConv2d" for m in new_model(load_spec("convnet5"), 0, alone).modules())


def test_amx_is_seen_only_where_onednn_may_use_it(monkeypatch):
    import cnnlab.hardware as hardware_module

    monkeypatch.setattr(hardware_module, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    for isa, expected in [("ALL", True), ("AVX512_CORE_AMX", True), ("AVX10_1_512_AMX", True), ("AVX10_1_512", False), ("AVX512_CORE_BF16", False)]:  # fmt: skip
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert hardware_module.cpu_has_amx() is expected, isa
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert hardware_module.cpu_has_amx() is False


def test_compact_dropout_masks_on_the_cpu_only_and_recorded():
    from cnnlab.models import FastDropout

    for precision in ("bf16", "fp32"):
        assert resolve_hardware(HardwareRequest(device="cpu", precision=precision)).compact_dropout_masks is True
    # A run recorded before the choice existed resumes with the masks it started with.
    recorded = dataclasses.asdict(resolve_hardware(HardwareRequest(device="cpu")))
    del recorded["compact_dropout_masks"]
    assert Hardware.from_dict(recorded).compact_dropout_masks is False
    for compact in (False, True):
        model = new_model(load_spec("convnet7"), 0, dataclasses.replace(CPU, compact_dropout_masks=compact))
        assert {m.compact_masks for m in model.modules() if isinstance(m, FastDropout)} == {compact}


def test_bf16_autocast_trains_and_differs_from_fp32(tiny_images):
    bf16 = fit(*tiny_images, epochs=3, hardware=dataclasses.replace(CPU, precision="bf16"))
    fp32 = fit(*tiny_images, epochs=3)
    assert all(math.isfinite(r.loss) for r in bf16.history)
    assert bf16.history[-1].loss < bf16.history[0].loss
    assert history_numbers(bf16.history) != history_numbers(fp32.history)  # bf16 really computed


class MemoryCheckpoint:
    """The engine's checkpoint protocol, kept in memory (the run folder's keeps it on disk)."""

    def __init__(self) -> None:
        self.state = None
        self.saves = 0

    def load(self):
        return self.state

    def save(self, state):
        self.state = {k: (v.copy() if isinstance(v, dict) else v) for k, v in state.items()}
        self.saves += 1


def test_resume_from_checkpoint_equals_uninterrupted(tiny_images):
    full = fit(*tiny_images, seed=5, epochs=4)
    checkpoint = MemoryCheckpoint()
    fit(*tiny_images, seed=5, epochs=2, checkpoint=checkpoint)
    assert checkpoint.saves == 2
    resumed = fit(*tiny_images, seed=5, epochs=4, checkpoint=checkpoint)
    assert [r.epoch for r in resumed.history] == [1, 2, 3, 4]
    assert history_numbers(full.history) == history_numbers(resumed.history)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_training_leaves_global_rng_untouched(tiny_images):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fit(*tiny_images, epochs=1)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("name", builtin_models())
def test_one_real_training_step_changes_every_parameter(name, tiny_images):
    """Every weight of every built-in model gets a gradient and an update; BatchNormalization's
    moving statistics move; nothing is frozen or disconnected by mistake."""
    spec = load_spec(name)
    images, labels = tiny_images
    model = new_model(spec, 0, CPU)
    optimizer = KerasAdam(model.parameters(), lr=1e-3)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step = build_train_step(model, optimizer, CPU, images, labels, batch_size=16)
    step(torch.arange(16))
    after = model.state_dict()
    unchanged = [
        k
        for k, v in before.items()
        if k.endswith(("weight", "bias", "running_mean", "running_var")) and torch.equal(v, after[k])
    ]
    assert unchanged == []
    assert len(list(model.parameters())) == len([k for k in before if k.endswith(("weight", "bias"))])
    assert float(step.totals[0]) > 0 and 0 <= float(step.totals[1]) <= 16


def test_units_trained_together_equal_units_trained_alone(tiny_images):
    # Taking turns step by step (what train_together does on one device) must not mix the units'
    # random streams: dropout, shuffles, augmentation, the plateau schedule and early stopping
    # each give, bit for bit, the history and weights of the unit trained alone.
    from cnnlab.options import parse_option

    data = device_data(*tiny_images)
    base = Recipe(epochs=3, batch_size=32, learning_rate=3e-3)
    recipes = [
        base,
        dataclasses.replace(base, augmentation=parse_option("translate=0.1,rotate=0.05", "augmentation")),
        dataclasses.replace(base, epochs=4, schedule=parse_option("plateau:factor=0.5,patience=0,min_delta=10", "schedule"),
                            early_stopping=parse_option("patience=0,min_delta=10", "early_stopping")),
        dataclasses.replace(base, batch_size=48),  # a partial last batch, and a different number of steps
    ]  # fmt: skip
    jobs = [engine.TrainJob(SMALL, recipe, seed, data.splits(seed)) for seed, recipe in enumerate(recipes)]
    together = engine.train_together(jobs, CPU)
    alone = [train(SMALL, job.recipe, job.seed, job.splits, CPU) for job in jobs]
    for a, b in zip(together, alone):
        assert history_numbers(a.history) == history_numbers(b.history)
        assert [r.learning_rate for r in a.history] == [r.learning_rate for r in b.history]
        assert a.stopped_epoch == b.stopped_epoch and a.test.accuracy == b.test.accuracy
        assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert together[2].stopped_epoch is not None  # early stopping did stop that unit
    assert len({len(r.history) for r in together}) > 1
    # The caller's random state is untouched, as by train().
    before = torch.get_rng_state()
    engine.train_together(jobs[:1], CPU)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_failing_unit_trained_together_fails_alone(tiny_images):
    data = device_data(*tiny_images)
    good = engine.TrainJob(SMALL, Recipe(epochs=2, batch_size=32, learning_rate=3e-3), 0, data.splits(0))
    diverging = engine.TrainJob(SMALL, Recipe(epochs=2, batch_size=32, learning_rate=1e30), 1, data.splits(1))
    outcomes = engine.train_together([diverging, good], CPU)
    assert isinstance(outcomes[0], FloatingPointError) and "diverged" in str(outcomes[0])
    alone = train(SMALL, good.recipe, 0, good.splits, CPU)
    assert history_numbers(outcomes[1].history) == history_numbers(alone.history)
