"""Images from files, made to look like a dataset's images: what `cnnlab predict` feeds a model.

`read_images(paths)` reads PNG, JPEG, BMP and TIFF files (Pillow), `.npy` arrays (never pickles)
and IDX files (the datasets' own reader), or folders of them, into uint8 arrays; anything that
cannot be read, is too large or holds no image is a `DataError` naming the file and the fix.

`preprocess(image, dataset)` turns one of them into a uint8 (28, 28) image the way the dataset's
authors describe making theirs (see `mnist_steps` and `fashion_steps`); an image that is already
28x28 grayscale is used as it is. Pure functions of numpy arrays; Pillow resamples.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnlab.datasets import preprocessing_of, read_idx
from cnnlab.errors import DataError

SIZE = 28  # every built-in dataset's images are 28x28 grayscale
MAX_SIDE = 4096  # larger pictures are refused before they are decoded
MAX_IMAGE_BYTES = 20_000_000  # a PNG/JPEG/BMP/TIFF file
MAX_ARRAY_BYTES = 64_000_000  # a .npy or IDX file (MNIST's whole test set is 7.8 MB), also once decompressed
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FORMATS = "PNG, JPEG, BMP, TIFF, .npy or IDX"
_NPY_MAGIC = b"\x93NUMPY"
_GZIP_MAGIC = b"\x1f\x8b"

# ITU-R 601-2 luma, as Pillow's convert("L").
_LUMA = np.array([0.299, 0.587, 0.114])


# ---------------------------------------------------------------------------------------------
# Reading


def read_images(paths: Iterable[Path | str]) -> list[tuple[str, np.ndarray]]:
    """Every image of `paths`, in order, as (name, uint8 array of shape (H, W), (H, W, 3) or (H, W, 4)).

    A folder gives its image files (by suffix: pictures, .npy, .idx, *-ubyte[.gz]) sorted by name; a
    .npy or IDX file of several images gives `name[i]` for each. Pictures are limited to
    MAX_SIDE x MAX_SIDE pixels and MAX_IMAGE_BYTES, arrays to MAX_ARRAY_BYTES."""
    images: list[tuple[str, np.ndarray]] = []
    for path in map(Path, paths):
        for file in _files(path):
            images += _read_file(file)
    if not images:
        raise DataError(f"no image given; name {FORMATS} files or a folder of them")
    return images


def is_image_file(path: Path) -> bool:
    """Whether a folder's file is one `read_images` reads (hidden files are not)."""
    name = path.name.lower()
    if name.startswith("."):
        return False
    return (
        name.endswith(PICTURE_SUFFIXES + (".npy", ".idx"))
        or name.endswith(("-ubyte", "-ubyte.gz"))
        or (name.endswith(".gz") and "idx" in name)
    )


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        try:
            files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
        except OSError as exc:
            raise DataError(
                f"{path}: the folder cannot be read ({exc.strerror or exc}); check its permissions"
            ) from None
        if not files:
            raise DataError(f"{path}: the folder holds no image files ({FORMATS}); give a folder of images")
        return files
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise DataError(f"{path}: not a file or folder; give {FORMATS} files or a folder of them")
    return [path]


def _read_file(path: Path) -> list[tuple[str, np.ndarray]]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); check that it is a readable file") from None
    if size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes); give an image file")
    if head.startswith(_NPY_MAGIC) or path.suffix.lower() == ".npy":
        return _named(path, _read_npy(path, size), "a .npy array")
    if head.startswith(_GZIP_MAGIC) or head[:2] == b"\x00\x00":
        return _named(path, _read_idx(path, size, head), "an IDX file")
    return [(str(path), _read_picture(path, size))]


