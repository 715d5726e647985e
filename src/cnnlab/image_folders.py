"""Folder datasets: `--dataset folder:PATH` trains on a user's own images.

PATH holds one subfolder of images per class, as torchvision's ImageFolder expects:

    PATH/cat/0001.png   PATH/cat/more/0002.jpg   PATH/dog/0001.png   ...

The classes are the subfolders' names, sorted; a class's images are every picture (PNG, JPEG, BMP,
TIFF), .npy or IDX file below its folder (nested folders too), read by `images.read_images`. Hidden
entries (a leading ".") and the files operating systems leave behind (Thumbs.db, __MACOSX) are
skipped; files at PATH's top level are not images of any class and are skipped too, unless they are
images (then refused: they belong in a class folder).

Every image is made MNIST-style by `images.preprocess(image, "mnist")`, the preprocessing
`cnnlab predict` applies to MNIST runs: grayscale, light ink on black, cropped to the ink, fit to
20x20 and centred by centre of mass in 28x28. An image that is already 28x28 grayscale is used as it
is, so a folder of MNIST-like images trains on exactly its pixels.

The test split is each class's `test_fraction` (default 0.2, rounded, at least one image and at least
one left to train on) drawn from the images' names with a fixed seed: the same folder always gives
the same split, whichever command loads it, and adding an image moves at most that image. Training
and test images are ordered by the same kind of hash, so `--limit-train N` keeps every class.

The first load records, in the run's `DataSelection`, the class names, the number of files and a
digest of their names and bytes (`Dataset.recorded`); every later load checks them and refuses a
folder that changed since. Every problem (not a folder, fewer than two classes, an empty class, an
unreadable or non-image file, an image without ink, too many or too large files, a class name unfit
to show) is a `DataError` in one line, naming the folder or file and the fix, before anything is
written. Class names are only shown; nothing derived from them chooses a path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.config import DataSelection
from cnnlab.datasets import (
    FOLDER_PREFIX,
    Dataset,
    default_cache_dir,
    folder_classes,
    folder_path,
    is_folder_dataset,
    is_ignored,
    load_dataset,
    preprocessing_of,
)
from cnnlab.errors import DataError
from cnnlab.images import FORMATS, is_image_file, preprocess, read_images

__all__ = [
    "DEFAULT_TEST_FRACTION",
    "FolderListing",
    "folder_digest",
    "load_folder",
    "load_selection",
    "scan_folder",
    "split_folder",
]

DEFAULT_TEST_FRACTION = 0.2
MAX_FOLDER_IMAGES = 200_000  # files while listing, then images (a .npy file may hold several)
MAX_FOLDER_BYTES = 2_000_000_000  # all files together, before any is read
DIGEST_ALGORITHM = "sha256"
_SPLIT_SEED = "cnnlab-folder-split/1"  # fixed: the split depends on the images' names only
_ORDER_SEED = "cnnlab-folder-order/1"


@dataclass(frozen=True)
class FolderListing:
    """What a folder dataset holds, before any image is decoded."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[tuple[int, str], ...]  # (label, path relative to root with "/"), in (label, path) order
    total_bytes: int


def load_selection(selection: DataSelection, *, progress: bool = False) -> Dataset:
    """The selection's dataset: a folder dataset (`folder:PATH`, see `load_folder`), or a registered
    one from `selection.data_dir` or the download cache (`datasets.load_dataset`)."""
    if is_folder_dataset(selection.dataset):
        return load_folder(selection)
    data_dir = Path(selection.data_dir) if selection.data_dir else None
    return load_dataset(selection.dataset, data_dir=data_dir, cache_dir=default_cache_dir(), progress=progress)


