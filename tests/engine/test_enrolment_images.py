"""Enrolment reads the images users have: 16-bit, palette, CMYK, greyscale, EXIF-rotated, alpha."""

import io

import numpy as np
import pytest
from PIL import Image

from facegen.engine.index.sources import image_to_rgb8


def reopen(image: Image.Image, fmt: str = "PNG", **kwargs) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_16_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896], [65535, 1000, 60000]], np.uint16)
    image = reopen(Image.fromarray(values))
    assert image.mode.startswith("I")
    out = image_to_rgb8(image)
    expected = np.rint(values / 65535 * 255).astype(np.uint8)  # 65535 -> 255, 257 -> 1, 32896 -> 128
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert (out[..., 0] == out[..., 2]).all() and out[..., 0].tolist() == [[0, 1, 128], [255, 4, 233]]


def test_16_bit_rgb_keeps_the_high_byte():
    import cv2

    values = np.zeros((2, 2, 3), np.uint16)
    values[0, 0] = (65535, 32768, 0)  # RGB
    ok, data = cv2.imencode(".png", values[:, :, ::-1])
    assert ok
    out = image_to_rgb8(Image.open(io.BytesIO(data.tobytes())))
    assert out[0, 0].tolist() == [255, 128, 0]


def test_palette_cmyk_grey_alpha_and_exif():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :3] = (200, 30, 60)
    rgb[:, 3:] = (10, 220, 90)
    palette = reopen(Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4))
    assert palette.mode == "P"
    np.testing.assert_array_equal(image_to_rgb8(palette), rgb)

    cmyk = reopen(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=100)
    assert cmyk.mode == "CMYK"
    assert np.abs(image_to_rgb8(cmyk).astype(int) - rgb).max() <= 12  # JPEG, not exact

    grey = reopen(Image.fromarray(rgb[..., 1]))
    out = image_to_rgb8(grey)
    assert (out == rgb[..., 1:2]).all()

    rgba = np.dstack([rgb, np.full((4, 6), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # fully transparent: shows the white background, not the hidden colour
    rgba[1, 0, 3] = 128
    out = image_to_rgb8(reopen(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[2, 0].tolist() == [200, 30, 60]
    assert out[1, 0].tolist() == pytest.approx([228, 142, 157], abs=1)

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = reopen(Image.fromarray(rgb), "PNG", exif=exif)
    assert rotated.getexif()[0x0112] == 6
    out = image_to_rgb8(rotated)
    assert out.shape == (6, 4, 3)  # displayed upright: width and height swap
    np.testing.assert_array_equal(out, np.rot90(rgb, -1))
