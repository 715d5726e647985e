"""Keras's image augmentation layers on a batch on the device: RandomTranslation, RandomRotation
and RandomZoom (Keras 3.15), applied in that order, each resampling the images as Keras does.

- `transform`: the three layers with given per-image factors (deterministic); equals Keras's
  output for the same factors (tests/test_augment.py checks it against Keras's own output).
- `augment`: draws each image's factors uniformly in an `Augmentation`'s ranges from PyTorch's
  default generator on the images' device, then `transform`. Vectorised over the batch, fixed
  shapes, no host synchronisation: it can run inside a captured CUDA graph.
- `augmented_examples`: a few augmented uint8 images for a report, from their own generator.

Keras's conventions (keras/src/layers/preprocessing/image_preprocessing/random_*.py and
keras/src/backend/torch/image.py), which this module follows:

- Each layer builds a per-image matrix [a0, a1, a2, b0, b1, b2] that maps an output pixel (x, y)
  (x the column, y the row; pixel centres at integer coordinates 0 .. W-1, 0 .. H-1) to the input
  point (a0 x + a1 y + a2, b0 x + b1 y + b2), sampled there.
- Translation by (dy, dx) fractions: dx * W and dy * H pixels, [1, 0, -dx W, 0, 1, -dy H]: a
  positive shift moves the content right / down.
- Rotation by a fraction r of a full turn: the angle r * 360 degrees, about the centre
  cx = (W - 1) / 2, cy = (H - 1) / 2; a0 = cos, a1 = -sin, b0 = sin, b1 = cos,
  a2 = cx - cx a0 - cy a1, b2 = cy - cx b0 - cy b1.
- Zoom by Keras factors (zy, zx): scales z = 1 + factor (below 1 zooms in) about the same centre,
  [zx, 0, (W - 1) / 2 (1 - zx), 0, zy, (H - 1) / 2 (1 - zy)].
- Interpolation: "bilinear" weighs the four integer neighbours floor(c), floor(c) + 1 of each
  coordinate; "nearest" takes round(c), rounding halves to even (torch.round).
- Fill modes act on each neighbour's integer index: "reflect" mirrors about the edge
  (d c b a | a b c d | d c b a), "wrap" tiles (a b c d | a b c d), "nearest" repeats the edge
  pixel, "constant" reads `fill_value` for a neighbour outside the image (bilinear then blends it
  with the pixels inside).

The matrices are computed in float32 in Keras's order of operations, so the coordinates match
Keras's to the last bit or so.
"""

from __future__ import annotations

import math

import torch

from cnnlab.options import FILL_MODES, INTERPOLATIONS, Augmentation

__all__ = ["augment", "augmented_examples", "transform"]

_FLOAT = torch.float32
_DEGREE = math.pi / 180.0


def _per_image(value: object, n: int, width: int, device: torch.device, name: str) -> torch.Tensor:
    """Factors as float32 (n,) or (n, width) on the device, broadcast from a scalar or a pair."""
    tensor = torch.as_tensor(value, device=device).to(_FLOAT)
    shape = (n,) if width == 1 else (n, width)
    try:
        return tensor.expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} must broadcast to {shape}, got shape {tuple(tensor.shape)}") from None


def _translation_matrix(shift: torch.Tensor, height: int, width: int) -> torch.Tensor:
    dy, dx = shift[:, 0] * height, shift[:, 1] * width  # pixels, float32 as Keras's
    one, zero = torch.ones_like(dx), torch.zeros_like(dx)
    return torch.stack([one, zero, -dx, zero, one, -dy], dim=1)


def _rotation_matrix(rotation: torch.Tensor, height: int, width: int) -> torch.Tensor:
    degrees = (rotation.double() * 360.0).to(_FLOAT)  # Keras draws degrees in float32
    angle = degrees * _DEGREE  # a float32 product, as Keras's (no host tensor: CUDA-graph safe)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = 0.5 * (width - 1), 0.5 * (height - 1)
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = (cx - cx * a0) - cy * a1
    b2 = (cy - cx * b0) - cy * b1
    return torch.stack([a0, a1, a2, b0, b1, b2], dim=1)