def load_folder(selection: DataSelection) -> Dataset:
    """A folder dataset's train and test images, preprocessed MNIST-style to uint8 (N, 28, 28).

    `Dataset.recorded` is the selection with the split recorded (classes, test fraction, files,
    digest); a selection that recorded them already must match the folder as it is now."""
    where = selection.dataset
    listing = scan_folder(folder_path(where))
    digest = folder_digest(listing)
    _check_unchanged(selection, listing, digest)
    keys, images, labels = _read(listing)
    fraction = selection.test_fraction if selection.test_fraction is not None else DEFAULT_TEST_FRACTION
    test_index, train_index = split_folder(keys, labels, fraction, listing)
    as_tensor = lambda index: torch.from_numpy(images[index])
    as_labels = lambda index: torch.from_numpy(labels[index]).to(torch.int64)
    recorded = dataclasses.replace(
        selection,
        test_fraction=fraction,
        classes=listing.classes,
        folder_files=len(listing.files),
        folder_digest=digest,
    )
    return Dataset(
        name=where,
        classes=listing.classes,
        train_images=as_tensor(train_index),
        train_labels=as_labels(train_index),
        test_images=as_tensor(test_index),
        test_labels=as_labels(test_index),
        source=listing.root,
        verified=True,
        recorded=recorded,
    )


def scan_folder(root: Path) -> FolderListing:
    """List a folder dataset's classes and image files, refusing (DataError) what cannot be one."""
    root = Path(root)
    where = f"{FOLDER_PREFIX}{root}"
    classes = folder_classes(root)  # not a folder, fewer than two classes, hostile names
    _refuse_loose_images(root)
    files: list[tuple[int, str]] = []
    total_bytes = 0
    for label, name in enumerate(classes):
        found = 0
        for path in _class_files(root / name, where):
            relative = path.relative_to(root).as_posix()
            if not is_image_file(path):
                raise DataError(
                    f"{where}: {_shown(relative)} is not an image file ({FORMATS}); remove it from the class folder"
                )
            try:
                total_bytes += path.stat().st_size
            except OSError as error:
                raise DataError(
                    f"{where}: {_shown(relative)} cannot be read ({error.strerror or error}); "
                    f"check its permissions or remove it"
                ) from None
            files.append((label, relative))
            found += 1
            if len(files) > MAX_FOLDER_IMAGES:
                raise DataError(
                    f"{where}: more than {MAX_FOLDER_IMAGES:,} image files; give a folder of at most "
                    f"{MAX_FOLDER_IMAGES:,} images"
                )
        if not found:
            raise DataError(
                f"{where}: class folder {_shown(name)} holds no images ({FORMATS}); add its images or remove the folder"
            )
    if total_bytes > MAX_FOLDER_BYTES:
        raise DataError(
            f"{where}: the images take {total_bytes / 1e9:.1f} GB, more than {MAX_FOLDER_BYTES / 1e9:g} GB; "
            f"shrink them (28x28 is all the models see) or give fewer"
        )
    return FolderListing(root, classes, tuple(files), total_bytes)


def folder_digest(listing: FolderListing) -> str:
    """`sha256:HEX` of every file's class-relative path and the SHA-256 of its bytes, in order."""
    outer = hashlib.sha256()
    for _, relative in listing.files:
        path = listing.root / relative
        try:
            inner = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as error:
            raise DataError(
                f"{FOLDER_PREFIX}{listing.root}: {_shown(relative)} cannot be read ({error.strerror or error}); "
                f"check its permissions or remove it"
            ) from None
        outer.update(relative.encode("utf-8", "surrogateescape") + b"\0" + inner.encode("ascii") + b"\n")
    return f"{DIGEST_ALGORITHM}:{outer.hexdigest()}"


def split_folder(
    keys: list[str], labels: np.ndarray, fraction: float, listing: FolderListing
) -> tuple[np.ndarray, np.ndarray]:
    """(test, train) indices: each class's round(fraction x n) images (at least one, leaving one to
    train on) whose seeded hash of their name is smallest; each side ordered by another hash."""
    test: list[int] = []
    train: list[int] = []
    for label, name in enumerate(listing.classes):
        members = np.flatnonzero(labels == label).tolist()
        if len(members) < 2:
            raise DataError(
                f"{FOLDER_PREFIX}{listing.root}: class folder {_shown(name)} holds {len(members)} image; each "
                f"class needs at least 2 (one to train on, one to test on), add images"
            )
        count = min(len(members) - 1, max(1, math.floor(len(members) * fraction + 0.5)))
        members.sort(key=lambda i: _hash(_SPLIT_SEED, keys[i]))
        test += members[:count]
        train += members[count:]
    order = lambda index: np.array(sorted(index, key=lambda i: _hash(_ORDER_SEED, keys[i])), dtype=np.int64)
    return order(test), order(train)