def _read_picture(path: Path, size: int) -> np.ndarray:
    if size > MAX_IMAGE_BYTES:
        raise DataError(
            f"{path}: {size / 1e6:.1f} MB is too large (at most {MAX_IMAGE_BYTES / 1e6:g} MB); "
            f"shrink the image to at most {MAX_SIDE}x{MAX_SIDE} pixels"
        )
    try:
        with warnings.catch_warnings():
            # Pillow's decompression-bomb warning (over Image.MAX_IMAGE_PIXELS) becomes a refusal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=PICTURE_FORMATS) as image:  # never a format that runs code (EPS)
                width, height = image.size  # from the header: nothing is decoded yet
                if width > MAX_SIDE or height > MAX_SIDE:
                    raise DataError(
                        f"{path}: {width}x{height} pixels is too large (at most {MAX_SIDE}x{MAX_SIDE}); "
                        "shrink the image first"
                    )
                image.load()
                image = ImageOps.exif_transpose(image)  # photos: the way the camera was held
                return _picture_pixels(image, path)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path}: too many pixels (a decompression bomb?); shrink the image first") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image cnnlab can read; give {FORMATS} files") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise DataError(f"{path}: the image cannot be decoded ({_first_line(exc)}); the file is damaged") from None


def _picture_pixels(image: Image.Image, path: Path) -> np.ndarray:
    """A decoded picture as uint8 (H, W), (H, W, 3) or (H, W, 4); 16-bit and float pictures rescaled."""
    mode = image.mode
    if mode in ("L", "RGB", "RGBA"):
        return np.asarray(image, dtype=np.uint8).copy()
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    if mode in ("LA", "La", "PA"):
        return np.asarray(image.convert("RGBA"), dtype=np.uint8).copy()
    if mode == "P":
        return np.asarray(image.convert("RGBA" if "transparency" in image.info else "RGB"), dtype=np.uint8).copy()
    if mode.startswith(("I", "F")):  # 16/32-bit integer or float grayscale
        return to_uint8(np.asarray(image), str(path))
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()  # CMYK, YCbCr, LAB, HSV


def _read_npy(path: Path, size: int) -> np.ndarray:
    if size > MAX_ARRAY_BYTES:
        raise DataError(f"{path}: {size / 1e6:.1f} MB is too large (at most {MAX_ARRAY_BYTES / 1e6:g} MB); split it")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                f"{path}: holds Python objects (a pickle), which cnnlab never loads; "
                "save a numeric array with numpy.save"
            ) from None
        raise DataError(f"{path}: not a valid .npy array ({_first_line(exc)}); save it with numpy.save") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read as a .npy array ({_first_line(exc)}); the file is damaged") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise DataError(f"{path}: not a single .npy array; save one array with numpy.save")
    return to_uint8(array, str(path))


def _read_idx(path: Path, size: int, head: bytes) -> np.ndarray:
    if size > MAX_ARRAY_BYTES:
        raise DataError(f"{path}: {size / 1e6:.1f} MB is too large (at most {MAX_ARRAY_BYTES / 1e6:g} MB); split it")
    if head.startswith(_GZIP_MAGIC):  # refuse a gzip bomb before the reader inflates it in memory
        inflated = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    inflated += len(chunk)
                    if inflated > MAX_ARRAY_BYTES:
                        raise DataError(f"{path}: more than {MAX_ARRAY_BYTES / 1e6:g} MB once decompressed; split it")
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt gzip data ({_first_line(exc)}); the file is damaged") from None
    return read_idx(path)


def _named(path: Path, array: np.ndarray, what: str) -> list[tuple[str, np.ndarray]]:
    """An array file's images: one (H, W) or (H, W, C) image (C in 1, 3, 4 and H > 4), named as the
    file, or a stack (N, H, W) or (N, H, W, C) of them, named `file[i]`."""
    shape = array.shape
    has_channels = array.ndim >= 3 and shape[-1] in (1, 3, 4)
    if array.ndim == 2 or (array.ndim == 3 and has_channels and shape[0] > 4):
        single, stack = True, array[None]
    elif array.ndim == 3 or (array.ndim == 4 and has_channels):
        single, stack = False, array
    else:
        raise DataError(
            f"{path}: {what} of shape {shape} is not images; give (H, W), (H, W, C) or (N, H, W[, C]) pixels"
        )
    if stack.ndim == 4 and stack.shape[-1] == 1:
        stack = stack[..., 0]
    if stack.shape[0] == 0 or min(stack.shape[1:3]) == 0:
        raise DataError(f"{path}: {what} of shape {shape} holds no pixels; give at least one image")
    if max(stack.shape[1:3]) > MAX_SIDE:
        raise DataError(
            f"{path}: images of {stack.shape[2]}x{stack.shape[1]} pixels are too large "
            f"(at most {MAX_SIDE}x{MAX_SIDE}); shrink them first"
        )
    if single:
        return [(str(path), stack[0])]
    return [(f"{path}[{i}]", image) for i, image in enumerate(stack)]


