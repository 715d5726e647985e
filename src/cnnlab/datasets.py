"""The MNIST-family datasets: registry, IDX reader, download and cache.

`load_dataset("mnist")` returns the four IDX files of a dataset as uint8 image and int64 label
tensors. Files come either from a user's data folder (`data_dir/<name>/`, never touching the
network) or from the cache (`cache_dir/<name>/`), where missing files are downloaded from the
registry's mirrors and every file is checked against its canonical MD5 before use.

Every problem a user can cause or meet (a missing, truncated or foreign file, a dead mirror)
raises `DataError` with a one-line message naming the file or URL and how to fix it.

A user's own images are a dataset too: `folder:PATH`, PATH holding one subfolder of images per
class. Their class names (`folder_classes`, `dataset_classes`) are read here; their images are
read and preprocessed by `image_folders`, which sits above `images` (this module is below it).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import struct
import unicodedata
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab import __version__
from cnnlab.config import DataSelection
from cnnlab.errors import DataError, DataWarning

__all__ = [
    "DATASETS",
    "FILE_KEYS",
    "FOLDER_PREFIX",
    "Dataset",
    "DatasetInfo",
    "dataset_classes",
    "dataset_status",
    "default_cache_dir",
    "download_file",
    "file_md5",
    "folder_classes",
    "folder_path",
    "is_folder_dataset",
    "load_dataset",
    "preprocessing_of",
    "read_idx",
]

# The order in which the four files are fetched, checked and reported.
FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")

# Every built-in dataset is MNIST-shaped; the trainer's models are built for this input size.
IMAGE_SHAPE = (28, 28)

_IDX_UNSIGNED_BYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_DOWNLOAD_CHUNK_BYTES = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DatasetInfo:
    """One registry entry: where a dataset comes from and what its files must look like."""

    name: str
    title: str
    classes: tuple[str, ...]
    files: dict[str, str]  # FILE_KEYS -> standard file name (.gz)
    md5: dict[str, str]  # FILE_KEYS -> canonical MD5 of the .gz file
    mirrors: tuple[str, ...]  # base URLs ending in "/", tried in order
    train_size: int
    test_size: int
    licence: str
    homepage: str


_STANDARD_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# Checksums and mirrors as torchvision lists them (torchvision/datasets/mnist.py); torchvision
# puts PyTorch's own S3 copy of MNIST first because yann.lecun.com has been failing (403/404).
DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        title="MNIST",
        classes=tuple(str(digit) for digit in range(10)),
        files=dict(_STANDARD_FILES),
        md5={
            "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
            "test_images": "9fb629c4189551a2d022fa330f9573f3",
            "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        train_size=60_000,
        test_size=10_000,
        licence="CC BY-SA 3.0 (Yann LeCun, Corinna Cortes, Christopher J.C. Burges)",
        homepage="http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        title="Fashion-MNIST",
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        files=dict(_STANDARD_FILES),
        md5={
            "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
            "test_images": "bef4ecab320f06d8554ea6380940ec79",
            "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        train_size=60_000,
        test_size=10_000,
        licence="MIT (Zalando SE)",
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    ),
    "kmnist": DatasetInfo(
        name="kmnist",
        title="Kuzushiji-MNIST",
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        files=dict(_STANDARD_FILES),
        md5={
            "train_images": "bdb82020997e1d708af4cf47b453dcf7",
            "train_labels": "e144d726b3acfaa3e44228e80efcd344",
            "test_images": "5c965bf0a639b31b8f53240b1b52f4d7",
            "test_labels": "7320c461ea6c1c855c0b718fb2a4b134",
        },
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        train_size=60_000,
        test_size=10_000,
        licence="CC BY-SA 4.0 (ROIS-DS Center for Open Data in the Humanities)",
        homepage="https://github.com/rois-codh/kmnist",
    ),
}


@dataclass
class Dataset:
    """A loaded dataset, ready for the trainer (tensors on the CPU)."""

    name: str
    classes: tuple[str, ...]
    train_images: torch.Tensor  # uint8, (N, 28, 28)
    train_labels: torch.Tensor  # int64, (N,)
    test_images: torch.Tensor  # uint8, (M, 28, 28)
    test_labels: torch.Tensor  # int64, (M,)
    source: Path  # folder the files were read from
    verified: bool  # all four files matched the canonical checksums
    unverified: tuple[str, ...] = ()  # names of the files that did not match (empty if verified)
    # A folder dataset: the selection with its split recorded (classes, test fraction, file count and
    # digest), which the run's plan must record so that resume, evaluate and report reproduce it.
    recorded: DataSelection | None = None


class _DownloadFailed(DataError):
    """One URL could not be fetched; `reason` is the short cause, for the all-mirrors message."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def default_cache_dir() -> Path:
    """Return the download cache: `$CNNLAB_HOME` if set, else `~/.cache/cnnlab`."""
    configured = os.environ.get("CNNLAB_HOME")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "cnnlab"


