"""Folder datasets (`--dataset folder:PATH`, image_folders.py): a folder of generated PNGs trains end to
end through the command line as typed (table, report with the folders' class names, evaluate, predict);
the test split is stratified, recorded in the plan and the same on resume; a changed folder is refused
on resume; every bad folder is refused in one line before any run folder is written."""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.cli import main
from cnnlab.config import DataSelection
from cnnlab.datasets import dataset_classes, load_dataset, preprocessing_of
from cnnlab.errors import ConfigError, DataError
from cnnlab.image_folders import load_folder, load_selection
from cnnlab.images import preprocess
from cnnlab_cli import run_cnnlab

CLASSES = ("carré", "horizontal", "vertical")  # sorted, as the folder names sort
PER_CLASS = 40

# Three outputs, one per class folder: predictions can only name the folders' classes.
SPEC = """
name = "shapes"
input_shape = [28, 28, 1]
[[layers]]
type = "Conv2D"
filters = 8
kernel_size = 3
strides = 2
activation = "relu"
[[layers]]
type = "Flatten"
[[layers]]
type = "Dense"
units = 3
activation = "softmax"
"""


def shape_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A dark shape on light, noisy paper, at a random place and size, in a 36x36 RGB picture: the
    MNIST-style preprocessing crops, scales and centres it (a square, a horizontal or a vertical bar)."""
    image = rng.integers(200, 256, (36, 36, 3), dtype=np.uint8)
    long, short = int(rng.integers(14, 26)), int(rng.integers(3, 6))
    height, width = [(long, long), (short, long), (long, short)][label]
    top, left = int(rng.integers(0, 36 - height)), int(rng.integers(0, 36 - width))
    image[top : top + height, left : left + width] = rng.integers(0, 40, 3, dtype=np.uint8)
    return image


def write_shapes(root: Path, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    """root/<class>/NNN.png for the three classes, plus files a folder dataset skips."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(shape_image(label, rng)).save(root / name / f"{i:03d}.png")
    (root / "README.txt").write_text("three classes of shapes\n")  # a top-level non-image: skipped
    (root / CLASSES[0] / ".DS_Store").write_bytes(b"\0\1")  # hidden: skipped
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes") / "shapes")


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture()
def cnnlab(capsys):
    """`cnnlab ARGS` in this process (faster than a fresh one per case)."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# End to end, as a user types it


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> tuple[Path, Path, Path]:
    """`cnnlab compare shapes.toml --dataset folder:shapes --epochs 2` in a fresh process, the folder
    given relative to the working directory; returns (working directory, run folder, spec file)."""
    work = shapes.parent
    spec = work / "shapes.toml"
    spec.write_text(SPEC)
    result = run_cnnlab(
        "compare", "shapes.toml", "--dataset", f"folder:{shapes.name}", "--epochs", "2", "--batch-size", "16",
        "--lr", "0.01", "--device", "cpu", "--runs-dir", "runs", cwd=work, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (run_dir,) = (work / "runs").iterdir()
    assert "Comparison" in result.stdout and "shapes" in result.stdout
    assert "96 training / 24 test images of folder:" in " ".join(result.stdout.split())
    return work, run_dir, spec


def test_a_folder_of_pngs_trains_end_to_end(trained, shapes):
    work, run_dir, _ = trained
    data = tomllib.loads((run_dir / "config.toml").read_text())["data"]
    assert data["dataset"] == f"folder:{shapes.resolve()}"  # recorded absolute
    assert data["classes"] == list(CLASSES) and data["test_fraction"] == 0.2
    assert data["folder_files"] == 3 * PER_CLASS and data["folder_digest"].startswith("sha256:")

    report = (run_dir / "report.md").read_text()
    assert all(name in report for name in CLASSES)  # per-class table: the folders' names
    assert "carré" in (run_dir / "report.html").read_text()

    evaluated = run_cnnlab("evaluate", str(run_dir), "--device", "cpu", cwd=work)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "24 images" in evaluated.stdout

    picture = shapes / "vertical" / "007.png"
    predicted = run_cnnlab("predict", str(run_dir), str(picture), "--json", cwd=work)
    assert predicted.returncode == 0, predicted.stderr
    (prediction,) = json.loads(predicted.stdout)
    assert prediction["top"][0]["class"] in CLASSES
    assert {entry["class"] for entry in prediction["top"]} == set(CLASSES)  # three outputs, named by the folders


def test_resume_reproduces_the_recorded_split_and_refuses_a_changed_folder(trained, shapes, cnnlab):
    from cnnlab.api import prepare_resume
    from cnnlab.runfolder import RunFolder

    _, run_dir, _ = trained
    plan = RunFolder.open(run_dir).read_plan()
    first = load_folder(plan.data)
    again = prepare_resume(run_dir)  # the run is finished: nothing trains, the data loads and is checked
    assert again.dataset.test_images.equal(first.test_images) and again.dataset.test_labels.equal(first.test_labels)
    assert again.dataset.recorded == plan.data

    extra = shapes / "horizontal" / "zzz-extra.png"
    shutil.copy(shapes / "horizontal" / "000.png", extra)
    try:
        line = one_error_line(cnnlab("compare", "--resume", str(run_dir)))
        assert f"folder:{shapes.resolve()} changed since the run (1 files added: 120 then, 121 now)" in line
        assert "restore it or start a new run" in line
    finally:
        extra.unlink()
    edited = shapes / "vertical" / "003.png"
    original = edited.read_bytes()
    edited.write_bytes((shapes / "vertical" / "004.png").read_bytes())
    try:
        with pytest.raises(DataError, match=r"the same number of files, 120, but files renamed or edited"):
            load_folder(plan.data)
    finally:
        edited.write_bytes(original)
    assert load_folder(plan.data).recorded == plan.data  # restored: accepted again


# ---------------------------------------------------------------------------------------------
# The split


def test_the_split_is_stratified_drawn_from_names_and_recorded(shapes, tmp_path):
    selection = DataSelection(dataset=f"folder:{shapes}")
    dataset = load_folder(selection)
    assert dataset.classes == CLASSES and dataset.name == f"folder:{shapes.resolve()}"
    assert dataset.train_images.shape == (96, 28, 28) and dataset.test_images.shape == (24, 28, 28)
    assert dataset.train_images.dtype == dataset.test_images.dtype == torch.uint8
    assert dataset.test_labels.bincount().tolist() == [8, 8, 8]  # 0.2 of each class
    assert dataset.train_labels.bincount().tolist() == [32, 32, 32]
    assert len(set(dataset.train_labels[:12].tolist())) == 3  # ordered by hash: --limit-train keeps every class

    recorded = dataset.recorded
    assert recorded is not None and recorded.classes == CLASSES and recorded.test_fraction == 0.2
    assert recorded.folder_files == 120 and recorded.folder_digest.startswith("sha256:")
    assert DataSelection(**{k: v for k, v in recorded.__dict__.items()}) == recorded  # as config.toml reads it back
    assert dataset_classes(recorded) == CLASSES

    # The same folder elsewhere (a copy) gives the same split: it depends on the names, not on a run.
    copy = load_folder(DataSelection(dataset=f"folder:{copy_of(shapes, tmp_path)}"))
    assert copy.test_images.equal(dataset.test_images) and copy.train_labels.equal(dataset.train_labels)
    assert copy.recorded.folder_digest == recorded.folder_digest

    # Another test fraction, still stratified; each class keeps an image on either side.
    quarter = load_folder(DataSelection(dataset=f"folder:{shapes}", test_fraction=0.25))
    assert quarter.test_labels.bincount().tolist() == [10, 10, 10]


def test_images_are_preprocessed_as_predict_preprocesses_them(shapes):
    dataset = load_folder(DataSelection(dataset=f"folder:{shapes}"))
    picture = np.asarray(Image.open(shapes / "vertical" / "000.png"))
    expected = preprocess(picture, preprocessing_of(dataset.name), "000.png")
    images = np.concatenate([dataset.train_images.numpy(), dataset.test_images.numpy()])
    assert any(np.array_equal(image, expected) for image in images)
    assert preprocessing_of(dataset.name) == "mnist"


def test_28x28_grayscale_images_are_used_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    pixels = {}
    for name in ("A", "a"):  # classes may differ only in case (upper- and lower-case letters)
        (tmp_path / "gray" / name).mkdir(parents=True)
        for i in range(3):
            image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "gray" / name / f"{i}.png")
            pixels[(name, i)] = image
    dataset = load_selection(DataSelection(dataset=f"folder:{tmp_path / 'gray'}"))
    every = np.concatenate([dataset.train_images.numpy(), dataset.test_images.numpy()])
    assert all(any(np.array_equal(image, p) for image in every) for p in pixels.values())
    assert dataset.classes == ("A", "a") and dataset.test_labels.bincount().tolist() == [1, 1]  # at least 1 each


# ---------------------------------------------------------------------------------------------
# Bad folders: one line, naming the folder and the fix, before any run folder is written


def bad(kind: str, root: Path) -> Path:
    """A folder dataset with one kind of problem (three good images per good class)."""
    if kind == "missing":
        return root / "nowhere"
    if kind == "a file":
        root.mkdir()
        (root / "f.png").write_bytes(b"x")
        return root / "f.png"
    folder = root / "data"
    for name in ("circle", "square"):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(shape_image(i % 3, np.random.default_rng(i))).save(folder / name / f"{i}.png")
    if kind == "one class":
        shutil.rmtree(folder / "square")
    elif kind == "empty class":
        (folder / "triangle").mkdir()
        (folder / "triangle" / ".hidden.png").write_bytes(b"")
    elif kind == "non-image file":
        (folder / "square" / "notes.txt").write_text("hello")
    elif kind == "unreadable image":
        (folder / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif kind == "no ink":
        Image.fromarray(np.full((36, 36), 255, dtype=np.uint8)).save(folder / "square" / "blank.png")
    elif kind == "one image":
        for i in (1, 2):
            (folder / "square" / f"{i}.png").unlink()
    elif kind == "loose image":
        shutil.copy(folder / "square" / "0.png", folder / "stray.png")
    elif kind == "control character":
        (folder / "square").rename(folder / "squ\x1b[31mare")
    elif kind == "dollar":
        (folder / "square").rename(folder / "$\\frac$")
    elif kind == "look-alike":
        (folder / "circle").rename(folder / "cafe\u0301")  # "café" decomposed
        (folder / "caf\u00e9").mkdir()  # "café" composed
        shutil.copy(folder / "square" / "0.png", folder / "caf\u00e9" / "0.png")
    elif kind == "linked folder":
        (folder / "square" / "more").symlink_to(folder / "circle")
    return folder


BAD_FOLDERS = {
    "missing": "does not exist; give a folder with one subfolder of images per class",
    "a file": "is not a folder; give a folder with one subfolder of images per class",
    "one class": "needs one subfolder of images per class, at least two, found only one ('circle')",
    "empty class": "class folder triangle holds no images",
    "non-image file": "square/notes.txt is not an image file",
    "unreadable image": "broken.png: the image cannot be decoded",
    "no ink": "blank.png: the image is empty (no ink found)",
    "one image": "class folder square holds 1 image; each class needs at least 2",
    "loose image": "stray.png lies outside the class subfolders; move each image into the subfolder of its class",
    "control character": "holds control or invisible characters",
    "dollar": "holds '$', which the plots would read as maths markup",
    "look-alike": "differ only in their Unicode form, so their names would look the same",
    "linked folder": "square/more is a link to a folder, which cnnlab does not follow",
}


@pytest.mark.parametrize("kind", list(BAD_FOLDERS))
def test_a_bad_folder_is_refused_in_one_line_before_a_run_folder_is_written(kind, tmp_path, cnnlab):
    folder = bad(kind, tmp_path / "in")
    runs = tmp_path / "runs"
    line = one_error_line(
        cnnlab("compare", "convnet3", "--dataset", f"folder:{folder}", "--epochs", "1", "--runs-dir", str(runs))
    )
    assert BAD_FOLDERS[kind] in line, line
    assert str(folder.name) in line or "folder:" in line
    assert "\x1b" not in line
    assert not runs.exists()


def test_too_many_or_too_large_images_are_refused(shapes, monkeypatch):
    import cnnlab.image_folders as image_folders

    selection = DataSelection(dataset=f"folder:{shapes}")
    monkeypatch.setattr(image_folders, "MAX_FOLDER_IMAGES", 100)
    with pytest.raises(DataError, match=r"more than 100 image files; give a folder of at most 100 images"):
        load_folder(selection)
    monkeypatch.setattr(image_folders, "MAX_FOLDER_IMAGES", 200_000)
    monkeypatch.setattr(image_folders, "MAX_FOLDER_BYTES", 10_000)
    with pytest.raises(DataError, match=r"GB, more than 1e-05 GB; shrink them"):
        load_folder(selection)


def test_the_selection_checks_its_folder_fields():
    with pytest.raises(ConfigError, match="needs the folder's path"):
        DataSelection(dataset="folder:")
    with pytest.raises(ConfigError, match="apply to folder:PATH datasets only"):
        DataSelection(dataset="mnist", test_fraction=0.2)
    with pytest.raises(ConfigError, match=r"test_fraction must be in \(0, 1\)"):
        DataSelection(dataset="folder:x", test_fraction=1.0)
    assert DataSelection(dataset="folder:~/x").dataset == f"folder:{Path.home() / 'x'}"
    assert DataSelection(dataset="folder:rel").dataset == f"folder:{Path(os.getcwd()) / 'rel'}"
    assert DataSelection().classes is None  # registered datasets record nothing new
    with pytest.raises(DataError, match="unknown dataset 'nope'; .* or folder:PATH"):
        load_dataset("nope")
