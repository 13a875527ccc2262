"""The brand images drawn by scripts/brand: sizes and formats Home Assistant expects."""

from __future__ import annotations

from pathlib import Path
import struct

from PIL import Image
import pytest

BRAND = Path(__file__).resolve().parent.parent / "custom_components" / "mynas" / "brand"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPE_RGBA = 6


def png_header(path: Path) -> tuple[int, int, int]:
    """Width, height and colour type, read from the PNG's IHDR chunk."""
    data = path.read_bytes()[:33]
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert chunk == b"IHDR"
    assert length == 13
    width, height, _depth, color_type = struct.unpack(">IIBB", data[16:26])
    return width, height, color_type


@pytest.mark.parametrize(("name", "size"), [("icon.png", 256), ("icon@2x.png", 512)])
def test_icon_is_a_square_rgba_png(name: str, size: int) -> None:
    assert png_header(BRAND / name) == (size, size, COLOR_TYPE_RGBA)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("logo.png", 128, 256),
        ("logo@2x.png", 256, 512),
        ("dark_logo.png", 128, 256),
        ("dark_logo@2x.png", 256, 512),
    ],
)
def test_logo_is_a_landscape_rgba_png(name: str, low: int, high: int) -> None:
    width, height, color_type = png_header(BRAND / name)
    assert color_type == COLOR_TYPE_RGBA
    assert width > height, "a logo is landscape"
    assert low <= min(width, height) <= high


def test_hidpi_images_are_twice_the_size() -> None:
    for name in ("icon", "logo", "dark_logo"):
        width, height, _ = png_header(BRAND / f"{name}.png")
        width2, height2, _ = png_header(BRAND / f"{name}@2x.png")
        assert (width2, height2) == (2 * width, 2 * height), name


@pytest.mark.parametrize("name", ["icon.png", "logo.png"])
def test_image_is_drawn_on_a_transparent_background(name: str) -> None:
    with Image.open(BRAND / name) as image:
        alpha = image.getchannel("A")
        low, high = alpha.getextrema()
        assert (low, high) == (0, 255), "expected both transparent and opaque pixels"
        corner = alpha.getpixel((0, 0))
        assert corner == 0, "the background is transparent"
        # A real design, not a stray pixel: a good share of the image is opaque.
        opaque = alpha.histogram()[255]
        assert opaque > image.width * image.height // 4
