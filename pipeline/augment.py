"""Augmentation policies and the augmented views of stage one.

A view is one copy of an image as the backbone receives it. View 0 is always the deterministic
evaluation transform (resize, center crop, normalize); views 1..K of a training image pass through
a named augmentation policy instead. Each augmented view draws its randomness from a generator
seeded by (view seed, sample index, view), so extraction gives the same views whatever the worker
count, batch size and order of the data loader.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from pipeline.backbones import Preprocessing
from pipeline.datasets import Sample
from pipeline.images import LoadedItem, UnreadableImageError, build_geometry, decode_image
from pipeline.settings import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.policies import DETERMINISTIC_VIEW, POLICIES, AugmentPolicy, augmentation_key, get_policy  # noqa: F401

def build_augment_transform(preprocessing: Preprocessing, policy: AugmentPolicy, normalize: bool = True) -> T.Compose:
    """Build the training transform of a policy, ending in the normalization the weights expect.

    With ``normalize=False`` it ends at the uint8 crop, for batches that ``normalize_batch`` normalizes.

    The "flip" policy keeps the evaluation resize and center crop, so its views differ from
    view 0 only by the flip.
    """
    interpolation = InterpolationMode(preprocessing.interpolation)
    if policy.crop_scale == (1.0, 1.0):
        geometry = [
            T.Resize(preprocessing.resize_size, interpolation=interpolation, antialias=True),
            T.CenterCrop(preprocessing.crop_size),
        ]
    else:
        geometry = [
            T.RandomResizedCrop(
                preprocessing.crop_size, scale=policy.crop_scale, ratio=policy.crop_ratio,
                interpolation=interpolation, antialias=True,
            )
        ]
    steps = [T.PILToTensor(), *geometry, T.RandomHorizontalFlip(policy.flip_probability)]
    if any((policy.brightness, policy.contrast, policy.saturation, policy.hue)):
        steps.append(T.ColorJitter(policy.brightness, policy.contrast, policy.saturation, policy.hue))
    if normalize:
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std))]
    return T.Compose(steps)


def view_seed(seed: int, index: int, view: int) -> int:
    """Derive the 63-bit seed of one (sample, view) from the run's view seed."""
    state = np.random.SeedSequence([seed, index, view]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def apply_seeded(transform, image, seed: int) -> torch.Tensor:
    """Apply a random transform with torch's CPU generator seeded for this call only.

    torchvision's v2 transforms draw from the global torch generator and take no generator
    argument, so the global state is forked, seeded, and restored afterwards. A lock keeps
    threads that decode in the same process from seeding the generator in between.
    """
    with _GLOBAL_GENERATOR, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


_GLOBAL_GENERATOR = threading.Lock()


@dataclass
class ViewItem(LoadedItem):
    """One decoded view of an image, or the reason its image failed."""

    view: int = DETERMINISTIC_VIEW


class ViewDataset(torch.utils.data.Dataset):
    """Map-style dataset over (sample index, view) rows that returns the error of an unreadable file instead of raising."""

    def __init__(
        self,
        root: Path,
        samples: list[Sample],
        preprocessing: Preprocessing,
        rows: list[tuple[int, int]],
        policy: AugmentPolicy | None = None,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        draft_size: int | None = None,
    ) -> None:
        if policy is None and any(view != DETERMINISTIC_VIEW for _, view in rows):
            raise ValueError("Rows with augmented views need an augmentation policy.")
        self.root = root
        self.samples = samples
        self.rows = rows
        self.seed = seed
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        # uint8 crops: the main process normalizes whole batches (normalize_batch)
        self.evaluation = build_geometry(preprocessing)
        self.augmentation = build_augment_transform(preprocessing, policy, normalize=False) if policy else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> ViewItem:
        index, view = self.rows[position]
        path = self.root / self.samples[index].path
        try:
            decoded = decode_image(path, self.max_pixels, self.draft_size)
        except UnreadableImageError as error:
            return ViewItem(index, None, str(error), view=view)
        if view == DETERMINISTIC_VIEW:
            tensor = self.evaluation(decoded.image)
        else:
            tensor = apply_seeded(self.augmentation, decoded.image, view_seed(self.seed, index, view))
        return ViewItem(index, tensor, None, decoded.mode, decoded.orientation, view)


def view_rows(samples: list[Sample], indices: list[int], views: int) -> list[tuple[int, int]]:
    """List the (index, view) rows of some samples: views 0..K for train, view 0 for val and test."""
    rows = []
    for index in indices:
        count = views if samples[index].split == "train" else 0
        rows += [(index, view) for view in range(count + 1)]
    return rows


@dataclass
class ViewBatch:
    """The decoded views of one batch, in row order, and the rows whose file failed."""

    images: torch.Tensor | None  # (B, 3, H, W) uint8, None when every row of the batch failed
    rows: list[tuple[int, int]]  # (index, view) of each image
    modes: list[str]
    orientations: list[int]
    failures: list[tuple[int, int, str]]  # (index, view, reason)


def decode_in_threads(dataset: ViewDataset, batches: list[list[int]], threads: int) -> Iterator[ViewBatch]:
    """Yield the batches of ``dataset`` decoded in ``threads`` threads of this process, one batch at a time.

    The next batch is decoded only when the caller requests it, so on the CPU decoding and the
    forward pass take turns, each on every core. Pillow's decoders and torch's resize release the GIL.
    """
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode") as pool:
        for batch in batches:
            yield collate_views(list(pool.map(dataset.__getitem__, batch)))


def collate_views(items: list[ViewItem]) -> ViewBatch:
    """Stack the decoded views of a batch and keep the failures apart."""
    good = [item for item in items if item.image is not None]
    failures = [(item.index, item.view, item.error or "unknown error") for item in items if item.image is None]
    images = torch.stack([item.image for item in good]) if good else None  # (B, 3, H, W)
    return ViewBatch(
        images=images,
        rows=[(item.index, item.view) for item in good],
        modes=[item.mode for item in good],
        orientations=[item.orientation for item in good],
        failures=failures,
    )