def file_md5(path: Path) -> str:
    """Return the hex MD5 of a file's bytes."""
    return _md5(Path(path).read_bytes())


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed or raw) into a writable array.

    Compression is detected from the gzip magic bytes, not the file name. Raises `DataError`
    for a missing, corrupt, truncated or over-long file, or one that is not unsigned-byte IDX.
    """
    path = Path(path)
    return _parse_idx(_read_bytes(path), path)


def load_dataset(
    name: str,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    download: bool = True,
    progress: bool = True,
) -> Dataset:
    """Load a registered dataset's train and test splits.

    With `data_dir`, read `data_dir/<name>/` (standard file names, `.gz` or raw) and never use
    the network; files whose checksums differ still load, with one `DataWarning`. Without it,
    use `cache_dir/<name>/` (default `default_cache_dir()`), downloading missing or corrupt files
    when `download` is true. Raises `DataError` for every missing or invalid file.
    """
    info = _lookup(name)
    if data_dir is not None:
        folder = Path(data_dir) / info.name
        files = _read_local_files(info, Path(data_dir))
    else:
        folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / info.name
        files = {key: _read_cached_file(info, key, folder, download, progress) for key in FILE_KEYS}

    unverified = tuple(path.name for key, (path, raw) in files.items() if _md5(raw) != info.md5[key])
    if unverified:
        uncompressed = any(not name.endswith(".gz") for name in unverified)
        note = " (the checksums are of the .gz files; uncompressed ones cannot match)"
        warnings.warn(
            f"{info.name}: {len(unverified)} of 4 files in {folder} do not match the canonical "
            f"checksums ({', '.join(unverified)}){note if uncompressed else ''}; they were "
            f"loaded anyway, but results may not match published numbers",
            DataWarning,
            stacklevel=2,
        )

    arrays = {key: _parse_idx(raw, path) for key, (path, raw) in files.items()}
    train_images, train_labels = _checked_pair(info, files, arrays, "train")
    test_images, test_labels = _checked_pair(info, files, arrays, "test")
    return Dataset(
        name=info.name,
        classes=info.classes,
        train_images=torch.from_numpy(train_images),
        train_labels=torch.from_numpy(train_labels).to(torch.int64),
        test_images=torch.from_numpy(test_images),
        test_labels=torch.from_numpy(test_labels).to(torch.int64),
        source=folder,
        verified=not unverified,
        unverified=unverified,
    )


# ----------------------------------------------------------------------------------------------
# Folder datasets: folder:PATH, one subfolder of images per class (torchvision's ImageFolder)

FOLDER_PREFIX = "folder:"
MAX_FOLDER_CLASSES = 1000
MAX_CLASS_NAME = 100  # characters of a class folder's name (names are shown, never used as paths)
# Besides hidden entries (a leading "."), what operating systems and archivers leave in folders.
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
# Control, format (bidirectional overrides), separator and surrogate (undecodable bytes) characters.
_HOSTILE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def is_folder_dataset(name: str) -> bool:
    """Whether a dataset name is `folder:PATH`, a user's folder of images."""
    return name.startswith(FOLDER_PREFIX)


def folder_path(name: str) -> Path:
    """The PATH of `folder:PATH` (absolute once a `DataSelection` has recorded it)."""
    return Path(name.removeprefix(FOLDER_PREFIX))


def preprocessing_of(dataset: str) -> str:
    """The dataset whose preprocessing an image gets: a folder dataset's images are made MNIST-style."""
    return "mnist" if is_folder_dataset(dataset) else dataset


def dataset_classes(selection: DataSelection) -> tuple[str, ...]:
    """The class names of a selection's dataset: the registry's, or a folder dataset's as its plan recorded
    them (a plan without them: the folder's class subfolders as they are now, if it can be read; else none)."""
    if selection.dataset in DATASETS:
        return DATASETS[selection.dataset].classes
    if selection.classes is not None:
        return tuple(selection.classes)
    if is_folder_dataset(selection.dataset):
        try:
            return folder_classes(folder_path(selection.dataset))
        except DataError:
            return ()
    return ()


def is_ignored(name: str) -> bool:
    """A folder entry that a folder dataset skips: hidden, or an operating system's or archiver's file."""
    return name.startswith(".") or name in IGNORED_NAMES


