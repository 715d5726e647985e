"""Export a trained unit as a self-contained model file: ONNX, a PyTorch 2 program (`torch.export`) or
a Keras 3 `.keras` file.

The ONNX and pt2 models take the pixels as the dataset files store them, uint8 (N, 28, 28) with any
batch size N, scale them inside as training did (`engine.to_input`) and return the class
probabilities (N, classes). The Keras model is the Sequential model itself, as Keras users feed it:
float32 (N, 28, 28, 1) images scaled to [0, 1] (the notebook's `x / 255`), softmax probabilities out. Every export is verified before it is written: the file's bytes are
loaded back (ONNX Runtime on the CPU, or `torch.export.load`) and run on the run's test images
against the PyTorch model; it is written only when every probability is within `ATOL` and the
same class wins on at least `MIN_AGREEMENT` of the images. The figures are written beside the
file (`<file>.verification.json`); otherwise the export is refused and nothing is written.

    from cnnlab.export import export_run
    report = export_run("runs/20261126-101500-compare", to="onnx")
    print(report.path, report.verification.max_abs_difference, report.verification.agreement)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cnnlab
from cnnlab.analysis import analyze
from cnnlab.api import load_data
from cnnlab.config import DataSelection, Hardware, Unit
from cnnlab.engine import DeviceData, new_model, to_input
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.files import atomic_path, write_json
from cnnlab.keras_files import keras_archive_bytes, read_keras_bytes
from cnnlab.keras_weights import keras_layer_weights, state_dict_from_keras
from cnnlab.models import build_model
from cnnlab.runfolder import RunFolder
from cnnlab.spec import ModelSpec

FORMATS = ("onnx", "pt2", "keras")
ATOL = 1e-4  # the largest difference of any probability allowed between the file and PyTorch
MIN_AGREEMENT = 0.999  # the smallest fraction of test images on which both must pick the same class
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"
METADATA_FILE = "cnnlab_metadata.json"  # inside a .pt2 archive (torch.export.save's extra_files)
EXAMPLE_BATCH = 2  # traced with 2 images: torch.export specialises sizes 0 and 1, the exported batch is dynamic
_ONNX_MISSING = "--to onnx needs ONNX Runtime: pip install 'cnnlab[export]'"


class ExportRefused(CnnlabError):
    """The exported file did not reproduce the PyTorch model; nothing was written."""


class ProbabilityModel(nn.Module):
    """A trained network as a deployable model: uint8 pixels (N, H, W) or (N, H, W, C) -> the
    training's input path (`to_input`: float NCHW in [0, 1]) -> logits -> softmax probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(to_input(pixels, channels_last=False)).float().softmax(dim=1)


@dataclass(frozen=True)
class Selection:
    """The unit an export takes its weights from, and why."""

    unit: Unit
    reason: str
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Verification:
    """The exported file against the PyTorch model on the run's test images."""

    images: int
    max_abs_difference: float  # over every probability of every image
    agreeing: int  # images on which both pick the same class
    exported_accuracy: float  # the exported file's accuracy on the test labels
    reference_accuracy: float  # the PyTorch model's (fp32, CPU)
    atol: float = ATOL
    min_agreement: float = MIN_AGREEMENT

    @property
    def agreement(self) -> float:
        return self.agreeing / self.images

    @property
    def passed(self) -> bool:
        return self.max_abs_difference <= self.atol and self.agreement >= self.min_agreement

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "max_abs_difference": self.max_abs_difference,
            "agreeing": self.agreeing,
            "agreement": self.agreement,
            "exported_accuracy": self.exported_accuracy,
            "reference_accuracy": self.reference_accuracy,
            "atol": self.atol,
            "min_agreement": self.min_agreement,
            "passed": self.passed,
        }

    def sentence(self) -> str:
        return (
            f"max probability difference {self.max_abs_difference:.2e} (limit {self.atol:.0e}), same class on "
            f"{self.agreeing:,} of {self.images:,} test images ({self.agreement:.2%}; at least "
            f"{self.min_agreement:.1%} needed)"
        )


@dataclass(frozen=True)
class ExportReport:
    """What `export_run` wrote and how it was checked."""

    path: Path
    verification_path: Path
    format: str
    exporter: str  # how the file was made, e.g. "torch.onnx.export (dynamo), opset 18"
    arm: str
    seed: int
    reason: str  # why this arm and seed
    metadata: dict[str, Any]
    verification: Verification