def to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """Pixels as uint8: bool -> 0/255; integers up to 255 as they are, up to 65535 divided by 257 (16-bit);
    floats in [0, 1] times 255, floats in [0, 255] rounded. Anything else is a DataError naming `name`."""
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{name}: pixels of type {array.dtype} are not numbers; give integer or float pixels")
    if array.size == 0:
        return array.astype(np.uint8)
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise DataError(f"{name}: pixels include NaN or infinity; give finite pixel values")
    low, high = values.min(), values.max()
    if low < 0:
        raise DataError(f"{name}: negative pixel values (min {low:g}); give pixels in 0..255 (or 0..1 floats)")
    if np.issubdtype(array.dtype, np.floating) and high <= 1.0:
        values = values * 255.0
    elif high > 255:
        if high > 65535:
            raise DataError(f"{name}: pixel values up to {high:g}; give 8-bit (0..255) or 16-bit (0..65535) pixels")
        values = values / 257.0
    return np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:159] + "…"


# ---------------------------------------------------------------------------------------------
# Preprocessing


def is_model_ready(image: np.ndarray) -> bool:
    """Already a 28x28 grayscale image (one channel, or three equal ones and no transparency)."""
    return image.shape[:2] == (SIZE, SIZE) and _gray_or_none(image) is not None


def as_model_input(image: np.ndarray, name: str) -> np.ndarray:
    """`--no-preprocess`: the pixels as they are, which must be a 28x28 grayscale image."""
    gray = _gray_or_none(image)
    if image.shape[:2] != (SIZE, SIZE) or gray is None:
        kind = "grayscale" if gray is not None else "colour"
        raise DataError(
            f"{name}: a {image.shape[1]}x{image.shape[0]} {kind} image; without preprocessing the model needs "
            f"{SIZE}x{SIZE} grayscale images (drop --no-preprocess to convert it)"
        )
    return gray


def preprocess(image: np.ndarray, dataset: str, name: str = "image") -> np.ndarray:
    """One image as the dataset's images were made: uint8 (28, 28), light ink on black.

    A 28x28 grayscale image is returned as it is. Otherwise MNIST and KMNIST use `mnist_steps`,
    Fashion-MNIST uses `fashion_steps`. An image without ink (or without an object) is a DataError."""
    if is_model_ready(image):
        return _gray_or_none(image)
    steps = PREPROCESSING.get(preprocessing_of(dataset))
    if steps is None:
        raise DataError(
            f"{name}: cnnlab knows no preprocessing for dataset '{dataset}'; give {SIZE}x{SIZE} grayscale images "
            "with --no-preprocess"
        )
    return steps(image, name)


def mnist_steps(image: np.ndarray, name: str = "image") -> np.ndarray:
    """MNIST's recipe (LeCun, Cortes and Burges): NIST's black-and-white digits were "size normalized to
    fit in a 20x20 pixel box while preserving their aspect ratio", gaining grey levels from the
    anti-aliasing, then "centered in a 28x28 image by computing the center of mass of the pixels, and
    translating the image so as to position this point at the center". KMNIST's characters follow the
    same format. The steps:

    1. grayscale (ITU-R 601 luma; transparent pixels are paper, composited onto white);
    2. dark ink on light paper is detected (the border, the outer 5 % of each side, is lighter on
       average than the rest) and inverted, so that ink is light on black as in MNIST;
    3. the paper's level (the border's median) becomes 0 and the brightest ink 255, since NIST's
       scans were black and white; an image whose ink differs from the paper by less than
       MIN_CONTRAST levels is refused as empty;
    4. cropped to the ink: the bounding box of the pixels at least INK_LEVEL bright (noise below it
       does not stretch the box);
    5. scaled so that its longer side is 20 pixels, keeping the aspect ratio, with anti-aliasing
       (area averaging when shrinking, bilinear when enlarging);
    6. placed in a black 28x28 image, shifted by whole pixels so that its centre of mass is at the
       centre (14, 14) (pixel i covering [i, i+1)) within half a pixel, or as near as the box allows
       without cutting ink off.
    """
    gray = _grayscale(image)
    border = _border(gray)
    if border.mean() > _interior_mean(gray):
        gray = 255.0 - gray
        border = 255.0 - border
    paper = float(np.median(border))
    ink = gray - paper
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise DataError(f"{name}: the image is empty (no ink found); give an image of one {_what('mnist')}")
    ink = np.clip(ink / peak, 0.0, 1.0) * 255.0
    rows, cols = np.nonzero(ink >= INK_LEVEL)
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = ink.shape
    scale = BOX / max(height, width)
    size = (max(1, int(np.floor(width * scale + 0.5))), max(1, int(np.floor(height * scale + 0.5))))
    ink = _resize(ink, size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR)
    return _place_by_centre_of_mass(np.clip(ink, 0.0, 255.0))


