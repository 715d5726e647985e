"""Predict the classes of images with a run's trained models: `cnnlab predict RUN_DIR IMAGE...`.

    from cnnlab.predict import Predictor, predict_files

    predictor = Predictor.open("runs/20261126-101500-compare")      # the arm the rule chooses
    probabilities = predictor.predict(images)                        # uint8 (N, 28, 28) -> (N, classes)
    result = predict_files("runs/...", ["digit.png", "scans/"], top_k=3)

By default the arm is the one chosen by the rule against choosing on the test set (analysis.analyze:
validation accuracy when the run held out validation images, otherwise test accuracy, which is
optimistic), with its first finished seed. The model runs on the CPU in fp32, in eval mode, and sees
images through the same input path as evaluation (engine.to_input: x / 255).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.analysis import analyze, class_names
from cnnlab.config import Hardware, RunPlan, Unit
from cnnlab.engine import new_model, to_input
from cnnlab.errors import ConfigError, DataError, RunError
from cnnlab.images import SIZE, preprocess_all, read_images
from cnnlab.runfolder import RunFolder

BATCH = 1024  # images per forward pass

# Why an arm was used (Prediction.basis).
ONLY_ARM = "the run's only arm"
CHOSEN_BY_USER = "chosen with --arm"
ALL_ARMS = "every arm (--all)"
ON_VALIDATION = "chosen on validation"
ON_TEST = "chosen on the test set (optimistic)"


@dataclass(frozen=True)
class ClassScore:
    """One class of a prediction's top k."""

    name: str
    index: int
    probability: float


@dataclass(frozen=True)
class Prediction:
    """One image's top-k classes by one arm's model (one seed)."""

    image: str
    arm: str
    seed: int
    top: tuple[ClassScore, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "image": self.image,
            "arm": self.arm,
            "seed": self.seed,
            "top": [{"class": c.name, "index": c.index, "probability": c.probability} for c in self.top],
        }


@dataclass(frozen=True)
class PredictionResult:
    """What `predict_files` computed: one Prediction per image and arm, and which arms and why."""

    dataset: str
    arms: tuple[tuple[str, int], ...]  # (arm, seed) used, in order
    basis: str  # ONLY_ARM, CHOSEN_BY_USER, ALL_ARMS, ON_VALIDATION or ON_TEST
    explanation: str  # a sentence saying which arm and why
    predictions: list[Prediction]


class Predictor:
    """One finished unit's model, loaded on the CPU in fp32 and eval mode, ready to predict."""

    def __init__(self, unit: Unit, model: torch.nn.Module, classes: Sequence[str], dataset: str, basis: str) -> None:
        self.unit, self.model, self.dataset, self.basis = unit, model.eval(), dataset, basis
        self.classes = tuple(classes)[: unit.arm.spec.num_classes]

    @property
    def arm(self) -> str:
        return self.unit.arm.name

    @property
    def seed(self) -> int:
        return self.unit.seed

    @classmethod
    def open(cls, run_dir: Path | str, *, arm: str | None = None, seed: int | None = None) -> Predictor:
        """The model of `arm` (default: the arm the rule chooses) and `seed` (default: its first finished seed)."""
        folder = RunFolder.open(Path(run_dir))
        plan = folder.read_plan()
        unit, basis, _ = _select(folder, plan, arm, seed)
        return _load(folder, plan, unit, basis)

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) images -> float32 (N, classes) probabilities: softmax of the model's logits."""
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIZE, SIZE):
            raise DataError(
                f"images must be uint8 of shape (N, {SIZE}, {SIZE}), got {images.dtype} {images.shape}; "
                "preprocess them first (images.preprocess)"
            )
        pixels = torch.from_numpy(np.ascontiguousarray(images))
        out = [
            self.model(to_input(pixels[i : i + BATCH], channels_last=False)).float().softmax(dim=1)
            for i in range(0, len(pixels), BATCH)
        ]
        return (torch.cat(out) if out else torch.empty(0, len(self.classes))).numpy()

    def top_k(self, probabilities: np.ndarray, k: int) -> list[tuple[ClassScore, ...]]:
        """Each row's k most probable classes, most probable first (ties: the lower index first)."""
        return top_k(probabilities, self.classes, k)


def top_k(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[tuple[ClassScore, ...]]:
    """Each row's k most probable classes (k at most the number of classes), most probable first."""
    if k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {k}")
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        tuple(ClassScore(classes[i], int(i), float(row[i])) for i in indices)
        for row, indices in zip(probabilities, order)
    ]


