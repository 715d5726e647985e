"""Shared fixtures: the real-data folder (CNNLAB_DATA_DIR) and a tiny synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The folder of real IDX data (CI sets CNNLAB_DATA_DIR=../shared/data); skip without it."""
    value = os.environ.get("CNNLAB_DATA_DIR")
    if not value or not (Path(value) / "mnist").is_dir():
        pytest.skip(reason="real-data test: set CNNLAB_DATA_DIR to a folder with mnist/ IDX files (e.g. ../shared/data)")
    return Path(value).resolve()  # tests run cnnlab from other folders


@pytest.fixture()
def tiny_images() -> tuple[torch.Tensor, torch.Tensor]:
    """128 synthetic 28x28 uint8 images whose label is readable from the pixels (learnable fast)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(128) % 10
    images = torch.randint(0, 40, (128, 28, 28), generator=generator, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 2 * label:2 * label + 4, 4:24] = 255  # a bright bar whose row encodes the class
    return images, labels
