"""Image decoding and the evaluation transform, run inside data-loading workers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T
from torchvision.transforms import InterpolationMode

from pipeline.backbones import Preprocessing
from pipeline.datasets import Sample
from pipeline.draft import apply_draft

logger = logging.getLogger(__name__)


class UnreadableImageError(ValueError):
    """A file could not be decoded as an image."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, rescaling 16- and 32-bit values instead of clipping."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values / high * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(path: Path, draft_size: int | None = None) -> Image.Image:
    """Decode the first frame of an image file as RGB, with its EXIF orientation applied.

    With ``draft_size``, a large JPEG is decoded at a reduced size whose sides stay at least ``draft_size``.
    """
    try:
        with Image.open(path) as image:
            image.seek(0)
            if draft_size:
                apply_draft(image, draft_size)
            image = ImageOps.exif_transpose(image)
            image.load()
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise UnreadableImageError(f"{path}: {type(error).__name__}: {error}") from error


def build_transform(preprocessing: Preprocessing) -> T.Compose:
    """Resize the shorter side, center-crop, scale to [0, 1] and normalize, as the weights expect."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(preprocessing.resize_size, interpolation=InterpolationMode(preprocessing.interpolation), antialias=True),
            T.CenterCrop(preprocessing.crop_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std)),
        ]
    )


@dataclass
class LoadedItem:
    """One decoded image, or the reason it failed."""

    index: int
    image: torch.Tensor | None
    error: str | None


class ImageFileDataset(torch.utils.data.Dataset):
    """Map-style dataset over samples that never raises on a bad file: it returns the error."""

    def __init__(self, root: Path, samples: list[Sample], transform, indices: list[int], draft_size: int | None = None) -> None:
        self.root = root
        self.draft_size = draft_size
        self.samples = samples
        self.transform = transform
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> LoadedItem:
        index = self.indices[position]
        path = self.root / self.samples[index].path
        try:
            return LoadedItem(index, self.transform(load_image(path, self.draft_size)), None)
        except UnreadableImageError as error:
            return LoadedItem(index, None, str(error.__cause__ or error))


def collate_items(items: list[LoadedItem]) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """Stack the decoded images of a batch; return (images, their indices, failures)."""
    good = [item for item in items if item.image is not None]
    failures = [(item.index, item.error or "unknown error") for item in items if item.image is None]
    images = torch.stack([item.image for item in good]) if good else None
    return images, [item.index for item in good], failures