def export_run(
    run_dir: Path | str,
    to: str,
    output: Path | str | None = None,
    arm: str | None = None,
    seed: int | None = None,
    data_dir: Path | str | None = None,
    *,
    batch_size: int = 1000,
) -> ExportReport:
    """Export one finished unit of a run folder (default: the arm the run's analysis chose, else its
    only arm; its first finished seed) as `to` ("onnx" or "pt2"), verified on the run's test images
    before anything is written. Default output: `<run_dir>/export/<arm folder>-seed<N>.<to>`."""
    if to not in FORMATS:
        raise ConfigError(f"--to must be {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, got '{to}'")
    if to == "onnx":
        _check_onnx_installed()
    folder = RunFolder.open(Path(run_dir))
    analysis = analyze(folder)
    selection = select_unit(analysis, arm, seed)
    unit = selection.unit
    path = Path(output) if output is not None else folder.path / "export" / f"{unit.arm.folder}-seed{unit.seed}.{to}"
    if path.is_dir():
        raise ConfigError(f"-o {path} is a folder; give the file to write, e.g. {path / path.name}.{to}")
    if to == "keras" and path.suffix != ".keras":
        raise ConfigError(f"-o {path}: Keras 3 loads only files named *.keras; give e.g. {path.with_suffix('.keras')}")

    data_selection = analysis.plan.data
    if data_dir is not None:
        data_selection = DataSelection(**{**data_selection.__dict__, "data_dir": str(data_dir)})
    data = DeviceData(load_data(data_selection), data_selection, torch.device("cpu"))
    images, labels = data.test_images, data.test_labels

    wrapper = _probability_model(folder, unit)
    metadata = {
        "format": "cnnlab-export/1",
        "cnnlab_version": cnnlab.__version__,
        "dataset": data_selection.dataset,
        "class_names": list(analysis.classes[: unit.arm.spec.num_classes]),
        "test_accuracy": selection.metrics["test_accuracy"],
        "test_images": len(images),
        "arm": unit.arm.name,
        "seed": unit.seed,
        "model": unit.arm.spec.name,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", *images.shape[1:]]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", unit.arm.spec.num_classes]},
    }
    example = images[:EXAMPLE_BATCH].clone()
    if to == "onnx":
        content, run_exported, exporter = _export_onnx(wrapper, example, metadata)
    elif to == "pt2":
        content, run_exported, exporter = _export_pt2(wrapper, example, metadata)
    else:
        metadata["input"] = {"dtype": "float32", "shape": ["N", *unit.arm.spec.input_shape], "scale": "pixels / 255"}
        content, run_exported, exporter = _export_keras(unit.arm.spec, wrapper.model, metadata)
    metadata["exporter"] = exporter

    verification = verify(wrapper, run_exported, images, labels, batch_size)
    if not verification.passed:
        raise ExportRefused(
            f"export refused, nothing written: the {to} file does not reproduce the PyTorch model of "
            f"{unit.label}: {verification.sentence()}"
        )
    verification_path = path.with_name(path.name + ".verification.json")
    write_json(
        verification_path,
        {"file": path.name, "arm": unit.arm.name, "seed": unit.seed, "reason": selection.reason,
         **verification.to_dict(), "metadata": metadata},
    )  # fmt: skip
    with atomic_path(path) as tmp:
        tmp.write_bytes(content)
    return ExportReport(
        path, verification_path, to, exporter, unit.arm.name, unit.seed, selection.reason, metadata, verification
    )


def select_unit(analysis, arm: str | None = None, seed: int | None = None) -> Selection:
    """The unit to export: `arm` (else the analysis's choice, else the only arm with finished units)
    and `seed` (else the arm's first finished seed), with the reason."""
    finished = {(r.arm, r.seed): r for r in analysis.results}
    arms_done = list(dict.fromkeys(r.arm for r in analysis.results))
    if arm is not None:
        if arm not in arms_done:
            names = ", ".join(arms_done)
            raise ConfigError(f"--arm '{arm}' has no finished unit in {analysis.folder}; choose one of: {names}")
        reason = "chosen with --arm"
    elif analysis.choice is not None:
        arm = analysis.choice.arm
        reason = analysis.choice.sentence()
    elif len(arms_done) == 1:
        arm = arms_done[0]
        reason = "the run's only arm"
    else:
        names = ", ".join(arms_done)
        raise ConfigError(f"{analysis.folder} has several arms and no best one; choose one with --arm ({names})")
    seeds = [s for (a, s) in finished if a == arm]
    if seed is not None:
        if seed not in seeds:
            listed = ", ".join(str(s) for s in seeds)
            raise ConfigError(f"--seed {seed}: {arm} has no finished unit with this seed; finished seeds: {listed}")
        reason += "; seed chosen with --seed"
    else:
        seed = seeds[0]
        if len(seeds) > 1:
            reason += f"; its first seed ({seed}) of {len(seeds)}"
    return Selection(Unit(analysis.plan.arm(arm), seed), reason, finished[(arm, seed)].metrics)


def probability_model(
    run_dir: Path | str, arm: str | None = None, seed: int | None = None
) -> tuple[ProbabilityModel, Selection]:
    """The PyTorch model an export of the same arguments is made from (fp32, CPU, eval mode), and
    which unit it is."""
    folder = RunFolder.open(Path(run_dir))
    selection = select_unit(analyze(folder), arm, seed)
    return _probability_model(folder, selection.unit), selection


def _probability_model(folder: RunFolder, unit: Unit) -> ProbabilityModel:
    hardware = Hardware("cpu", "", "fp32", compiled=False, channels_last=False, threads=torch.get_num_threads())
    model = folder.load_weights_into(unit, new_model(unit.arm.spec, None, hardware))
    return ProbabilityModel(model).eval()