def fashion_steps(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Fashion-MNIST's conversion pipeline, as Zalando describe it (README of
    zalandoresearch/fashion-mnist; Xiao, Rasul and Vollgraf 2017) for product photos on a light background:

    1. "Converting the input to a PNG image": the pixels as read (transparency composited onto white);
    2. "Trimming any edges that are close to the color of the corner pixels", closeness being within
       5 % of the maximum intensity in RGB space (5 % of 255*sqrt(3), Euclidean): cropped to the bounding
       box of the pixels farther than that from the corners' (median) colour; none is an empty image;
    3. "Resizing the longest edge of the image to 28 by subsampling the pixels, i.e. some rows and
       columns are skipped over": nearest-neighbour resampling, the shorter edge in proportion;
    4. "Sharpening pixels using a Gaussian operator of the radius and standard deviation of 1.0":
       an unsharp mask, 2 x - blur(x), with a 3x3 Gaussian of sigma 1 (edges replicated), clipped;
    5. "Extending the shortest edge to 28 and put the image to the center of the canvas": padded with
       the corners' colour, centred (the extra pixel of an odd margin goes after);
    6. "Negating the intensities of the image": 255 - x;
    7. "Converting the image to 8-bit grayscale pixels": ITU-R 601 luma, rounded.

    Unlike the MNIST steps nothing detects the polarity: the pipeline assumes a light background, as
    Zalando's photos have, and always negates."""
    rgb = _rgb(image)
    corners = np.stack([rgb[0, 0], rgb[0, -1], rgb[-1, 0], rgb[-1, -1]])
    background = np.median(corners, axis=0)
    distance = np.sqrt(((rgb - background) ** 2).sum(axis=-1))
    rows, cols = np.nonzero(distance > TRIM_FUZZ * 255.0 * np.sqrt(3.0))
    if rows.size == 0:
        raise DataError(f"{name}: the image is empty (no object found); give an image of one {_what('fashion-mnist')}")
    rgb = rgb[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = rgb.shape[:2]
    scale = SIZE / max(height, width)
    size = (max(1, int(np.floor(width * scale + 0.5))), max(1, int(np.floor(height * scale + 0.5))))
    rgb = np.stack([_resize(rgb[..., c], size, Image.Resampling.NEAREST) for c in range(3)], axis=-1)
    rgb = np.clip(2.0 * rgb - _gaussian3(rgb), 0.0, 255.0)
    canvas = np.empty((SIZE, SIZE, 3))
    canvas[...] = background
    top, left = (SIZE - size[1]) // 2, (SIZE - size[0]) // 2
    canvas[top : top + size[1], left : left + size[0]] = rgb
    return _to_uint8_pixels((255.0 - canvas) @ _LUMA)


BOX = 20  # MNIST's digits fit a 20x20 box
MIN_CONTRAST = 16.0  # levels (of 255) between paper and the brightest ink, below which an image is empty
INK_LEVEL = 32.0  # levels (of 255, after stretching) from which a pixel counts as ink for the crop
TRIM_FUZZ = 0.05  # Zalando's trimming tolerance
PICTURE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
PREPROCESSING = {"mnist": mnist_steps, "kmnist": mnist_steps, "fashion-mnist": fashion_steps}


def _what(dataset: str) -> str:
    return {"fashion-mnist": "fashion product on a light background"}.get(dataset, "dark character on light paper")


def _gray_or_none(image: np.ndarray) -> np.ndarray | None:
    """The image as (H, W) uint8 if it is grayscale (one channel, or equal RGB with no transparency)."""
    if image.ndim == 2:
        return np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.ascontiguousarray(image[..., 0])
    if image.ndim == 3 and image.shape[2] in (3, 4):
        opaque = image.shape[2] == 3 or bool((image[..., 3] == 255).all())
        if opaque and (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all():
            return np.ascontiguousarray(image[..., 0])
    return None


def _rgb(image: np.ndarray) -> np.ndarray:
    """float (H, W, 3) in [0, 255]; transparency composited onto white."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return np.repeat(image.astype(np.float64)[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise DataError(f"an image of shape {image.shape} has no grayscale, RGB or RGBA pixels")
    rgb = image[..., :3].astype(np.float64)
    if image.shape[2] == 4:
        alpha = image[..., 3:4].astype(np.float64) / 255.0
        rgb = rgb * alpha + 255.0 * (1.0 - alpha)
    return rgb


def _grayscale(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return image.reshape(image.shape[:2]).astype(np.float64)
    return _rgb(image) @ _LUMA


def _border(gray: np.ndarray) -> np.ndarray:
    """The outer 5 % of each side (at least one pixel), as a flat array."""
    h, w = gray.shape
    bh, bw = max(1, h // 20), max(1, w // 20)
    mask = np.ones_like(gray, dtype=bool)
    mask[bh : h - bh, bw : w - bw] = False
    return gray[mask]


def _interior_mean(gray: np.ndarray) -> float:
    h, w = gray.shape
    bh, bw = max(1, h // 20), max(1, w // 20)
    inside = gray[bh : h - bh, bw : w - bw]
    return float(inside.mean()) if inside.size else float(gray.mean())


def _resize(channel: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """One float channel resized to size = (width, height) by Pillow (32-bit float, no rounding)."""
    if channel.shape[::-1] == size:
        return channel.astype(np.float64)
    return np.asarray(Image.fromarray(channel.astype(np.float32), mode="F").resize(size, resample), dtype=np.float64)


def _gaussian3(image: np.ndarray) -> np.ndarray:
    """A 3x3 Gaussian blur (sigma 1) of (H, W[, C]) with edge pixels replicated (separable)."""
    k = np.exp(-0.5 * np.array([1.0, 0.0, 1.0]))
    k /= k.sum()
    pad = [(1, 1), (1, 1)] + [(0, 0)] * (image.ndim - 2)
    p = np.pad(image, pad, mode="edge")
    rows = k[0] * p[:-2] + k[1] * p[1:-1] + k[2] * p[2:]
    return k[0] * rows[:, :-2] + k[1] * rows[:, 1:-1] + k[2] * rows[:, 2:]


def _place_by_centre_of_mass(ink: np.ndarray) -> np.ndarray:
    h, w = ink.shape
    mass = ink.sum()
    cy = float((ink.sum(axis=1) * (np.arange(h) + 0.5)).sum() / mass)
    cx = float((ink.sum(axis=0) * (np.arange(w) + 0.5)).sum() / mass)
    top = int(np.clip(np.floor(SIZE / 2 - cy + 0.5), 0, SIZE - h))
    left = int(np.clip(np.floor(SIZE / 2 - cx + 0.5), 0, SIZE - w))
    out = np.zeros((SIZE, SIZE))
    out[top : top + h, left : left + w] = ink
    return _to_uint8_pixels(out)


def _to_uint8_pixels(values: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)


def preprocess_all(images: Sequence[tuple[str, np.ndarray]], dataset: str, *, enabled: bool = True) -> np.ndarray:
    """Named images as one uint8 (N, 28, 28) batch: preprocessed for `dataset`, or (enabled=False) as they are."""
    if enabled:
        return np.stack([preprocess(image, dataset, name) for name, image in images])
    return np.stack([as_model_input(image, name) for name, image in images])
