"""t2i_recap.images: the one decode of captioner and trainer."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from t2i_recap.images import BadImage, decode_image, decode_pil


def _jpeg(img: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _marked(size=(40, 20)) -> Image.Image:
    """White with a red block in the top-left corner, so any turn or mirror moves it."""
    arr = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    arr[:6, :6] = (255, 0, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("orientation, transpose", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
    (2, Image.Transpose.FLIP_LEFT_RIGHT)])
def test_every_exif_orientation_comes_out_upright_with_a_note(orientation, transpose):
    upright = _marked()
    stored = upright.transpose(transpose)  # what a camera writes for this orientation tag
    decoded = decode_image(_jpeg(stored, orientation))
    assert decoded.image.size == upright.size
    r, g, b = decoded.image.getpixel((2, 2))
    assert r > 200 and g < 60 and b < 60, (orientation, decoded.image.getpixel((2, 2)))
    assert any(f"EXIF orientation {orientation} applied" in n for n in decoded.notes)


def test_an_upright_photo_gets_no_orientation_note():
    assert not decode_image(_jpeg(_marked(), 1)).notes
    assert not decode_image(_jpeg(_marked())).notes


def test_an_opened_image_goes_through_the_same_checks_and_conversion():
    img = Image.open(io.BytesIO(_jpeg(_marked(), 6)))
    decoded = decode_pil(img)
    assert decoded.image.size == (20, 40) and decoded.notes
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_pil(Image.new("RGB", (100, 100)), max_pixels=99)


def test_trainer_load_image_is_the_captioner_decode():
    import torch

    from t2i_recap.data import load_image

    data = _jpeg(_marked((24, 24)), 8)
    pixels = load_image(data, 8)
    assert torch.equal(pixels, load_image(decode_image(data).image, 8))
    # orientation 8 turns the stored pixels 90 degrees counter-clockwise: the red corner goes bottom-left
    assert pixels[0, -1, 0] > 0.5 and pixels[1, -1, 0] < -0.5
    assert pixels[1, 0, 0] > 0.5  # and the top-left is white
