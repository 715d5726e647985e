"""Tests for images.py: reading image files (and refusing bad ones in one line) and each dataset's
preprocessing, against cases whose answers are checked by hand."""

from __future__ import annotations

import gzip
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from cnnlab.errors import DataError
from cnnlab.images import MAX_SIDE, fashion_steps, mnist_steps, preprocess, read_images, to_uint8
from synthetic import idx_bytes


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    """(row, column) with pixel i covering [i, i + 1): the centre of a 28x28 image is (14, 14)."""
    w = image.astype(np.float64)
    rows = (w.sum(axis=1) * (np.arange(w.shape[0]) + 0.5)).sum() / w.sum()
    cols = (w.sum(axis=0) * (np.arange(w.shape[1]) + 0.5)).sum() / w.sum()
    return float(rows), float(cols)


def ink_box(image: np.ndarray, level: int = 1) -> tuple[int, int]:
    """Height and width of the bounding box of the pixels at least `level` bright."""
    rows, cols = np.nonzero(image >= level)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def stroke(height: int = 100, width: int = 60, dark_on_light: bool = True) -> np.ndarray:
    """A 80x6 vertical bar, off centre, on a (height, width) page."""
    paper, ink = (255, 0) if dark_on_light else (0, 255)
    image = np.full((height, width), paper, np.uint8)
    image[10:90, 8:14] = ink
    return image


# ---------------------------------------------------------------------------------------------
# MNIST and KMNIST steps


@pytest.mark.parametrize("dataset", ["mnist", "kmnist"])
def test_a_dark_on_light_stroke_is_inverted_fit_to_20_keeping_its_aspect_and_centred(dataset):
    out = preprocess(stroke(), dataset)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out[0, 0] == 0 and out.max() == 255  # inverted: ink light on black
    # 80x6 scaled by 20/80: 20x1.5, rounded to 20x2, the aspect ratio kept (not stretched to 20x20)
    assert ink_box(out) == (20, 2)
    rows, cols = centre_of_mass(out)
    assert abs(rows - 14) <= 0.5 and abs(cols - 14) <= 0.5


def test_a_light_on_dark_stroke_is_not_inverted():
    dark = preprocess(stroke(dark_on_light=False), "mnist")
    light = preprocess(stroke(dark_on_light=True), "mnist")
    np.testing.assert_array_equal(dark, light)  # the same digit either way round
    assert dark[0, 0] == 0


def test_a_wide_shape_fits_20_wide_and_its_centre_of_mass_is_centred():
    # An L: a 40-wide, 4-high foot and a 4-wide, 20-high leg on the left, on a grey page: mass off centre.
    image = np.full((60, 80), 200, np.uint8)
    image[30:50, 10:14] = 20
    image[46:50, 10:50] = 20
    out = mnist_steps(image)
    assert ink_box(out, 32) == (10, 20)  # 20x40 halved
    rows, cols = centre_of_mass(out)
    assert abs(rows - 14) <= 0.5 and abs(cols - 14) <= 0.5
    assert out.max() == 255  # the page level is black, the ink stretched to full range


def test_a_small_digit_is_enlarged_to_fit_20():
    image = np.zeros((28, 40), np.uint8)  # not 28x28: preprocessed
    image[10:15, 10:13] = 255  # 5 high, 3 wide
    out = mnist_steps(image)
    height, width = ink_box(out, 32)
    assert height == 20 and 11 <= width <= 13  # 3 * 4 = 12, give or take the bilinear edge


def test_an_rgba_drawing_is_composited_onto_white_paper():
    image = np.zeros((50, 50, 4), np.uint8)  # transparent everywhere ...
    image[10:40, 20:26] = (0, 0, 0, 255)  # ... but a black stroke
    out = preprocess(image, "mnist")
    assert out[0, 0] == 0 and out.max() == 255 and ink_box(out)[0] == 20


@pytest.mark.parametrize("value", [0, 255, 128])
def test_an_empty_image_is_refused(value):
    with pytest.raises(DataError, match=r"blank\.png: the image is empty \(no ink found\)"):
        preprocess(np.full((40, 40), value, np.uint8), "mnist", "blank.png")


def test_a_28x28_grayscale_image_is_used_as_it_is():
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    for dataset in ("mnist", "kmnist", "fashion-mnist"):
        np.testing.assert_array_equal(preprocess(image, dataset), image)
    rgb = np.repeat(image[..., None], 3, axis=-1)  # the same image saved as RGB
    np.testing.assert_array_equal(preprocess(rgb, "mnist"), image)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: Zalando's steps


