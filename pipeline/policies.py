"""Augmentation policies: the named settings of the augmented views, without importing torch.

The cache key and settings validation read these, so a cache hit never loads torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


def augmentation_key(views: int, policy_name: str, seed: int) -> dict | None:
    """Return the cache key's augmentation field: None without views, else policy, K and seed."""
    if views == 0:
        return None
    return {"policy": get_policy(policy_name).to_dict(), "views": views, "seed": seed}
