"""Learning-curve plots: the seed's train-vs-validation loss per model, accuracy, and all models overlaid.

With several seeds each seed's curve is drawn faint and the mean over seeds bold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cnnlab.runs import UnitResult, atomic_path  # noqa: E402

CURVES = {"loss": ("loss", "val_loss", "Categorical cross-entropy loss"),
          "accuracy": ("accuracy", "val_accuracy", "Accuracy")}


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


def save_figure(fig, path: Path) -> Path:
    """Save atomically (the format follows the suffix) and close the figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def model_figure(units: Sequence[UnitResult], curve: str, path: Path) -> Path:
    """One model: training vs validation per epoch (the seed's plot for curve='loss')."""
    train_key, val_key, ylabel = CURVES[curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    _draw(ax, units, val_key, "tab:blue", "Validation")
    _draw(ax, units, train_key, "tab:red", "Train")
    seeds = f" ({len(units)} seeds)" if len(units) > 1 else ""
    ax.set(title=f"{units[0].model}: {ylabel.lower()}{seeds}", xlabel="Epoch", ylabel=ylabel)
    ax.legend()
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def overlay_figure(groups: dict[str, Sequence[UnitResult]], path: Path) -> Path:
    """All models on one figure: loss and accuracy, validation solid and training dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (model, units) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        for ax, (train_key, val_key, ylabel) in zip(axes, CURVES.values()):
            _draw(ax, units, val_key, color, f"{model} validation")
            epochs, curves = _series(units, train_key)
            ax.plot(epochs, np.mean(curves, axis=0), color=color, linestyle="--", linewidth=1.2,
                    label=f"{model} train")
            ax.set(xlabel="Epoch", ylabel=ylabel)
    axes[0].set_title("Loss per epoch")
    axes[1].set_title("Accuracy per epoch")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_plots(run_dir: Path, units: Sequence[UnitResult], image_format: str = "png") -> list[Path]:
    """loss_<model>, accuracy_<model> and curves_all plots in the run folder."""
    groups: dict[str, list[UnitResult]] = {}
    for unit in units:
        groups.setdefault(unit.model, []).append(unit)
    paths = []
    for model, group in groups.items():
        for curve in CURVES:
            paths.append(model_figure(group, curve, run_dir / f"{curve}_{model}.{image_format}"))
    paths.append(overlay_figure(groups, run_dir / f"curves_all.{image_format}"))
    return paths