def folder_classes(root: Path) -> tuple[str, ...]:
    """A folder dataset's classes: the names of `root`'s subfolders, sorted (hidden ones skipped).

    Raises `DataError` in one line for a path that is not a folder, fewer than two classes, more
    than MAX_FOLDER_CLASSES, and a name that is not fit to show (see `check_class_name`)."""
    root = Path(root)
    where = f"{FOLDER_PREFIX}{root}"
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(f"{where}: {what}; give a folder with one subfolder of images per class")
    try:
        names = sorted(entry.name for entry in os.scandir(root) if not is_ignored(entry.name) and entry.is_dir())
    except OSError as error:
        raise DataError(
            f"{where}: the folder cannot be read ({error.strerror or error}); check its permissions"
        ) from None
    if len(names) < 2:
        found = f"only one ({_shown(names[0])})" if names else "none"
        raise DataError(
            f"{where}: needs one subfolder of images per class, at least two, found {found}; "
            f"put each class's images in a subfolder named after the class"
        )
    if len(names) > MAX_FOLDER_CLASSES:
        raise DataError(
            f"{where}: {len(names):,} class subfolders, more than {MAX_FOLDER_CLASSES:,}; "
            f"give a folder with one subfolder per class"
        )
    seen: dict[str, str] = {}
    for name in names:
        check_class_name(name, root)
        twin = seen.setdefault(unicodedata.normalize("NFC", name), name)
        if twin != name:
            raise DataError(
                f"{where}: class folders {_shown(twin)} and {_shown(name)} differ only in their Unicode form, "
                f"so their names would look the same; merge or rename one"
            )
    return tuple(names)


def check_class_name(name: str, root: Path) -> None:
    """A class folder's name is for display only: refused (DataError) if it holds control or format
    characters or undecodable bytes, a '$' (matplotlib's maths markup), is blank or longer than MAX_CLASS_NAME."""
    problem = None
    if any(unicodedata.category(c) in _HOSTILE_CATEGORIES for c in name):
        problem = "holds control or invisible characters (or bytes that are not text)"
    elif "$" in name:
        problem = "holds '$', which the plots would read as maths markup"
    elif not name.strip():
        problem = "is blank"
    elif len(name) > MAX_CLASS_NAME:
        problem = f"is {len(name)} characters long, more than {MAX_CLASS_NAME}"
    if problem:
        raise DataError(
            f"{FOLDER_PREFIX}{root}: class folder {_shown(name)} {problem}; class names are shown in tables and "
            f"plots, rename the folder to a plain name"
        )


def _shown(name: str) -> str:
    """A name as a message quotes it: non-printable characters escaped, long names cut."""
    text = repr(name)
    return text if len(text) <= 60 else text[:58] + "…'"


def dataset_status(name: str, data_dir: Path | None, cache_dir: Path) -> str:
    """Describe where a dataset's files stand, for `cnnlab datasets`.

    One of "local (data dir)", "local (data dir, checksums differ)", "missing from data dir
    (k of 4 files)", "cached", "cached, corrupt (will re-download)", "partly downloaded (k of 4
    files)" or "not downloaded".
    """
    info = _lookup(name)
    if data_dir is not None:
        folder = Path(data_dir) / info.name
        found = {key: _local_candidate(folder, info.files[key]) for key in FILE_KEYS}
        missing = sum(path is None for path in found.values())
        if missing:
            return f"missing from data dir ({missing} of 4 files)"
        matches = all(_md5(path.read_bytes()) == info.md5[key] for key, path in found.items())
        return "local (data dir)" if matches else "local (data dir, checksums differ)"

    folder = Path(cache_dir) / info.name
    present = [key for key in FILE_KEYS if (folder / info.files[key]).is_file()]
    if not present:
        return "not downloaded"
    if len(present) < len(FILE_KEYS):
        return f"partly downloaded ({len(present)} of 4 files)"
    if all(file_md5(folder / info.files[key]) == info.md5[key] for key in FILE_KEYS):
        return "cached"
    return "cached, corrupt (will re-download)"


