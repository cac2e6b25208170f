"""Decoding of odd and broken image files into RGB, made with Pillow in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from pipeline.backbones import Preprocessing
from pipeline.images import UnreadableImageError, build_geometry, build_transform, decode_image, pad_to_aspect_ratio, to_rgb

SMALL = Preprocessing(36, 32, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "test")


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(noise(20, 30)).convert("CMYK").save(path)
    decoded = decode_image(path)
    assert decoded.mode == "CMYK"
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (30, 20)


def test_16bit_png_rescaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    decoded = decode_image(path)
    red = np.asarray(decoded.image)[0, :, 0]
    assert decoded.mode == "I;16"
    assert red.tolist() == [0, 3, 127, 255]


def test_palette_png_transparency_on_white(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0
    image.save(path, transparency=0)
    decoded = decode_image(path)
    pixels = np.asarray(decoded.image)
    assert decoded.mode == "P"
    assert pixels[0, 0].tolist() == [200, 10, 10]
    assert pixels[1, 1].tolist() == [255, 255, 255]


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    values = np.zeros((2, 2, 4), dtype=np.uint8)
    values[0, 0] = (10, 20, 30, 255)
    Image.fromarray(values, mode="RGBA").save(path)
    decoded = decode_image(path)
    pixels = np.asarray(decoded.image)
    assert decoded.mode == "RGBA"
    assert pixels[0, 0].tolist() == [10, 20, 30]
    assert pixels[1, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    ("name", "mode", "save_options"),
    [
        ("grey.png", "L", {}),
        ("bits.png", "1", {}),
        ("photo.webp", "RGB", {}),
        ("photo.bmp", "RGB", {}),
        ("photo.tiff", "RGB", {}),
        ("UPPER.JPG", "RGB", {}),
        ("progressive.jpg", "RGB", {"progressive": True}),
    ],
)
def test_formats_decode_as_rgb(tmp_path: Path, name: str, mode: str, save_options: dict) -> None:
    path = tmp_path / name
    Image.fromarray(noise(12, 16)).convert(mode).save(path, **save_options)
    decoded = decode_image(path)
    assert decoded.mode == mode
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (16, 12)


def test_progressive_jpeg_is_progressive(tmp_path: Path) -> None:
    path = tmp_path / "progressive.jpg"
    Image.fromarray(noise(12, 16)).save(path, progressive=True)
    with Image.open(path) as image:
        assert image.info.get("progressive") == 1


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "animated.gif"
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    decoded = decode_image(path)
    red, green, blue = np.asarray(decoded.image)[4, 4].tolist()
    assert red > 200
    assert blue < 50


def test_exif_orientation_applied_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    image = Image.fromarray(noise(10, 40))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(path, exif=exif)
    decoded = decode_image(path)
    assert decoded.orientation == 6
    assert decoded.image.size == (10, 40)


def test_tiny_and_elongated_images_transform(tmp_path: Path) -> None:
    transform = build_transform(SMALL)
    for size in ((1, 1), (1, 2000), (2000, 1)):
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (40, 80, 120)).save(path)
        tensor = transform(decode_image(path).image)
        assert tuple(tensor.shape) == (3, 32, 32)
        assert bool(torch.isfinite(tensor).all())


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_geometry_matches_torchvision_compose(interpolation: str) -> None:
    preprocessing = Preprocessing(256, 224, interpolation, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "test")
    compose = T.Compose([
        T.PILToTensor(),
        T.Lambda(pad_to_aspect_ratio),
        T.Resize(256, interpolation=InterpolationMode(interpolation), antialias=True),
        T.CenterCrop(224),
    ])
    geometry = build_geometry(preprocessing)
    # upscaled, downscaled, odd sizes, and an image elongated past the padding ratio
    for seed, (height, width) in enumerate(((32, 32), (375, 500), (333, 251), (256, 256), (20, 900))):
        image = Image.fromarray(noise(height, width, seed))
        expected = compose(image)
        result = geometry(image)
        assert result.dtype == torch.uint8
        assert tuple(result.shape) == (3, 224, 224)
        assert torch.equal(result, expected)


def test_pixel_limit_rejects_large_image(tmp_path: Path) -> None:
    path = tmp_path / "large.png"
    Image.new("RGB", (200, 100), (1, 2, 3)).save(path)
    with pytest.raises(UnreadableImageError, match="20000 pixels, above the limit of 19999"):
        decode_image(path, max_pixels=19_999)


def test_pixel_limit_replaces_pillow_bomb_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "beyond_pillow_limit.png"
    Image.new("RGB", (300, 300), (1, 2, 3)).save(path)
    # Pillow would raise DecompressionBombError above twice this size: 90,000 pixels is 9x.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    decoded = decode_image(path, max_pixels=100_000)
    assert decoded.image.size == (300, 300)
    assert Image.MAX_IMAGE_PIXELS == 10_000


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("zero.jpg", b"", "UnidentifiedImageError"),
        ("text.jpg", b"this is a text file, not a JPEG\n", "UnidentifiedImageError"),
    ],
)
def test_unreadable_files_raise(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnreadableImageError, match=reason):
        decode_image(path)


def test_truncated_jpeg_raises(tmp_path: Path) -> None:
    path = tmp_path / "truncated.jpg"
    Image.fromarray(noise(64, 64)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(UnreadableImageError, match="(?i)truncated"):
        decode_image(path)


def test_float_image_rescaled_by_peak() -> None:
    image = Image.fromarray(np.array([[0.0, 2.0, 4.0]], dtype=np.float32), mode="F")
    assert np.asarray(to_rgb(image))[0, :, 1].tolist() == [0, 127, 255]


@pytest.mark.real_data
def test_hymenoptera_odd_files_decode(shared_datasets: Path) -> None:
    ants = shared_datasets / "hymenoptera_data" / "train" / "ants"
    placeholder = decode_image(ants / "imageNotFound.gif")
    spaced = decode_image(ants / "ant photos.jpg")
    assert placeholder.mode == "P"
    assert placeholder.image.mode == "RGB"
    assert spaced.image.mode == "RGB"