# ----------------------------------------------------------------------------------------------


def _check_unchanged(selection: DataSelection, listing: FolderListing, digest: str) -> None:
    """A selection that recorded the folder (a run's plan) must find it as it was."""
    where = selection.dataset
    fix = "restore it or start a new run"
    if selection.folder_digest is not None and selection.folder_digest != digest:
        before, now = selection.folder_files, len(listing.files)
        if before is None or before == now:
            detail = f"the same number of files, {now:,}, but files renamed or edited"
        else:
            change = "added" if now > before else "removed"
            detail = f"{abs(now - before):,} files {change}: {before:,} then, {now:,} now"
        raise DataError(f"{where} changed since the run ({detail}); {fix}")
    if selection.classes is not None and tuple(selection.classes) != listing.classes:
        raise DataError(
            f"{where} changed since the run (classes {', '.join(selection.classes)} then, "
            f"{', '.join(listing.classes)} now); {fix}"
        )


def _read(listing: FolderListing) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every image of the listing, preprocessed: (names, uint8 (N, 28, 28), int64 labels)."""
    where = f"{FOLDER_PREFIX}{listing.root}"
    keys: list[str] = []
    images: list[np.ndarray] = []
    labels: list[int] = []
    dataset = preprocessing_of(FOLDER_PREFIX)
    for label, relative in listing.files:
        path = listing.root / relative
        try:
            named = read_images([path])
            for name, image in named:
                keys.append(relative + name.removeprefix(str(path)))  # "cls/a.png" or "cls/a.npy[3]"
                images.append(preprocess(image, dataset, name))
                labels.append(label)
        except DataError as error:
            raise DataError(f"{error} (in {where}: remove or replace this file)") from None
        if len(keys) > MAX_FOLDER_IMAGES:
            raise DataError(
                f"{where}: more than {MAX_FOLDER_IMAGES:,} images (counting each image of a .npy or IDX file); "
                f"give a folder of at most {MAX_FOLDER_IMAGES:,} images"
            )
    return keys, np.stack(images), np.array(labels, dtype=np.int64)


def _class_files(folder: Path, where: str) -> list[Path]:
    """Every file below a class folder (nested folders too, links to folders refused), sorted."""
    files: list[Path] = []

    def refuse(error: OSError) -> None:
        raise DataError(
            f"{where}: {_shown(str(error.filename))} cannot be read ({error.strerror or error}); check its permissions"
        )

    for top, dirs, names in os.walk(folder, onerror=refuse):
        here = Path(top)
        for name in dirs:
            if not is_ignored(name) and (here / name).is_symlink():
                raise DataError(
                    f"{where}: {_shown((here / name).relative_to(folder.parent).as_posix())} is a link to a folder, which cnnlab does not follow; "
                    f"copy its images into the class folder"
                )
        dirs[:] = sorted(name for name in dirs if not is_ignored(name))
        files += [here / name for name in sorted(names) if not is_ignored(name)]
        if len(files) > MAX_FOLDER_IMAGES:
            break  # the caller refuses the count
    return sorted(files)


def _refuse_loose_images(root: Path) -> None:
    """Images at the top level belong to no class: refused, not silently left out."""
    loose = sorted(
        e.name for e in os.scandir(root) if not is_ignored(e.name) and e.is_file() and is_image_file(Path(e.name))
    )
    if loose:
        which = (
            f"{_shown(loose[0])} and {len(loose) - 1} more images lie" if len(loose) > 1 else f"{_shown(loose[0])} lies"
        )
        raise DataError(
            f"{FOLDER_PREFIX}{root}: {which} outside the class subfolders; move each image into the subfolder "
            f"of its class"
        )


def _hash(seed: str, key: str) -> bytes:
    return hashlib.sha256(f"{seed}/{key}".encode("utf-8", "surrogateescape")).digest()


def _shown(name: str) -> str:
    """A file or folder name as a message quotes it: non-printable characters escaped."""
    return name if name.isprintable() else repr(name)
