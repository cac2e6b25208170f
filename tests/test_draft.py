"""Tests of JPEG draft decoding and of how close its features stay to a full decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.draft import apply_draft
from pipeline.images import build_transform, load_image


def write_photo_like(path: Path, size: tuple[int, int], seed: int = 0, exif_orientation: int | None = None) -> Path:
    """Write a JPEG with smooth gradients, shapes and mild noise, closer to a photo than pure noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 128 + 100 * np.sin(x / width * 6.0 + seed)
    green = 128 + 100 * np.cos(y / height * 4.0)
    blue = 255 * ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(size) / 3) ** 2)
    pixels = np.stack([red, green, blue], axis=-1) + rng.normal(0, 8, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[0x0112] = exif_orientation
    image.save(path, quality=90, exif=exif)
    return path


def test_large_jpeg_decodes_reduced(tmp_path):
    path = write_photo_like(tmp_path / "large.jpg", (1600, 1200))
    with Image.open(path) as image:
        reduced = apply_draft(image, 256)
        image.load()
        size = image.size
    assert reduced
    assert size == (400, 300)  # scale 1/4: both sides stay at least 256


def test_draft_keeps_sides_above_target(tmp_path):
    path = write_photo_like(tmp_path / "wide.jpg", (2592, 600))
    with Image.open(path) as image:
        apply_draft(image, 256)
        image.load()
        size = image.size
    assert min(size) >= 256
    assert size == (1296, 300)  # 600 // 256 = 2 limits the scale to 1/2


def test_small_jpeg_decodes_full(tmp_path):
    path = write_photo_like(tmp_path / "small.jpg", (300, 300))
    with Image.open(path) as image:
        reduced = apply_draft(image, 256)
        image.load()
        size = image.size
    assert not reduced
    assert size == (300, 300)


def test_png_decodes_full(tmp_path):
    path = tmp_path / "large.png"
    Image.new("RGB", (1600, 1200), (10, 20, 30)).save(path)
    with Image.open(path) as image:
        reduced = apply_draft(image, 256)
        size = image.size
    assert not reduced
    assert size == (1600, 1200)


def test_load_image_draft_applies_exif_rotation(tmp_path):
    path = write_photo_like(tmp_path / "rotated.jpg", (1600, 1200), exif_orientation=6)
    image = load_image(path, draft_size=256)
    assert image.size == (300, 400)
    assert image.mode == "RGB"


@pytest.mark.slow
def test_draft_features_close_to_full_decode(tmp_path, lite0):
    from pipeline.taps import TapExtractor

    transform = build_transform(lite0.preprocessing)
    extractor = TapExtractor(lite0, ["pre_logits"])
    paths = [write_photo_like(tmp_path / f"photo{seed}.jpg", (1800, 1350), seed=seed) for seed in range(3)]
    full = torch.stack([transform(load_image(path)) for path in paths])
    draft = torch.stack([transform(load_image(path, draft_size=lite0.preprocessing.resize_size)) for path in paths])
    full_features = extractor(full)["pre_logits"]
    draft_features = extractor(draft)["pre_logits"]
    cosine = torch.nn.functional.cosine_similarity(full_features, draft_features, dim=1)
    assert not torch.equal(full, draft)  # draft mode did change the decoded pixels
    assert float(cosine.min()) > 0.98


@pytest.mark.real_data
def test_draft_features_close_on_real_photos(shared_datasets, lite0):
    from pipeline.taps import TapExtractor

    folder = shared_datasets / "hymenoptera_data" / "val" / "bees"
    paths = sorted(folder.glob("*.jpg"))[:6]
    transform = build_transform(lite0.preprocessing)
    extractor = TapExtractor(lite0, ["pre_logits"])
    full = torch.stack([transform(load_image(path)) for path in paths])
    draft = torch.stack([transform(load_image(path, draft_size=lite0.preprocessing.resize_size)) for path in paths])
    cosine = torch.nn.functional.cosine_similarity(extractor(full)["pre_logits"], extractor(draft)["pre_logits"], dim=1)
    assert float(cosine.min()) > 0.97
