"""The tests' one source of synthetic data: small IDX files, dataset folders and learnable images."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from cnnlab.datasets import DATASETS, FILE_KEYS

TRAIN_COUNT, TEST_COUNT = 6, 4


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Encode an array as an IDX file: magic (0, 0, type, ndim), big-endian dims, data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    data = idx_bytes(array)
    # mtime=0 makes the gzip bytes, and so their MD5, reproducible.
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def tiny_split_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Small but valid MNIST-shaped arrays for the four files."""
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (TRAIN_COUNT, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, TRAIN_COUNT, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (TEST_COUNT, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, TEST_COUNT, dtype=np.uint8),
    }


def write_dataset_folder(
    folder: Path, arrays: dict[str, np.ndarray] | None = None, compress: bool = True
) -> dict[str, Path]:
    """Write the four standard files (as in the registry) into folder; return their paths."""
    arrays = arrays if arrays is not None else tiny_split_arrays()
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key in FILE_KEYS:
        name = DATASETS["mnist"].files[key]
        name = name if compress else name.removesuffix(".gz")
        paths[key] = write_idx(folder / name, arrays[key], compress=compress)
    return paths


def learnable_arrays(train: int = 512, test: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """MNIST-shaped images whose class is a bright bar's row: a model learns them in a few steps."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", train), ("test", test)):
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        images = rng.integers(0, 40, (count, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 4, 4:24] = 255
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays


def learnable_tensors(count: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` learnable images and their labels as tensors (uint8 images, int64 labels)."""
    arrays = learnable_arrays(train=count, test=1, seed=seed)
    return torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["train_labels"]).long()


# A small CNN spec that trains in a fraction of a second on the images above.
SMALL_SPEC = """
name = "small"
input_shape = [28, 28, 1]
[[layers]]
type = "Conv2D"
filters = 4
kernel_size = 3
strides = 2
activation = "relu"
[[layers]]
type = "Flatten"
[[layers]]
type = "Dense"
units = 10
activation = "softmax"
"""