def _zoom_matrix(zoom: torch.Tensor, height: int, width: int) -> torch.Tensor:
    scale = (zoom.double() + 1.0).to(_FLOAT)  # Keras draws 1 + factor in float32
    zy, zx = scale[:, 0], scale[:, 1]
    x_offset = ((width - 1.0) / 2.0) * (1.0 - zx)
    y_offset = ((height - 1.0) / 2.0) * (1.0 - zy)
    zero = torch.zeros_like(zx)
    return torch.stack([zx, zero, x_offset, zero, zy, y_offset], dim=1)


def _taps(
    coordinate: torch.Tensor, size: int, fill_mode: str, interpolation: str
) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """One axis's neighbours of each coordinate, as Keras's `map_coordinates` takes them: for each,
    the index into the image (the fill mode applied), its weight (None: 1) and whether it lies
    inside the image ("constant" only; None otherwise). The index arithmetic runs on whole-number
    floats, exact here and faster than integer division."""
    if interpolation == "nearest":
        nodes = [(torch.round(coordinate), None)]  # halves to even, as Keras's torch.round
    else:
        lower = torch.floor(coordinate)
        upper_weight = coordinate - lower
        nodes = [(lower, 1 - upper_weight), (lower + 1, upper_weight)]
    taps = []
    for index, weight in nodes:
        inside = None
        if fill_mode == "wrap":
            fixed = torch.remainder(index, size)
        elif fill_mode == "reflect":  # period 2 size: 0 .. size-1, then size-1 .. 0
            middle = size - 0.5
            fixed = middle - (torch.remainder(index, 2 * size) - middle).abs()
        else:  # "nearest" repeats the edge; "constant" reads fill_value outside
            fixed = index.clamp(0, size - 1)
            if fill_mode == "constant":
                inside = (index >= 0) & (index <= size - 1)
        taps.append((fixed.long(), weight, inside))
    return taps


def _resample(
    images: torch.Tensor,
    matrix: torch.Tensor,
    fill_mode: str,
    interpolation: str,
    fill_value: float,
    axis_aligned: bool,
) -> torch.Tensor:
    """Each image sampled at its matrix's input points: Keras's `affine_transform` (torch backend).

    With `axis_aligned` (a1 = b0 = 0: translation, zoom) the column depends on x only and the row
    on y only, so the per-axis work runs on (n, 1, w) and (n, h, 1): the same numbers, as
    a0 x + 0 y is exactly a0 x."""
    n, c, h, w = images.shape
    device = images.device
    xs = torch.arange(w, device=device, dtype=_FLOAT).view(1, 1, w)
    ys = torch.arange(h, device=device, dtype=_FLOAT).view(1, h, 1)
    a0, a1, a2, b0, b1, b2 = (m.view(n, 1, 1) for m in matrix.unbind(1))
    if axis_aligned:
        col, row = a0 * xs + a2, b1 * ys + b2
    else:
        col, row = (a0 * xs + a1 * ys) + a2, (b0 * xs + b1 * ys) + b2
    source = images.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view for channels_last images
    out = None
    # Keras sums the neighbours row-major: (r0, c0), (r0, c0 + 1), (r0 + 1, c0), (r0 + 1, c0 + 1).
    for r, row_weight, row_inside in _taps(row, h, fill_mode, interpolation):
        for col_index, col_weight, col_inside in _taps(col, w, fill_mode, interpolation):
            flat = (r * w + col_index).expand(n, h, w).reshape(n, h * w, 1)
            values = torch.gather(source, 1, flat.expand(n, h * w, c))
            if row_inside is not None:
                inside = (row_inside & col_inside).expand(n, h, w).reshape(n, h * w, 1)
                values = torch.where(inside, values, float(fill_value))
            if row_weight is not None:
                weight = (row_weight * col_weight).expand(n, h, w).reshape(n, h * w, 1)
                values = values * weight.to(values.dtype)
            out = values if out is None else out + values
    return out.view(n, h, w, c).permute(0, 3, 1, 2)  # (n, c, h, w), channels_last strides


