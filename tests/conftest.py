"""Shared fixtures: the real-data folder (CNNLAB_DATA_DIR) and synthetic images."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything imports keras: tests use Keras on torch

from pathlib import Path

import pytest
import torch

from synthetic import learnable_tensors


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The folder of real IDX data (CI sets CNNLAB_DATA_DIR=../shared/data); skip without it."""
    value = os.environ.get("CNNLAB_DATA_DIR")
    if not value or not (Path(value) / "mnist").is_dir():
        pytest.skip(
            reason="real-data test: set CNNLAB_DATA_DIR to a folder with mnist/ IDX files (e.g. ../shared/data)"
        )
    return Path(value).resolve()  # tests run cnnlab from other folders


@pytest.fixture()
def tiny_images() -> tuple[torch.Tensor, torch.Tensor]:
    """128 synthetic 28x28 uint8 images whose label is readable from the pixels (learnable fast)."""
    return learnable_tensors(128)