def open_predictors(
    run_dir: Path | str, *, arm: str | None = None, seed: int | None = None, all_arms: bool = False
) -> tuple[list[Predictor], str, str]:
    """The models to predict with, the basis of the choice and a sentence explaining it."""
    if all_arms and arm is not None:
        raise ConfigError("--all predicts with every arm; drop --arm (or --all)")
    folder = RunFolder.open(Path(run_dir))
    plan = folder.read_plan()
    if all_arms:
        units = []
        for a in plan.arms:
            if any(folder.status(Unit(a, s)).state == "finished" for s in plan.seeds):
                units.append(_select(folder, plan, a.name, seed)[0])
        if not units:
            raise RunError(f"{folder} has no finished unit yet; resume it with `cnnlab compare --resume {folder}`")
        explanation = f"Every arm ({len(units)}), " + (
            f"seed {seed}" if seed is not None else "each with its first finished seed"
        )
        return [_load(folder, plan, u, ALL_ARMS) for u in units], ALL_ARMS, explanation
    unit, basis, explanation = _select(folder, plan, arm, seed)
    return [_load(folder, plan, unit, basis)], basis, explanation


def predict_files(
    run_dir: Path | str,
    paths: Sequence[Path | str],
    *,
    arm: str | None = None,
    seed: int | None = None,
    all_arms: bool = False,
    top_k: int = 3,
    preprocess: bool = True,
) -> PredictionResult:
    """Read image files (or folders), preprocess them for the run's dataset (unless `preprocess` is
    false) and predict each with the chosen arm (or every arm): each image's `top_k` classes."""
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    predictors, basis, explanation = open_predictors(run_dir, arm=arm, seed=seed, all_arms=all_arms)
    dataset = predictors[0].dataset
    named = read_images(paths)
    batch = preprocess_all(named, dataset, enabled=preprocess)
    per_arm = []
    for predictor in predictors:
        tops = predictor.top_k(predictor.predict(batch), top_k)
        per_arm.append([Prediction(name, predictor.arm, predictor.seed, t) for (name, _), t in zip(named, tops)])
    predictions = [p for image in zip(*per_arm) for p in image]  # image by image, arms side by side
    arms = tuple((p.arm, p.seed) for p in predictors)
    return PredictionResult(dataset, arms, basis, explanation, predictions)


# ---------------------------------------------------------------------------------------------
# Choosing the unit and loading its model


def _select(folder: RunFolder, plan: RunPlan, arm: str | None, seed: int | None) -> tuple[Unit, str, str]:
    """The unit to predict with, the basis of the choice and a sentence explaining it."""
    names = [a.name for a in plan.arms]
    if arm is not None:
        if arm not in names:
            raise ConfigError(f"--arm '{arm}' is not an arm of {folder}; its arms: {', '.join(names)}")
        chosen, basis, why = plan.arm(arm), CHOSEN_BY_USER if len(names) > 1 else ONLY_ARM, ""
    elif len(names) == 1:
        chosen, basis, why = plan.arms[0], ONLY_ARM, ""
    else:
        choice = analyze(folder).choice
        if choice is None:
            raise RunError(
                f"{folder}: no arm can be chosen (their accuracies are not numbers); name one with --arm "
                f"({', '.join(names)})"
            )
        chosen, basis = plan.arm(choice.arm), ON_TEST if choice.on_test else ON_VALIDATION
        why = ": " + choice.sentence(f"best of {len(names)} arms")
    finished = [s for s in plan.seeds if folder.status(Unit(chosen, s)).state == "finished"]
    if seed is not None:
        if seed not in plan.seeds:
            raise ConfigError(f"--seed {seed} is not a seed of {folder}; its seeds: {', '.join(map(str, plan.seeds))}")
        if seed not in finished:
            have = ", ".join(map(str, finished)) or "none"
            raise RunError(f"{chosen.name} seed {seed} has not finished in {folder}; finished seeds: {have}")
    elif not finished:
        raise RunError(f"{chosen.name} has no finished seed in {folder}; resume the run or choose another --arm")
    unit = Unit(chosen, seed if seed is not None else finished[0])
    return unit, basis, f"Arm {chosen.name}, seed {unit.seed} ({basis}){why}"


def _load(folder: RunFolder, plan: RunPlan, unit: Unit, basis: str) -> Predictor:
    spec = unit.arm.spec
    if tuple(spec.input_shape) != (SIZE, SIZE, 1):
        raise RunError(
            f"{unit.arm.name} takes {list(spec.input_shape)} inputs; cnnlab predicts only with models of "
            f"[{SIZE}, {SIZE}, 1] grayscale images"
        )
    model = folder.load_weights_into(unit, new_model(spec, None, _cpu_fp32()))
    return Predictor(unit, model, class_names(plan), plan.data.dataset, basis)


def _cpu_fp32() -> Hardware:
    return Hardware("cpu", "", "fp32", compiled=False, channels_last=False, threads=torch.get_num_threads())
