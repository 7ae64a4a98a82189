"""Safe image decoding: any web image in, an 8-bit RGB PIL image out, or a `BadImage` with its reason.

The one decode of the project: the captioner (`t2i_recap.captioner.readers`) and the trainer
(`t2i_recap.data`) both call `decode_image`, so the recaption describes exactly the pixels the DiT
trains on (EXIF orientation, mode conversion and bit depth alike).

Failure modes seen at web scale (docs/references.md section 3): truncated or corrupt files, zero-byte
files, decompression bombs, CMYK / 16-bit / palette / transparent / animated images. Each one is
either converted safely (with a note saying what was done) or rejected with a reason that ends up
in the sidecar's `error` column.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 64 Mpx: far above any web image the captioner resizes to 336 px, far below what exhausts RAM.
DEFAULT_MAX_PIXELS = 64_000_000
# Transparent pixels are composited onto white, as a browser shows a transparent PNG.
BACKGROUND = (255, 255, 255)


ORIENTATION_TAG = 0x0112
# EXIF 2.32 section 4.6.5 (Orientation): what turns the stored pixels upright.
_ORIENTATIONS = {2: "mirrored", 3: "rotated 180 degrees", 4: "flipped vertically",
                 5: "mirrored and rotated 90 degrees", 6: "rotated 90 degrees clockwise",
                 7: "mirrored and rotated 90 degrees", 8: "rotated 90 degrees counter-clockwise"}


class BadImage(ValueError):
    """The bytes cannot be turned into a safe RGB image; the message says why."""


@dataclasses.dataclass
class Decoded:
    image: Image.Image
    notes: list[str]  # safe conversions applied, e.g. "CMYK converted to RGB"


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Decoded:
    """Decode `data` to an 8-bit RGB image with EXIF orientation applied.

    `min_side`: the caller resizes the result so that its short side is `min_side` (or less); a JPEG
    is then decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale whose short side is still at least
    that (libjpeg's DCT scaling through PIL's `Image.draft`), which skips most of the decode work for
    a large photo trained at 256 px. The result differs from a full decode by resampling rounding."""
    if not data:
        raise BadImage("zero-byte image file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage(f"not a recognised image format (first bytes {data[:8]!r})") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on hostile headers
        raise BadImage(f"corrupt or truncated image header: {type(exc).__name__}: {exc}") from None
    # The header gives the size before any pixel is decoded: refuse bombs before they allocate.
    if min_side is not None and img.format == "JPEG" and img.width * img.height <= max_pixels:
        img.draft(None, draft_size(img.size, min_side))
    return decode_pil(img, max_pixels)


def draft_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The (w, h) to ask `Image.draft` for: the image's aspect with the short side `min_side` (rounded up),
    so every scale it may pick keeps the short side >= min_side."""
    w, h = size
    short = min(w, h)
    if short <= min_side:
        return w, h
    return -(-w * min_side // short), -(-h * min_side // short)


def decode_pil(img: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """`decode_image` for an image opened elsewhere (an HF `datasets` Image column): same checks, same pixels."""
    if img.width * img.height > max_pixels:
        raise BadImage(f"decompression bomb: {img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
    if img.width < 1 or img.height < 1:
        raise BadImage(f"empty image ({img.width}x{img.height})")
    notes: list[str] = []
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        notes.append(f"animated {img.format}: first of {frames} frames used")
        img.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:  # noqa: BLE001 - truncated data raises OSError, corrupt data others
        raise BadImage(f"corrupt or truncated image data: {type(exc).__name__}: {exc}") from None
    try:
        rgb = to_rgb(_upright(img, notes), notes)
    except Exception as exc:  # noqa: BLE001
        raise BadImage(f"cannot convert {img.mode} image to RGB: {type(exc).__name__}: {exc}") from None
    return Decoded(rgb, notes)


def _upright(img: Image.Image, notes: list[str]) -> Image.Image:
    """Apply the EXIF Orientation tag (cameras store pixels sideways and say so there), with a note."""
    orientation = img.getexif().get(ORIENTATION_TAG, 1)
    if orientation in (None, 1):
        return img
    upright = ImageOps.exif_transpose(img)
    if orientation in _ORIENTATIONS:
        notes.append(f"EXIF orientation {orientation} applied ({_ORIENTATIONS[orientation]})")
    return upright


def to_rgb(img: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited onto white."""
    notes = notes if notes is not None else []
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert("RGB") clips 16-bit values at 255 (a white image); rescale instead.
        notes.append(f"{mode} (high bit depth) rescaled to 8-bit RGB")
        return _rescale_to_rgb(img)
    if mode == "P" and "transparency" in img.info or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        notes.append(f"{mode} with transparency composited onto white")
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode not in ("L", "P", "1"):
        notes.append(f"{mode} converted to RGB")
    return img.convert("RGB")


def _rescale_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 257.0  # 65535 -> 255
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return gray.convert("RGB")
