"""Augmentation policies and the augmented views of stage one.

A view is one copy of an image as the backbone receives it. View 0 is always the deterministic
evaluation transform (resize, center crop, normalize); views 1..K of a training image pass through
a named augmentation policy instead. Each augmented view draws its randomness from a generator
seeded by (view seed, sample index, view), so extraction gives the same views whatever the worker
count, batch size and order of the data loader.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from pipeline.backbones import Preprocessing
from pipeline.datasets import Sample
from pipeline.images import LoadedItem, UnreadableImageError, build_transform, load_image
from pipeline.settings import SettingsError

DETERMINISTIC_VIEW = 0


@dataclass(frozen=True)
class AugmentPolicy:
    """A named training augmentation: random resized crop, horizontal flip and colour jitter."""

    name: str
    crop_scale: tuple[float, float]  # area fraction of the image that the random crop keeps
    crop_ratio: tuple[float, float]  # aspect ratio range of the random crop
    flip_probability: float  # probability of a horizontal flip
    brightness: float  # colour jitter strengths, as in torchvision ColorJitter; 0 turns one off
    contrast: float
    saturation: float
    hue: float

    def to_dict(self) -> dict:
        return asdict(self)


# The crop ratio (3/4, 4/3) and the "standard" crop scale (0.08, 1) are the defaults of torchvision
# RandomResizedCrop. The "light" policy keeps at least half of the image, because small datasets
# and images whose object fills the frame lose the object to stronger crops.
POLICIES: dict[str, AugmentPolicy] = {
    "flip": AugmentPolicy("flip", (1.0, 1.0), (1.0, 1.0), 0.5, 0.0, 0.0, 0.0, 0.0),
    "light": AugmentPolicy("light", (0.5, 1.0), (3 / 4, 4 / 3), 0.5, 0.2, 0.2, 0.2, 0.0),
    "standard": AugmentPolicy("standard", (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.4, 0.4, 0.4, 0.1),
}


def get_policy(name: str) -> AugmentPolicy:
    if name not in POLICIES:
        raise SettingsError(f"augment={name!r} is invalid: use one of {sorted(POLICIES)}.")
    return POLICIES[name]


def build_augment_transform(preprocessing: Preprocessing, policy: AugmentPolicy) -> T.Compose:
    """Build the training transform of a policy, ending in the normalization the weights expect.

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
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std))]
    return T.Compose(steps)


def view_seed(seed: int, index: int, view: int) -> int:
    """Derive the 63-bit seed of one (sample, view) from the run's view seed."""
    state = np.random.SeedSequence([seed, index, view]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def apply_seeded(transform, image, seed: int) -> torch.Tensor:
    """Apply a random transform with torch's CPU generator seeded for this call only.

    torchvision's v2 transforms draw from the global torch generator and take no generator
    argument, so the global state is forked, seeded, and restored afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


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
    ) -> None:
        if policy is None and any(view != DETERMINISTIC_VIEW for _, view in rows):
            raise ValueError("Rows with augmented views need an augmentation policy.")
        self.root = root
        self.samples = samples
        self.rows = rows
        self.seed = seed
        self.evaluation = build_transform(preprocessing)
        self.augmentation = build_augment_transform(preprocessing, policy) if policy else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> ViewItem:
        index, view = self.rows[position]
        path = self.root / self.samples[index].path
        try:
            image = load_image(path)
        except UnreadableImageError as error:
            return ViewItem(index, None, str(error.__cause__ or error), view)
        if view == DETERMINISTIC_VIEW:
            return ViewItem(index, self.evaluation(image), None, view)
        return ViewItem(index, apply_seeded(self.augmentation, image, view_seed(self.seed, index, view)), None, view)


def view_rows(samples: list[Sample], indices: list[int], views: int) -> list[tuple[int, int]]:
    """List the (index, view) rows of some samples: views 0..K for train, view 0 for val and test."""
    rows = []
    for index in indices:
        count = views if samples[index].split == "train" else 0
        rows += [(index, view) for view in range(count + 1)]
    return rows


def collate_views(items: list[ViewItem]) -> tuple[torch.Tensor | None, list[tuple[int, int]], list[tuple[int, int, str]]]:
    """Stack the decoded views of a batch; return (images, their (index, view) rows, failures)."""
    good = [item for item in items if item.image is not None]
    failures = [(item.index, item.view, item.error or "unknown error") for item in items if item.image is None]
    images = torch.stack([item.image for item in good]) if good else None  # (B, 3, H, W)
    return images, [(item.index, item.view) for item in good], failures


def augmentation_key(views: int, policy_name: str, seed: int) -> dict | None:
    """Return the cache key's augmentation field: None without views, else policy, K and seed."""
    if views == 0:
        return None
    return {"policy": get_policy(policy_name).to_dict(), "views": views, "seed": seed}
