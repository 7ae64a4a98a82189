"""The oracle: read an image of the shapes world back into its scene graph.

Exact on clean renders at any resolution >= MIN_EXACT_RESOLUTION (below it, some (shape, size)
pairs draw the same pixels, so no reader can tell them apart). Sensible on degraded images (JPEG,
blur, VAE reconstructions, generated samples). Each grid cell is read on its own:

1. background: the per-channel median of the whole image (objects never cover half of it), so a
   generated image whose background drifted a little still reads;
2. candidate: enough pixels lie far from the background (half the smallest object's area);
3. colour: the named colour nearest in hue to those pixels' mean chroma (blending with the grey
   background keeps hue, so blur and JPEG barely move it);
4. shape and size: each pixel gets a soft foreground weight (its projection on the line from the
   background to that colour), and the (shape, size) whose rendered mask (shifted by up to
   `max_shift` pixels, sharp or blurred by `blur_levels`) has the least squared error against
   the weights wins; a cell whose best shape holds under MIN_AMPLITUDE of its
   colour (a neighbour's blur bleeding in) reads as empty.

On a clean render the weights are exactly 0 or 1 and the true mask fits with zero error.
`read_cells` returns each cell's reading with the scores behind it, for evaluation reports.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image, ImageFilter

from t2i_recap.shapes.render import object_mask
from t2i_recap.shapes.world import COLORS, SHAPES, SIZES, Obj, Scene, all_cells

MIN_EXACT_RESOLUTION = 17
# A pixel is "far from the background" past this RGB distance. The nearest named colour
# (yellow) is ~216 away from the background, so this sits well inside the gap even after JPEG.
FAR_FROM_BACKGROUND = 80.0
# A cell is occupied when its far pixels add up to this share of the smallest object's area.
MIN_AREA_SHARE = 0.5
# Below this mean chroma a cell's colour has no usable hue (generated greys); see _nearest_color.
MIN_CHROMA = 8.0
# An occupied cell holds at least this share of its best-fitting shape's colour (0..1).
MIN_AMPLITUDE = 0.3

_COLOR_NAMES = tuple(COLORS)
_COLOR_VALUES = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)  # (6, 3)
_CANDIDATES = tuple((shape, size) for shape in SHAPES for size in SIZES)


@dataclasses.dataclass(frozen=True)
class CellReading:
    """What the oracle saw in one cell.

    `obj` is None for an empty cell. `fit` in [0, 1] is how well the best (shape, size) mask
    explains the cell (1 - squared error / union), `margin` how far it beat the runner-up, and
    `hue_error` how many degrees of hue the colour was off its named value. `confidence` in
    [0, 1] combines the fit, how clearly the best shape won (runner-up's error vs the winner's)
    and the hue error; it is 1.0 on a clean render. For empty cells it says how clearly the
    cell was empty.
    """

    row: int
    col: int
    obj: Obj | None
    foreground_pixels: int
    hue_error: float
    fit: float
    margin: float
    confidence: float


def to_array(image) -> np.ndarray:
    """An (H, W, 3) float32 array from a PIL image or an (H, W, 3) uint8 array.

    Non-square images are resized to a square (the world is square); other modes become RGB.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.width != image.height:
        side = max(image.size)
        image = image.resize((side, side), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def cell_slices(row: int, col: int, resolution: int) -> tuple[slice, slice]:
    """Pixel rows and columns of a cell; cells tile the image and each holds its whole object."""
    side = resolution / 3.0
    return (slice(round(row * side), round((row + 1) * side)),
            slice(round(col * side), round((col + 1) * side)))


def max_shift(resolution: int) -> int:
    """How far (pixels) a shape may sit off its rendered place and still match: generated and
    resized images rarely land on the renderer's exact pixel grid."""
    return min(2, max(1, round(resolution / 48)))  # capped: variants grow with its square


def _shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    h, w = mask.shape
    padded = np.pad(mask, ((abs(dy),) * 2, (abs(dx),) * 2))
    return padded[abs(dy) - dy: abs(dy) - dy + h, abs(dx) - dx: abs(dx) - dx + w]


def blur_levels(resolution: int) -> tuple[float, ...]:
    """Gaussian blurs (pixels) the masks are also matched at: a VAE or a diffusion model
    smooths a 5-pixel square into something a sharp circle mask would fit better. Clean renders
    still read exactly, as only a sharp mask can fit 0/1 weights with zero error."""
    return (0.0, resolution / 64, resolution / 32)


def _variants(obj: Obj, resolution: int, cell: tuple[slice, slice]) -> np.ndarray:
    """(variants, h, w) float masks of one object in its cell: every blur x every shift."""
    k = max_shift(resolution)
    shifts = sorted(((dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1)),
                    key=lambda s: (abs(s[0]) + abs(s[1]), s))
    sharp = Image.fromarray(object_mask(obj, resolution).astype(np.uint8) * 255)
    out = []
    for sigma in blur_levels(resolution):
        image = sharp.filter(ImageFilter.GaussianBlur(sigma)) if sigma else sharp
        mask = np.asarray(image, dtype=np.float32)[cell] / 255.0
        out.extend(_shifted(mask, dy, dx) for dy, dx in shifts)
    return np.stack(out)


@functools.lru_cache(maxsize=4)  # ~120 MB at 256 px, so few
def _templates(resolution: int) -> dict[tuple[int, int], np.ndarray]:
    """Per cell, the rendered mask of every (shape, size), cropped to the cell, sharp and
    blurred, shifted by up to `max_shift` pixels: (6, variants, h, w), the plain mask first."""
    out = {}
    for row, col in all_cells():
        cell = cell_slices(row, col, resolution)
        out[(row, col)] = np.stack([_variants(Obj(row, col, shape, _COLOR_NAMES[0], size), resolution, cell)
                                    for shape, size in _CANDIDATES])
    return out


def _background(pixels: np.ndarray) -> np.ndarray:
    return np.median(pixels.reshape(-1, 3), axis=0)


def _chroma(pixels: np.ndarray) -> np.ndarray:
    """Opponent-colour plane (..., 2): blending with a grey background scales a pixel's chroma
    but keeps its direction (hue), so hue survives blur, JPEG and VAE smoothing far better than
    RGB distance does."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return np.stack([r - (g + b) / 2.0, (np.sqrt(3.0) / 2.0) * (g - b)], axis=-1)


_COLOR_HUES = np.degrees(np.arctan2(_chroma(_COLOR_VALUES)[:, 1], _chroma(_COLOR_VALUES)[:, 0]))  # (6,)


def _nearest_color(pixels: np.ndarray) -> tuple[int, float]:
    """Named colour whose hue is nearest the pixels' mean chroma; returns (index, degrees off).

    Greyish pixels (no hue to speak of) fall back to the nearest colour in RGB."""
    mean = _chroma(pixels).mean(axis=0)
    if np.hypot(*mean) < MIN_CHROMA:
        dists = np.linalg.norm(_COLOR_VALUES - np.median(pixels, axis=0), axis=-1)
        return int(dists.argmin()), 180.0
    hue = np.degrees(np.arctan2(mean[1], mean[0]))
    off = np.abs((_COLOR_HUES - hue + 180.0) % 360.0 - 180.0)
    return int(off.argmin()), float(off.min())


def _empty(row: int, col: int, n_far: int, confidence: float) -> CellReading:
    return CellReading(row, col, None, n_far, 0.0, 0.0, 0.0, float(np.clip(confidence, 0.0, 1.0)))


def _read_cell(crop: np.ndarray, templates: np.ndarray, background: np.ndarray,
               row: int, col: int) -> CellReading:
    far = np.linalg.norm(crop - background, axis=-1) > FAR_FROM_BACKGROUND  # (h, w)
    n_far, min_area = int(far.sum()), float(templates[:, 0].sum(axis=(1, 2)).min())
    if n_far < MIN_AREA_SHARE * min_area:
        return _empty(row, col, n_far, 1.0 - n_far / (MIN_AREA_SHARE * min_area))
    color_idx, hue_off = _nearest_color(crop[far])
    # Soft foreground weight: projection of each pixel on the background -> colour line.
    axis = _COLOR_VALUES[color_idx] - background
    weight = np.clip(((crop - background) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    errors = ((templates - weight) ** 2).sum(axis=(2, 3))  # (6, shifts) squared error
    shift = errors.argmin(axis=1)  # first (smallest) shift among equals
    ssd = errors[np.arange(len(_CANDIDATES)), shift]  # (6,) per (shape, size)
    order = np.argsort(ssd, kind="stable")
    best = int(order[0])
    template = templates[best, shift[best]]
    # How much of the best shape's colour is there: blur bleeding in from a neighbour gives
    # little, a faint but real blob (VAE, generated) still gives a fair share.
    amplitude = float((template * weight).sum() / template.sum())
    if amplitude < MIN_AMPLITUDE:
        return _empty(row, col, n_far, 1.0 - amplitude / MIN_AMPLITUDE)
    scale = np.maximum(templates[np.arange(len(_CANDIDATES)), shift], weight).sum(axis=(1, 2))
    fit = 1.0 - ssd / np.maximum(scale, 1e-6)
    best_fit, margin = float(fit[best]), float(fit[best] - fit[order[1]])
    shape, size = _CANDIDATES[best]
    # Clear win: the runner-up's error dwarfs the winner's (0 error on a clean render).
    clear_win = 1.0 - float(ssd[best]) / max(float(ssd[order[1]]), 1e-6)
    confidence = best_fit * clear_win * max(0.0, 1.0 - hue_off / 30.0)
    obj = Obj(row, col, shape, _COLOR_NAMES[color_idx], size)
    return CellReading(row, col, obj, n_far, hue_off, best_fit, margin, float(np.clip(confidence, 0.0, 1.0)))


def read_cells(image) -> list[CellReading]:
    """Read all nine cells (row-major) of an image of any resolution."""
    pixels = to_array(image)
    resolution = pixels.shape[0]
    if resolution < 12:
        raise ValueError(f"image of {resolution} px is too small to hold a 3x3 grid of shapes (min 12)")
    templates = _templates(resolution)
    background = _background(pixels)
    out = []
    for row, col in all_cells():
        ys, xs = cell_slices(row, col, resolution)
        out.append(_read_cell(pixels[ys, xs], templates[(row, col)], background, row, col))
    return out


def read_scene(image) -> Scene:
    """The scene graph an image shows: one object per occupied cell."""
    return Scene(tuple(c.obj for c in read_cells(image) if c.obj is not None))
