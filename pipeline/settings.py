"""Settings of both stages as frozen dataclasses, validated in one place.

The resolved settings are saved next to every output (HDF5 attributes and JSON), so a result can
always be traced back to how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.devices import AMP_DTYPES, default_workers

DATA_ROOT = Path("data")
DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_TAP = "pre_logits"
STORED_DTYPES = ("float32", "float16")
COMPRESSIONS = ("none", "gzip", "lzf")
# Pillow raises DecompressionBombError above twice its warning size of 89,478,485 pixels (Pillow 13).
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485
# Maximum ratio of an image's longer side to its shorter side. A more elongated image is padded with
# black to this ratio before resizing, because a 1x2000 image resized to a 256-pixel shorter side
# would otherwise need a 256x512000 tensor.
MAX_ASPECT_RATIO = 16


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the value and the allowed ones."""


@dataclass(frozen=True)
class DatasetSettings:
    """The image source and its split."""

    # A class-per-folder directory, a CSV manifest, or the name of an embedded dataset ("digits").
    source: str = "digits"
    # Fractions of each class given to val and test when the source has no split folders.
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    # Seed of the stratified split; the same seed always gives the same split.
    split_seed: int = 0
    # Hash the bytes of every file for the cache key, not only its size and modification time.
    content_hash: bool = False

    def validate(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise SettingsError(f"{name}={value} is invalid: use a fraction in [0, 1).")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise SettingsError(
                f"val_fraction={self.val_fraction} + test_fraction={self.test_fraction} = "
                f"{self.val_fraction + self.test_fraction:g} leaves no training images: keep the sum below 1."
            )


@dataclass(frozen=True)
class ExtractSettings:
    """Stage one: which backbone, which taps, and how the feature store is written."""

    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    # Backbone name: "efficientnet_lite0" (embedded), a torchvision model name, or a timm model name.
    backbone: str = DEFAULT_BACKBONE
    # Weights: "default" (the backbone's pretrained weights), a torchvision weights enum member
    # such as "IMAGENET1K_V2", or "random" (the untrained control).
    weights: str = "default"
    # Local checkpoint file (a state_dict) loaded into the backbone's architecture; overrides weights.
    checkpoint: str | None = None
    # Layer names whose outputs are stored; "pre_logits" is the input of the final classifier.
    taps: tuple[str, ...] = (DEFAULT_TAP,)
    # How feature-map taps (N, C, H, W) are reduced to vectors: avg, max, gem<p>, grid<k> or flatten.
    pooling: str = "avg"
    # Largest feature that "flatten" pooling may write, in values per image.
    max_flatten_dim: int = 16384
    # Augmented views stored per training image, in addition to the deterministic view 0.
    views: int = 0
    # Augmentation policy of those views ("none" when views is 0); see pipeline.augment.POLICIES.
    augment: str = "none"
    # Seed of the views: one (seed, sample index, view) triple always gives the same view.
    view_seed: int = 0
    # Floating-point type of the stored features.
    dtype: str = "float32"
    # Samples per HDF5 shard; bounds the memory held before a shard is written.
    shard_size: int = 1024
    # Images per forward pass; 0 picks one for the device (pipeline.devices.default_batch_size).
    batch_size: int = 0
    # Data-loading worker processes; 0 decodes in threads of the main process between forward
    # passes. The default is 0 on up to 2 cores, else cores - 1 (pipeline.devices.default_workers).
    workers: int = field(default_factory=default_workers)
    # "cpu", "cuda", "cuda:N" or "auto" (a GPU when there is one).
    device: str = "auto"
    # Folder of the feature stores.
    output_root: str = str(DATA_ROOT / "features")
    # Store folder name; by default derived from the dataset, backbone and cache key.
    name: str | None = None
    # Mixed precision of the forward pass: "none" (float32), "bf16", or "fp16" (CUDA only); part of the cache key.
    amp: str = "none"
    # Run the backbone and its input batches in channels-last memory format, for faster convolutions
    # on CPUs and GPUs. It is part of the cache key, because float rounding differs.
    channels_last: bool = True
    # Fold each batch norm into the convolution before it (pipeline.folding). Part of the cache key.
    fold_batchnorm: bool = True
    # Compile the backbone with torch.compile; the first batch then includes the compile time.
    compile: bool = False
    # Decode JPEGs at a reduced size no smaller than the resize target (Pillow draft mode); part of the cache key.
    draft: bool = True
    # Never reach the network for weights; missing weights are an error at once.
    offline: bool = False
    # Rebuild the store even when a complete one with the same key exists.
    force: bool = False
    # HDF5 compression filter of the feature datasets: "none", "gzip" or "lzf".
    compression: str = "none"
    # Images with more pixels (width * height) are skipped and listed instead of decoded.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def validate(self) -> None:
        self.dataset.validate()
        if not self.taps:
            raise SettingsError("taps is empty: name at least one tap, such as 'pre_logits'.")
        if len(set(self.taps)) != len(self.taps):
            raise SettingsError(f"taps={list(self.taps)} names a tap twice: list each tap once.")
        if self.dtype not in STORED_DTYPES:
            raise SettingsError(f"dtype={self.dtype!r} is invalid: use one of {list(STORED_DTYPES)}.")
        if self.shard_size < 1:
            raise SettingsError(f"shard_size={self.shard_size} is invalid: use a positive integer.")
        if self.batch_size < 0:
            raise SettingsError(f"batch_size={self.batch_size} is invalid: use a positive integer, or 0 for the device default.")
        if self.amp not in AMP_DTYPES:
            raise SettingsError(f"amp={self.amp!r} is invalid: use one of {list(AMP_DTYPES)}.")
        if self.workers < 0:
            raise SettingsError(f"workers={self.workers} is invalid: use 0 or more.")
        if self.compression not in COMPRESSIONS:
            raise SettingsError(f"compression={self.compression!r} is invalid: use one of {list(COMPRESSIONS)}.")
        if self.max_image_pixels < 1:
            raise SettingsError(f"max_image_pixels={self.max_image_pixels} is invalid: use a positive pixel count.")
        self._validate_views()

    def _validate_views(self) -> None:
        # imported here because pooling and augment import SettingsError from this module
        from pipeline.policies import POLICIES
        from pipeline.pooling import parse_pooling

        parse_pooling(self.pooling)
        if self.max_flatten_dim < 1:
            raise SettingsError(f"max_flatten_dim={self.max_flatten_dim} is invalid: use a positive integer.")
        if self.views < 0:
            raise SettingsError(f"views={self.views} is invalid: use 0 (no augmented views) or more.")
        if self.augment != "none" and self.augment not in POLICIES:
            raise SettingsError(f"augment={self.augment!r} is invalid: use one of {['none', *sorted(POLICIES)]}.")
        if self.views > 0 and self.augment == "none":
            raise SettingsError(f"views={self.views} needs an augmentation policy: pass --augment, such as --augment light.")
        if self.views == 0 and self.augment != "none":
            raise SettingsError(f"augment={self.augment!r} has no effect with views=0: pass --views K, such as --views 4.")


@dataclass(frozen=True)
class HeadSettings:
    """Stage two: which heads to train on which store, and where results go."""

    # Store folder; None picks the most recently completed store under data/features.
    store: str | None = None
    # Head names from the head registry.
    heads: tuple[str, ...] = ("logreg", "linear", "mlp", "knn")
    # Taps to train on; empty means every tap in the store.
    taps: tuple[str, ...] = ()
    # Seed of head initialization and batch order.
    seed: int = 0
    # Folder of the head results, one subfolder per store.
    output_root: str = str(DATA_ROOT / "results")
    # "cpu", "cuda" or "auto" for the torch heads.
    device: str = "cpu"
    # Trainings of each selected setting with seeds seed .. seed + seeds - 1; results give their mean.
    seeds: int = 1
    # None, or "balanced" to weight each class by n / (classes * count) in the loss.
    class_weight: str | None = None
    # Controls added to the leaderboard: "majority", "pixels", "random" (random-weights store, runs stage one).
    controls: tuple[str, ...] = ("majority", "pixels")
    # Overfitting warning when train accuracy exceeds selection accuracy by more than this (accuracy points, 0..1).
    overfit_gap: float = 0.1
    # Memory for the features of one tap, in MiB; above it linear and MLP heads stream shard by shard.
    memory_budget_mb: float = 2048.0
    # Cross-validation folds inside train, used for selection only when the store has no val split.
    cv_folds: int = 3
    # Without a val split, train splits of more images than this select on one held-out fold
    # (1/cv_folds of train: over 1,000 images by default) instead of cross-validating. 0 always cross-validates.
    cv_max_train: int = 3000
    # Side in pixels of the downscaled images of the pixels control.
    pixel_size: int = 16
    # torch CPU threads while heads train (numpy and scikit-learn keep one BLAS thread). The MLP
    # and kNN sweeps are large matrix products: 2 threads ran the kNN sweep of cifar10-small
    # features 1.5 times faster than 1 on a 2-core CPU. When other jobs keep the cores busy,
    # 1 thread avoids synchronization stalls.
    threads: int = 2
    # Epochs without a better selection accuracy before a linear or MLP head stops training.
    patience: int = 5
    # Hidden units of the MLP head. 128 reaches the test accuracy of 512 within a point on
    # cifar10-small Lite0 features, at a quarter of the matrix products.
    mlp_hidden: int = 128

    def validate(self) -> None:
        if not self.heads:
            raise SettingsError("heads is empty: name at least one head, such as 'logreg'.")
        if self.seeds < 1:
            raise SettingsError(f"seeds={self.seeds} is invalid: use 1 or more.")
        if self.class_weight not in (None, "balanced"):
            raise SettingsError(f"class_weight={self.class_weight!r} is invalid: use None or 'balanced'.")
        unknown = [name for name in self.controls if name not in ("majority", "pixels", "random")]
        if unknown:
            raise SettingsError(f"controls={unknown} are not known: use some of ['majority', 'pixels', 'random'].")
        if not 0.0 <= self.overfit_gap <= 1.0:
            raise SettingsError(f"overfit_gap={self.overfit_gap} is invalid: use an accuracy gap in [0, 1].")
        if self.memory_budget_mb <= 0:
            raise SettingsError(f"memory_budget_mb={self.memory_budget_mb} is invalid: use a positive number of MiB.")
        if self.cv_folds < 2:
            raise SettingsError(f"cv_folds={self.cv_folds} is invalid: use 2 or more folds.")
        if self.cv_max_train < 0:
            raise SettingsError(f"cv_max_train={self.cv_max_train} is invalid: use 0 (always cross-validate) or more images.")
        if self.pixel_size < 1:
            raise SettingsError(f"pixel_size={self.pixel_size} is invalid: use a positive side in pixels.")
        if self.threads < 1:
            raise SettingsError(f"threads={self.threads} is invalid: use 1 or more torch CPU threads.")
        if self.patience < 1:
            raise SettingsError(f"patience={self.patience} is invalid: use 1 or more epochs.")
        if self.mlp_hidden < 1:
            raise SettingsError(f"mlp_hidden={self.mlp_hidden} is invalid: use 1 or more hidden units.")


def settings_to_dict(settings: Any) -> dict[str, Any]:
    """Convert a settings dataclass into plain JSON-ready values (tuples become lists)."""
    return json_ready(dataclasses.asdict(settings))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