@torch.inference_mode()
def verify(
    reference: nn.Module,
    run_exported: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
) -> Verification:
    """Run the exported model and the PyTorch model on `images` in batches and compare them."""
    worst, agreeing, exported_correct, reference_correct = 0.0, 0, 0, 0
    for start in range(0, len(images), batch_size):
        batch, y = images[start : start + batch_size], labels[start : start + batch_size]
        expected = reference(batch)
        got = run_exported(batch).to(expected.dtype)
        if got.shape != expected.shape:
            raise ExportRefused(
                f"export refused, nothing written: the exported model returned shape {tuple(got.shape)} "
                f"for {tuple(batch.shape)} pixels, expected {tuple(expected.shape)}"
            )
        difference = (got - expected).abs().max().item()
        worst = math.inf if not math.isfinite(difference) else max(worst, difference)
        agreeing += int((got.argmax(1) == expected.argmax(1)).sum())
        exported_correct += int((got.argmax(1) == y).sum())
        reference_correct += int((expected.argmax(1) == y).sum())
    count = len(images)
    return Verification(count, worst, agreeing, exported_correct / count, reference_correct / count)


# ---------------------------------------------------------------------------------------------
# The two formats: each returns the file's bytes, a function running those very bytes, and how


def _check_onnx_installed() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx.export's dynamo exporter builds the graph with it)
    except ImportError:
        raise ConfigError(_ONNX_MISSING) from None


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=1 << 20)


def _export_onnx(
    wrapper: nn.Module, example: torch.Tensor, metadata: dict[str, Any]
) -> tuple[bytes, Callable[[torch.Tensor], torch.Tensor], str]:
    import onnx
    import onnxruntime

    try:
        with _quiet_onnx_registry():
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"pixels": {0: _batch_dim()}},
                opset_version=ONNX_OPSET,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # torch's exporter raises many types; the user gets one line
        raise ExportRefused(f"export refused, nothing written: torch.onnx.export failed ({_first_line(exc)})") from exc
    proto = program.model_proto
    del proto.metadata_props[:]
    for key, value in _onnx_metadata(metadata).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name, proto.producer_version = "cnnlab", cnnlab.__version__
    onnx.checker.check_model(proto, full_check=True)
    content = proto.SerializeToString()

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(content, options, providers=["CPUExecutionProvider"])

    def run(pixels: torch.Tensor) -> torch.Tensor:
        (probabilities,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.cpu().numpy()})
        return torch.from_numpy(probabilities)

    return content, run, f"torch.onnx.export (dynamo, torch {torch.__version__}), opset {ONNX_OPSET}"


@contextlib.contextmanager
def _quiet_onnx_registry() -> Iterator[None]:
    """The exporter logs a warning per torchvision operator it cannot register (torchvision is not
    needed here); keep them out of the user's terminal."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with _quiet_torch_internals():
            yield
    finally:
        registry.setLevel(level)


@contextlib.contextmanager
def _quiet_torch_internals() -> Iterator[None]:
    """torch's exporters call their own deprecated pytree API; the user can do nothing about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
        yield


def _onnx_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata_props are strings: scalars as text, lists and tables as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def _export_pt2(
    wrapper: nn.Module, example: torch.Tensor, metadata: dict[str, Any]
) -> tuple[bytes, Callable[[torch.Tensor], torch.Tensor], str]:
    try:
        with _quiet_torch_internals():
            program = torch.export.export(
                wrapper, (example,), dynamic_shapes={"pixels": {0: _batch_dim()}}, strict=False
            )
    except Exception as exc:
        raise ExportRefused(
            f"export refused, nothing written: torch.export.export failed ({_first_line(exc)})"
        ) from exc
    exporter = f"torch.export.export (torch {torch.__version__})"
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps({**metadata, "exporter": exporter})})
    content = buffer.getvalue()
    loaded = torch.export.load(io.BytesIO(content)).module()

    def run(pixels: torch.Tensor) -> torch.Tensor:
        return loaded(pixels)

    return content, run, exporter


def _export_keras(
    spec: ModelSpec, model: nn.Module, metadata: dict[str, Any]
) -> tuple[bytes, Callable[[torch.Tensor], torch.Tensor], str]:
    """The .keras file (Keras 3's format: config.json, model.weights.h5, metadata.json with ours under
    "cnnlab"), run for the verification by reading those bytes back as any Keras file is read."""
    exporter = "cnnlab's Keras 3 writer (.keras: config.json, model.weights.h5)"
    content = keras_archive_bytes(spec, keras_layer_weights(model), metadata={**metadata, "exporter": exporter})
    archive = read_keras_bytes(content, source="the exported .keras file")
    loaded = build_model(archive.spec)
    loaded.load_state_dict(state_dict_from_keras(archive.spec, archive.weights, archive.source))
    return content, ProbabilityModel(loaded).eval(), exporter


def load_pt2_metadata(path: Path | str) -> dict[str, Any]:
    """The metadata saved inside a .pt2 file by `export_run`."""
    extra = {METADATA_FILE: ""}
    torch.export.load(Path(path), extra_files=extra)
    return json.loads(extra[METADATA_FILE])


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
