"""Image decoding and the evaluation transform, run inside data-loading workers, and the normalization of a batch."""

from __future__ import annotations

import logging
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F
from torchvision.transforms import InterpolationMode

from pipeline.backbones import Preprocessing
from pipeline.datasets import Sample
from pipeline.settings import DEFAULT_MAX_IMAGE_PIXELS, MAX_ASPECT_RATIO
from pipeline.draft import apply_draft

logger = logging.getLogger(__name__)


# Pillow's plugins raise these types on corrupt or unsupported files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError)
EXIF_ORIENTATION = 0x0112


class UnreadableImageError(ValueError):
    """A file could not be decoded as an image."""


@dataclass
class DecodedImage:
    """An RGB image with what decoding found out about the file."""

    image: Image.Image
    mode: str  # Pillow mode of the file before conversion, such as "CMYK" or "I;16"
    orientation: int  # EXIF orientation tag, applied to the pixels (1: upright or no tag)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, rescaling 16- and 32-bit values instead of clipping."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max()) if values.size else 0.0
        if image.mode.startswith("I;16") or (image.mode == "I" and peak <= 65535.0):
            high = 65535.0
        else:
            high = max(peak, 1.0)
        image = Image.fromarray(np.clip(values / high * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


@contextmanager
def _pixel_limit_lifted():
    """Disable Pillow's own decompression-bomb check, because ``max_pixels`` replaces it.

    NOTE: this sets the module-level ``Image.MAX_IMAGE_PIXELS``, so it is not safe when another
    thread of the same process decodes images at the same time.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, draft_size: int | None = None) -> DecodedImage:
    """Decode the first frame of an image file as RGB, with its EXIF orientation applied.

    With ``draft_size``, a large JPEG is decoded at a reduced size whose sides stay at least ``draft_size``.

    Raises UnreadableImageError, with the reason, for a corrupt file or one above ``max_pixels``.
    """
    try:
        with _pixel_limit_lifted(), Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise UnreadableImageError(
                    f"{width}x{height} is {width * height} pixels, above the limit of {max_pixels}: "
                    "raise --max-image-pixels to decode it"
                )
            image.seek(0)
            mode = image.mode
            orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
            if draft_size:
                apply_draft(image, draft_size)
            image = ImageOps.exif_transpose(image)
            image.load()
            return DecodedImage(to_rgb(image), mode, orientation)
    except UnreadableImageError:
        raise
    except DECODE_ERRORS as error:
        raise UnreadableImageError(f"{type(error).__name__}: {error}") from error


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode the first frame of an image file as RGB, with its EXIF orientation applied."""
    return decode_image(path, max_pixels, draft_size).image


def pad_to_aspect_ratio(image: torch.Tensor) -> torch.Tensor:
    """Pad the shorter side of a (C, H, W) image with zeros until its aspect ratio is at most MAX_ASPECT_RATIO.

    Without this, resizing a 1x2000 image to a 256-pixel shorter side would need a 256x512000 tensor.
    """
    height, width = image.shape[-2:]
    if max(height, width) <= MAX_ASPECT_RATIO * min(height, width):
        return image
    short = -(-max(height, width) // MAX_ASPECT_RATIO)  # ceiling division
    pad_height, pad_width = max(0, short - height), max(0, short - width)
    top, left = pad_height // 2, pad_width // 2
    return torch.nn.functional.pad(image, (left, pad_width - left, top, pad_height - top))


class Geometry:
    """Resize the shorter side and center-crop a PIL image, keeping the 8-bit pixels: (3, crop, crop) uint8.

    Images more elongated than MAX_ASPECT_RATIO are first padded with black to that ratio. The
    steps call torchvision's kernels directly. They give the same pixels as ``T.PILToTensor``,
    ``T.Resize`` and ``T.CenterCrop`` in a ``T.Compose``, whose dispatch took about half of a
    32x32 image's preprocessing time.
    """

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.resize_size = [preprocessing.resize_size]
        self.crop_size = [preprocessing.crop_size, preprocessing.crop_size]
        self.interpolation = InterpolationMode(preprocessing.interpolation)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = pad_to_aspect_ratio(F.pil_to_tensor(image))
        resized = F.resize_image(pixels, self.resize_size, interpolation=self.interpolation, antialias=True)
        return F.center_crop_image(resized, self.crop_size)


def build_geometry(preprocessing: Preprocessing) -> Geometry:
    """Return the uint8 resize and center crop of ``preprocessing`` (see ``Geometry``).

    Stage one's workers stop here and send uint8 batches, a quarter of the bytes of float32; the
    main process scales and normalizes whole batches with ``normalize_batch``.
    """
    return Geometry(preprocessing)


def build_transform(preprocessing: Preprocessing) -> T.Compose:
    """Resize the shorter side, center-crop, scale to [0, 1] and normalize, as the weights expect: (3, crop, crop) float32."""
    return T.Compose(
        [
            build_geometry(preprocessing),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std)),
        ]
    )


def normalize_batch(
    images: torch.Tensor, preprocessing: Preprocessing, memory_format: torch.memory_format = torch.preserve_format
) -> torch.Tensor:
    """Scale a uint8 (B, 3, H, W) batch to [0, 1] and normalize it, as ``build_transform`` does image by image.

    The result is float32 in ``memory_format`` (by default that of ``images``). It equals
    ``build_transform``'s output up to float rounding (about 1e-7).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_batch expects a uint8 batch, got {images.dtype}.")
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
    # (x / 255 - mean) / std as one multiply and one subtraction. The multiply converts to float32
    # and to the memory format in the same pass, which took half the time of three passes on the CPU.
    normalized = torch.empty_like(images, dtype=torch.float32, memory_format=memory_format)
    return torch.mul(images, 1.0 / (255.0 * std), out=normalized).sub_(mean / std)


@dataclass
class LoadedItem:
    """One decoded image, or the reason it failed."""

    index: int
    image: torch.Tensor | None
    error: str | None
    mode: str = ""  # Pillow mode of the file before conversion
    orientation: int = 1  # EXIF orientation that was applied


@dataclass
class LoadedBatch:
    """The decoded images of one batch, in index order, and the files that failed."""

    images: torch.Tensor | None  # (B, 3, H, W), None when every file of the batch failed
    indices: list[int]
    modes: list[str]
    orientations: list[int]
    failures: list[tuple[int, str]]  # (index, reason)


class ImageFileDataset(torch.utils.data.Dataset):
    """Map-style dataset over samples that returns the decode error of an unreadable file instead of raising it."""

    def __init__(
        self,
        root: Path,
        samples: list[Sample],
        transform,
        indices: list[int],
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        draft_size: int | None = None,
    ) -> None:
        self.root = root
        self.draft_size = draft_size
        self.samples = samples
        self.transform = transform
        self.indices = indices
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> LoadedItem:
        index = self.indices[position]
        path = self.root / self.samples[index].path
        try:
            decoded = decode_image(path, self.max_pixels, self.draft_size)
        except UnreadableImageError as error:
            return LoadedItem(index, None, str(error))
        return LoadedItem(index, self.transform(decoded.image), None, decoded.mode, decoded.orientation)


def collate_items(items: list[LoadedItem]) -> LoadedBatch:
    """Stack the decoded images of a batch and keep the failures apart."""
    good = [item for item in items if item.image is not None]
    failures = [(item.index, item.error or "unknown error") for item in items if item.image is None]
    images = torch.stack([item.image for item in good]) if good else None
    return LoadedBatch(
        images=images,
        indices=[item.index for item in good],
        modes=[item.mode for item in good],
        orientations=[item.orientation for item in good],
        failures=failures,
    )
