"""The run's figures: learning curves, confusion matrices, the most confident mistakes, and in a sweep
accuracy against each swept setting.

Learning curves are the notebook's train-vs-validation loss per model, accuracy, and all models
overlaid; with several seeds each notebook's curve is drawn faint and the mean over seeds bold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402

from cnnlab.files import atomic_path  # noqa: E402
from cnnlab.results import UnitResult  # noqa: E402
from cnnlab.stats import Aggregate, group_by_arm  # noqa: E402

CURVES = {
    "loss": ("loss", "val_loss", "Categorical cross-entropy loss"),
    "accuracy": ("accuracy", "val_accuracy", "Accuracy"),
}


def _series(units: Sequence[UnitResult], key: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Epoch numbers and one curve per seed, cut to the shortest history."""
    length = min(len(u.history) for u in units)
    curves = [np.array([getattr(r, key) for r in u.history[:length]]) for u in units]
    return np.arange(1, length + 1), curves


def _draw(ax, units: Sequence[UnitResult], key: str, color: str, label: str) -> None:
    epochs, curves = _series(units, key)
    if len(curves) > 1:
        for curve in curves:
            ax.plot(epochs, curve, color=color, alpha=0.25, linewidth=1)
    ax.plot(epochs, np.mean(curves, axis=0), color=color, linewidth=2, label=label, marker="o", markersize=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers


def save_figure(fig, path: Path) -> Path:
    """Save atomically (the format follows the suffix) and close the figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def model_figure(units: Sequence[UnitResult], curve: str, path: Path) -> Path:
    """One model: training vs validation per epoch (the notebook's plot for curve='loss')."""
    train_key, val_key, ylabel = CURVES[curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    _draw(ax, units, val_key, "tab:blue", "Validation")
    _draw(ax, units, train_key, "tab:red", "Train")
    seeds = f" ({len(units)} seeds)" if len(units) > 1 else ""
    ax.set(title=f"{units[0].arm}: {ylabel.lower()}{seeds}", xlabel="Epoch", ylabel=ylabel)
    ax.legend()
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def overlay_figure(groups: dict[str, Sequence[UnitResult]], path: Path) -> Path:
    """All models on one figure: loss and accuracy, validation solid and training dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (arm, units) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        for ax, (train_key, val_key, ylabel) in zip(axes, CURVES.values()):
            _draw(ax, units, val_key, color, f"{arm} validation")
            epochs, curves = _series(units, train_key)
            ax.plot(epochs, np.mean(curves, axis=0), color=color, linestyle="--", linewidth=1.2, label=f"{arm} train")
            ax.set(xlabel="Epoch", ylabel=ylabel)
    axes[0].set_title("Loss per epoch")
    axes[1].set_title("Accuracy per epoch")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def curve_path(out_dir: Path, curve: str, arm_folder: str, image_format: str) -> Path:
    """Where an arm's learning curve goes: `loss_<arm folder>.png` (the folder name is always safe)."""
    return out_dir / f"{curve}_{arm_folder}.{image_format}"


def write_plots(
    out_dir: Path, units: Sequence[UnitResult], folders: dict[str, str], image_format: str = "png"
) -> list[Path]:
    """loss_<arm>, accuracy_<arm> and curves_all plots; `folders` maps each arm's name to its folder.
    Arms tested without training (0 epochs, `--init-from`) have no curves."""
    groups = {arm: group for arm, group in group_by_arm(units).items() if has_curves(group)}
    paths = []
    for arm, group in groups.items():
        for curve in CURVES:
            paths.append(model_figure(group, curve, curve_path(out_dir, curve, folders[arm], image_format)))
    if groups:
        paths.append(overlay_figure(groups, out_dir / f"curves_all.{image_format}"))
    return paths


def has_curves(units: Sequence[UnitResult]) -> bool:
    """Whether an arm's units trained for at least one epoch, so that there are curves to draw."""
    return all(u.history for u in units)


def confusion_figure(matrix: np.ndarray, classes: Sequence[str], title: str, path: Path) -> Path:
    """A confusion matrix (rows: true class, columns: predicted) with each cell's count written in."""
    size = max(4.5, 0.45 * len(classes) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.92))
    # Rows are normalised for the colour so rare classes' errors stay visible; the numbers are counts.
    row_totals = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(matrix / row_totals, cmap="Blues", vmin=0, vmax=1)
    threshold = 0.5
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            dark = matrix[row, col] / row_totals[row, 0] > threshold
            ax.text(
                col,
                row,
                f"{count:,}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark else ("black" if row == col else "tab:red"),
            )
    ticks = np.arange(len(classes))
    ax.set_xticks(
        ticks,
        labels=classes,
        rotation=45 if max(map(len, classes)) > 2 else 0,
        ha="right" if max(map(len, classes)) > 2 else "center",
        fontsize=8,
    )
    ax.set_yticks(ticks, labels=classes, fontsize=8)
    ax.set(title=title, xlabel="Predicted class", ylabel="True class")
    return save_figure(fig, path)


def mistakes_figure(
    images: np.ndarray,
    true_labels: Sequence[int],
    predicted: Sequence[int],
    confidences: Sequence[float],
    classes: Sequence[str],
    title: str,
    path: Path,
    columns: int = 8,
) -> Path:
    """A grid of misclassified test images (uint8, (N, H, W) or (N, H, W, C)), labelled true / predicted.

    The grid is one image with the labels written under its tiles, not an axes per image: a
    third of the time to draw (BENCHMARKS.md "From command to table on the CPU")."""
    count, height, width = images.shape[:3]
    rows = max(1, -(-count // columns))
    gap, band = max(2, width // 7), round(height * 0.8)  # between tiles; under each tile, for its label
    # White background: 0 under gray_r (dark strokes on light, as the images are shown), 255 in colour.
    canvas = np.full((rows * (height + band), columns * (width + gap), *images.shape[3:]),
                     0 if images.ndim == 3 else 255, dtype=np.uint8)  # fmt: skip
    fig, ax = plt.subplots(figsize=(1.3 * columns, 1.75 * rows + 0.4))
    for i in range(count):
        top, left = (i // columns) * (height + band), (i % columns) * (width + gap)
        canvas[top : top + height, left : left + width] = images[i]
        ax.text(left + width / 2, top + height + 0.5, f"true {classes[true_labels[i]]}\npred "
                f"{classes[predicted[i]]}\n{confidences[i]:.1%}", ha="center", va="top", fontsize=7.5,
                linespacing=1.15)  # fmt: skip
    ax.imshow(canvas, cmap="gray_r" if images.ndim == 3 else None, vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def learning_rate_figure(units: Sequence[UnitResult], path: Path) -> Path:
    """One arm's learning rate at the end of each epoch (log scale; seeds overlaid)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for unit in units:
        epochs = [r.epoch for r in unit.history]
        ax.plot(epochs, [r.learning_rate for r in unit.history], marker="o", markersize=3, alpha=0.7,
                label=f"seed {unit.seed}")  # fmt: skip
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=f"{units[0].arm}: learning rate", xlabel="Epoch", ylabel="Learning rate")
    if len(units) > 1:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def image_grid_figure(originals: np.ndarray, augmented: np.ndarray, title: str, path: Path) -> Path:
    """Training images (top row) and augmented versions of them (rows below), uint8 (N, H, W)."""
    columns = len(originals)
    rows = 1 + len(augmented) // max(columns, 1)
    fig, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.15 * rows + 0.5), squeeze=False)
    images = np.concatenate([originals, augmented])
    for ax, image in zip(axes.flat, images):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        ax.axis("off")
    axes[0, 0].set_title("original", fontsize=7, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# One point of a settings plot: the setting's value, mean test accuracy, mean validation accuracy (or None).
SettingPoint = tuple[Any, Aggregate, Aggregate | None]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _value_label(value: Any) -> str:
    if value is None:
        return "none"
    return f"{value:g}" if _is_number(value) else str(value)


def _error(aggs: Sequence[Aggregate]) -> np.ndarray:
    """Error bars of 95% t intervals (none for one seed): (2, N) distances below and above the mean."""
    below = [0.0 if math.isnan(a.ci_low) else a.mean - a.ci_low for a in aggs]
    above = [0.0 if math.isnan(a.ci_high) else a.ci_high - a.mean for a in aggs]
    return np.array([below, above])


def settings_figure(key: str, lines: dict[str, Sequence[SettingPoint]], path: Path) -> Path:
    """Accuracy against one swept setting, one line per model: mean test accuracy (solid) and, where
    given, mean validation accuracy (dashed), with 95% t intervals as error bars. Numbers go on a
    numeric axis (logarithmic when they span a factor of 4 or more); other values (schedules, options)
    are categories, in the order first given."""
    values = [point[0] for points in lines.values() for point in points]
    numeric = all(_is_number(v) for v in values)
    categories = list(dict.fromkeys(_value_label(v) for v in values))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (model, points) in enumerate(lines.items()):
        color = colors[i % len(colors)]
        if numeric:
            points = sorted(points, key=lambda p: p[0])
            xs = np.array([float(p[0]) for p in points])
        else:  # side by side at each category, so error bars do not hide each other
            offset = 0.06 * (i - (len(lines) - 1) / 2)
            xs = np.array([categories.index(_value_label(p[0])) + offset for p in points])
        for index, style, marker, name in ((1, "-", "o", "test"), (2, "--", "s", "validation")):
            aggs = [p[index] for p in points]
            if any(a is None for a in aggs):
                continue
            ax.errorbar(xs, [a.mean for a in aggs], yerr=_error(aggs), color=color, linestyle=style, marker=marker,
                        markersize=4, capsize=3, linewidth=1.6, label=f"{model} {name}")  # fmt: skip
    if numeric:
        ticks = sorted(set(float(v) for v in values))
        if ticks[0] > 0 and ticks[-1] / ticks[0] >= 4:
            ax.set_xscale("log")
        ax.set_xticks(ticks, labels=[_value_label(v) for v in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        ax.set_xticks(range(len(categories)), labels=categories, rotation=20 if max(map(len, categories)) > 12 else 0,
                      ha="right" if max(map(len, categories)) > 12 else "center", fontsize=8)  # fmt: skip
        ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set(title=f"Accuracy against {key}", xlabel=key, ylabel="Accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