def transform(
    images: torch.Tensor,
    *,
    shift: torch.Tensor | tuple[float, float] | None = None,
    rotation: torch.Tensor | float | None = None,
    zoom: torch.Tensor | tuple[float, float] | None = None,
    fill_mode: str = "reflect",
    interpolation: str = "bilinear",
    fill_value: float = 0.0,
) -> torch.Tensor:
    """Keras's RandomTranslation, RandomRotation and RandomZoom with given factors, in that order.

    `images` is a float batch (N, C, H, W). Per image (a tensor of shape (N,) / (N, 2), or one
    value or pair for all): `shift` (dy, dx) fractions of the height and width (positive moves
    the content down / right); `rotation` a fraction of a full turn; `zoom` (zy, zx) Keras zoom
    factors (negative zooms in; give zy twice for Keras's `width_factor=None`). A transformation
    given as None is skipped (a zero factor gives the same, exactly). Each transformation
    resamples the previous one's output, as Keras's layers in a Sequential do. The result has the
    images' shape, dtype, device and memory format (channels_last stays channels_last).
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float batch (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {', '.join(FILL_MODES)}, got {fill_mode!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    n, _, h, w = images.shape
    matrices = []  # (matrix, axis-aligned)
    if shift is not None:
        matrices.append((_translation_matrix(_per_image(shift, n, 2, images.device, "shift"), h, w), True))
    if rotation is not None:
        matrices.append((_rotation_matrix(_per_image(rotation, n, 1, images.device, "rotation"), h, w), False))
    if zoom is not None:
        matrices.append((_zoom_matrix(_per_image(zoom, n, 2, images.device, "zoom"), h, w), True))
    if not matrices:
        return images.clone()
    out = images
    for matrix, axis_aligned in matrices:
        out = _resample(out, matrix, fill_mode, interpolation, fill_value, axis_aligned)
    if images.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def _drawn(
    augmentation: Augmentation, n: int, device: torch.device, generator: torch.Generator | None
) -> dict[str, torch.Tensor | None]:
    """Each image's factors, uniform in the ranges: one draw of (n, 5) whatever is configured."""
    u = torch.rand(n, 5, device=device, generator=generator)
    uniform = lambda bounds, column: (bounds[1] - bounds[0]) * u[:, column] + bounds[0]  # Keras's form
    a = augmentation
    zoom_width = a.zoom_width or (0.0, 0.0)
    factors: dict[str, torch.Tensor | None] = {"shift": None, "rotation": None, "zoom": None}
    if any(a.height_shift) or any(a.width_shift):
        factors["shift"] = torch.stack([uniform(a.height_shift, 0), uniform(a.width_shift, 1)], dim=1)
    if any(a.rotation):
        factors["rotation"] = uniform(a.rotation, 2)
    if any(a.zoom_height) or any(zoom_width):
        zy = uniform(a.zoom_height, 3)
        zx = zy if a.zoom_width is None else uniform(zoom_width, 4)
        factors["zoom"] = torch.stack([zy, zx], dim=1)
    return factors


def augment(
    images: torch.Tensor, augmentation: Augmentation, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The batch (N, C, H, W) augmented as Keras's layers would, each image's factors drawn
    uniformly in `augmentation`'s ranges from `generator` (PyTorch's default generator on the
    images' device when None, so the engine's seeding and checkpoints cover it). One draw of
    (N, 5) uniforms per call, no host synchronisation, shape, dtype and memory format kept."""
    factors = _drawn(augmentation, images.shape[0], images.device, generator)
    return transform(
        images,
        **factors,
        fill_mode=augmentation.fill_mode,
        interpolation=augmentation.interpolation,
        fill_value=augmentation.fill_value,
    )


def augmented_examples(images: torch.Tensor, augmentation: Augmentation, count: int, seed: int) -> torch.Tensor:
    """`count` augmented copies of uint8 images (N, H, W) or (N, H, W, C), for a report's grid:
    image i is `images[i % N]`, augmented with factors from a generator seeded with `seed` (the
    global random state is left alone). Returns uint8 in the input's layout, rounded."""
    if images.dtype != torch.uint8 or images.dim() not in (3, 4) or len(images) == 0:
        raise ValueError(f"images must be uint8 (N, H, W[, C]) with N >= 1, got {images.dtype} {tuple(images.shape)}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    chosen = images[torch.arange(count, device=images.device) % len(images)]
    x = chosen.unsqueeze(1) if chosen.dim() == 3 else chosen.permute(0, 3, 1, 2)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    out = augment(x.float().div(255.0), augmentation, generator=generator)
    out = out.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return out[:, 0].contiguous() if images.dim() == 3 else out.permute(0, 2, 3, 1).contiguous()