def test_fashion_trims_fits_the_longest_side_to_28_centres_and_negates():
    page = np.full((73, 51, 3), 253, np.uint8)  # Zalando's thumbnails: 51x73 on #fdfdfd
    page[5:70, 10:40] = (200, 30, 30)  # a 65x30 red product
    out = fashion_steps(page)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    rows, cols = np.nonzero(out > 10)
    assert (rows.min(), rows.max()) == (0, 27)  # the longest side becomes 28
    assert (cols.min(), cols.max()) == (7, 19)  # 30 * 28 / 65 = 12.9 -> 13 wide, centred: (28 - 13) // 2 = 7
    assert out[0, 0] == 255 - 253  # the page, negated
    red = round(0.299 * 200 + 0.587 * 30 + 0.114 * 30)
    assert out[14, 13] == 255 - red  # inside the product: negated luma (sharpening leaves flat areas alone)


def test_fashion_trims_only_what_is_close_to_the_corners_colour():
    page = np.full((40, 40), 255, np.uint8)
    page[:, :] = 250  # within 5 %: trimmed away as background
    page[12:28, 15:25] = 100
    out = preprocess(page, "fashion-mnist")
    rows, cols = np.nonzero(out > 10)
    assert (rows.min(), rows.max()) == (0, 27) and cols.max() - cols.min() + 1 == round(10 * 28 / 16)


def test_fashion_refuses_an_empty_image():
    with pytest.raises(DataError, match=r"the image is empty \(no object found\)"):
        preprocess(np.full((30, 50, 3), 240, np.uint8), "fashion-mnist")


# ---------------------------------------------------------------------------------------------
# Reading files


def test_pictures_arrays_idx_and_folders_are_read(tmp_path):
    digit = stroke()
    Image.fromarray(digit).save(tmp_path / "a.png")
    Image.fromarray(np.stack([digit] * 3, axis=-1)).save(tmp_path / "b.bmp")
    Image.fromarray(digit).save(tmp_path / "c.tiff")
    Image.fromarray(digit).save(tmp_path / "d.jpg", quality=95)
    np.save(tmp_path / "e.npy", np.stack([digit[:28, :28]] * 2))  # (2, 28, 28): two images
    (tmp_path / "f-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8))))
    (tmp_path / "notes.txt").write_text("not an image")  # skipped in a folder
    images = dict(read_images([tmp_path]))
    assert list(images) == [str(tmp_path / name) for name in ("a.png", "b.bmp", "c.tiff", "d.jpg")] + [
        f"{tmp_path / 'e.npy'}[{i}]" for i in range(2)
    ] + [f"{tmp_path / 'f-idx3-ubyte.gz'}[{i}]" for i in range(3)]
    np.testing.assert_array_equal(images[str(tmp_path / "a.png")], digit)
    assert images[str(tmp_path / "b.bmp")].shape == (100, 60, 3)
    assert all(image.dtype == np.uint8 for image in images.values())


def test_sixteen_bit_and_float_pixels_become_uint8(tmp_path):
    assert to_uint8(np.array([[0.0, 0.5, 1.0]]), "x").tolist() == [[0, 128, 255]]
    assert to_uint8(np.array([[0, 65535]], np.uint16), "x").tolist() == [[0, 255]]
    Image.fromarray(np.array([[0, 65535]] * 2, np.uint16)).save(tmp_path / "deep.png")
    ((_, image),) = read_images([tmp_path / "deep.png"])
    assert image.tolist() == [[0, 255]] * 2


def _refusal(paths) -> str:
    with pytest.raises(DataError) as caught:
        read_images(paths)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "text.png").write_text("hello, not a picture")
    assert "text.png: not an image cnnlab can read" in _refusal([tmp_path / "text.png"])

    buffer = io.BytesIO()
    Image.fromarray(stroke()).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "cut.png: the image cannot be decoded" in _refusal([tmp_path / "cut.png"])

    Image.new("L", (MAX_SIDE + 1, 8)).save(tmp_path / "huge.png")  # compresses to almost nothing
    assert f"huge.png: {MAX_SIDE + 1}x8 pixels is too large" in _refusal([tmp_path / "huge.png"])

    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "objects.npy: holds Python objects (a pickle)" in _refusal([tmp_path / "objects.npy"])
    (tmp_path / "pickled.npy").write_bytes(pickle.dumps([1, 2, 3]))
    assert "pickled.npy" in _refusal([tmp_path / "pickled.npy"])

    np.save(tmp_path / "labels.npy", np.arange(10, dtype=np.uint8))
    assert "labels.npy: a .npy array of shape (10,) is not images" in _refusal([tmp_path / "labels.npy"])

    (tmp_path / "empty").mkdir()
    assert "empty: the folder holds no image files" in _refusal([tmp_path / "empty"])
    assert "missing.png: file not found" in _refusal([tmp_path / "missing.png"])
    (tmp_path / "zero.png").write_bytes(b"")
    assert "zero.png: the file is empty" in _refusal([tmp_path / "zero.png"])


def test_a_gzip_bomb_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    import cnnlab.images

    monkeypatch.setattr(cnnlab.images, "MAX_ARRAY_BYTES", 100_000)
    (tmp_path / "bomb-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((200, 28, 28), np.uint8))))
    assert "more than 0.1 MB once decompressed" in _refusal([tmp_path / "bomb-idx3-ubyte.gz"])