def download_file(url: str, dest: Path, md5: str, progress: bool) -> None:
    """Download `url` to `dest` atomically, checking its MD5 while streaming.

    The bytes go to `dest.name + ".part"` in the same folder and are renamed onto `dest` only
    once the checksum matches, so `dest` is never half-written and no `.part` file is left
    behind, even on Ctrl-C. Raises `DataError` naming the URL on a network failure or mismatch.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    completed = False
    try:
        request = urllib.request.Request(url, headers={"User-Agent": f"cnnlab/{__version__}"})
        with contextlib.ExitStack() as stack:
            response = stack.enter_context(urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S))
            length_header = response.headers.get("Content-Length")
            has_length = bool(length_header) and length_header.isdigit()
            expected_bytes = int(length_header) if has_length else None
            out = stack.enter_context(open(part, "wb"))
            advance = _progress_bar(stack, dest.name, expected_bytes) if progress else None
            while chunk := response.read(_DOWNLOAD_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if advance is not None:
                    advance(len(chunk))
        if expected_bytes is not None and received != expected_bytes:
            raise _DownloadFailed(
                f"download of {url} ended early ({received} of {expected_bytes} bytes); "
                f"try again, or pass --data-dir with the files already downloaded",
                reason=f"ended early after {received} of {expected_bytes} bytes",
            )
        actual = digest.hexdigest()
        if actual != md5:
            raise _DownloadFailed(
                f"download of {url} has the wrong checksum (expected MD5 {md5}, got {actual}); "
                f"the server sent a different file: try again later or pass --data-dir",
                reason=f"wrong checksum, expected MD5 {md5}, got {actual}",
            )
        os.replace(part, dest)
        completed = True
    except urllib.error.HTTPError as error:
        error.close()  # an HTTPError holds the open response; release its socket now
        raise _DownloadFailed(
            f"download of {url} failed: HTTP {error.code} {error.reason}; "
            f"check the URL or pass --data-dir with the files already downloaded",
            reason=f"HTTP {error.code} {error.reason}",
        ) from error
    except urllib.error.URLError as error:
        raise _DownloadFailed(
            f"download of {url} failed: {error.reason}; check the network connection or pass "
            f"--data-dir with the files already downloaded",
            reason=str(error.reason),
        ) from error
    # OSError covers timeouts, resets, TLS and disk errors; HTTPException a broken response.
    except (OSError, http.client.HTTPException) as error:
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise _DownloadFailed(
            f"download of {url} failed: {reason}; check the network connection and free disk "
            f"space in {dest.parent}, or pass --data-dir with the files already downloaded",
            reason=reason,
        ) from error
    finally:
        if not completed:
            part.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Loading


def _lookup(name: str) -> DatasetInfo:
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        if is_folder_dataset(name):  # a programming slip: api.load_data and image_folders read these
            raise DataError(
                f"{name}: a folder dataset is read by cnnlab.image_folders.load_selection, not load_dataset"
            )
        raise DataError(
            f"unknown dataset {name!r}; known datasets: {known}, or folder:PATH for a folder with one "
            f"subfolder of images per class"
        )
    return DATASETS[name]


def _md5(raw: bytes) -> str:
    return hashlib.md5(raw, usedforsecurity=False).hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror}); check that it is a readable file") from error


def _local_candidate(folder: Path, standard_name: str) -> Path | None:
    """The file to read for one entry of a data folder: the .gz first (it can be verified)."""
    for candidate in (folder / standard_name, folder / standard_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_local_files(info: DatasetInfo, data_dir: Path) -> dict[str, tuple[Path, bytes]]:
    folder = data_dir / info.name
    found = {key: _local_candidate(folder, info.files[key]) for key in FILE_KEYS}
    missing = [folder / info.files[key] for key, path in found.items() if path is None]
    if missing:
        listed = ", ".join(str(path) for path in missing)
        hint = ""
        if (data_dir / info.files["train_images"]).is_file():
            # A common slip: pointing --data-dir at the dataset's own folder.
            hint = f" (--data-dir should be the folder that contains {info.name}/, not the files)"
        raise DataError(
            f"{info.name}: missing {listed} (or the same name without .gz){hint}; "
            f"put the file there, or drop --data-dir to download into the cache"
        )
    return {key: (path, _read_bytes(path)) for key, path in found.items()}


def _read_cached_file(info: DatasetInfo, key: str, folder: Path, download: bool, progress: bool) -> tuple[Path, bytes]:
    path = folder / info.files[key]
    if path.is_file():
        raw = _read_bytes(path)
        actual = _md5(raw)
        if actual == info.md5[key]:
            return path, raw
        if not download:
            raise DataError(
                f"{path}: cached file is corrupt (MD5 {actual}, expected {info.md5[key]}); "
                f"delete it and load again with downloading enabled, or use --data-dir"
            )
        path.unlink()
    elif not download:
        raise DataError(
            f"{info.name}: {path} is not downloaded and downloading is disabled; enable "
            f"downloading, or pass --data-dir DIR with the four IDX files in DIR/{info.name}/"
        )
    _download_from_mirrors(info, key, path, progress)
    return path, _read_bytes(path)


def _download_from_mirrors(info: DatasetInfo, key: str, dest: Path, progress: bool) -> None:
    failures = []
    for mirror in info.mirrors:
        url = mirror.rstrip("/") + "/" + info.files[key]
        try:
            download_file(url, dest, info.md5[key], progress)
            return
        except _DownloadFailed as error:
            failures.append(f"{url} ({error.reason})")
    raise DataError(
        f"{info.name}: could not download {info.files[key]} from any mirror (tried "
        f"{'; '.join(failures)}); check the network connection, or fetch the files yourself "
        f"and pass --data-dir DIR with them in DIR/{info.name}/"
    )


def _progress_bar(stack: contextlib.ExitStack, label: str, total: int | None) -> Callable[[int], None]:
    """Start a rich download bar on stderr; return the function that advances it."""
    # Imported here: rich's progress machinery is only needed when a download happens.
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = stack.enter_context(
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
    )
    task = bar.add_task(f"Downloading {label}", total=total)
    return lambda size: bar.advance(task, size)


# ----------------------------------------------------------------------------------------------
# The IDX format: 2 zero bytes, a type code, the number of dimensions, then each dimension as a
# big-endian uint32, then the values in C order.


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, zlib.error, EOFError) as error:  # BadGzipFile is an OSError
            raise DataError(
                f"{path}: corrupt gzip data ({error}); the file is damaged or was cut short, "
                f"replace it with a fresh copy"
            ) from None

    if len(raw) < 4:
        raise DataError(
            f"{path}: only {len(raw)} bytes, too short for an IDX header; "
            f"the file is truncated, replace it with a fresh copy"
        )
    zero_a, zero_b, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero_a != 0 or zero_b != 0:
        raise DataError(
            f"{path}: bad magic number 0x{raw[:4].hex()} (an IDX file starts with two zero "
            f"bytes); this is not an IDX file, replace it with the original file"
        )
    if type_code != _IDX_UNSIGNED_BYTE:
        raise DataError(
            f"{path}: bad magic number 0x{raw[:4].hex()}: element type 0x{type_code:02x} is not "
            f"unsigned byte (0x08); cnnlab reads only unsigned-byte IDX, replace it with the "
            f"original file"
        )
    if ndim == 0:
        raise DataError(
            f"{path}: bad magic number 0x{raw[:4].hex()}: zero dimensions; "
            f"this is not a data file, replace it with the original file"
        )

    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise DataError(
            f"{path}: truncated header ({len(raw)} bytes, {ndim} dimensions need {header_bytes}); "
            f"the file was cut short, replace it with a fresh copy"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_bytes])
    expected = int(np.prod(shape, dtype=np.int64))
    payload = len(raw) - header_bytes
    if payload < expected:
        raise DataError(
            f"{path}: truncated file: header says shape {shape} ({expected} bytes of data) but "
            f"only {payload} bytes follow; the file was cut short, replace it with a fresh copy"
        )
    if payload > expected:
        raise DataError(
            f"{path}: {payload - expected} bytes of trailing garbage after the {expected} bytes "
            f"of data that shape {shape} needs; the file is damaged, replace it with a fresh copy"
        )
    # frombuffer views the bytes without a Python loop; the copy makes the array writable so
    # torch.from_numpy can share it without a warning.
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape).copy()


def _checked_pair(
    info: DatasetInfo,
    files: dict[str, tuple[Path, bytes]],
    arrays: dict[str, np.ndarray],
    split: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Check one split's images and labels against each other and the dataset."""
    images_path, labels_path = files[f"{split}_images"][0], files[f"{split}_labels"][0]
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.ndim != 3:
        raise DataError(
            f"{images_path}: expected 3-D images (count, height, width), found shape "
            f"{images.shape}; this is not an image file, check that it is the {split} images file"
        )
    if labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected 1-D labels (count,), found shape {labels.shape}; "
            f"this is not a label file, check that it is the {split} labels file"
        )
    if images.shape[1:] != IMAGE_SHAPE:
        height, width = images.shape[1:]
        raise DataError(
            f"{images_path}: images are {height}x{width} but {info.name} images are "
            f"{IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}; replace it with the original {info.title} file"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{info.name} {split} split: {images_path} holds {len(images)} images but "
            f"{labels_path} holds {len(labels)} labels; the counts must agree, "
            f"replace both with a matching pair"
        )
    out_of_range = np.flatnonzero(labels >= len(info.classes))
    if out_of_range.size:
        index = int(out_of_range[0])
        raise DataError(
            f"{labels_path}: label {int(labels[index])} at index {index} is out of range "
            f"[0, {len(info.classes)}) for {info.name} ({out_of_range.size} such labels); "
            f"replace it with the original {info.title} labels file"
        )
    return images, labels
