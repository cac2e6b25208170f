"""Datasets: the list of labelled image files that stage one reads, with their splits.

Sources:
- a class-per-folder directory, with ``train/``, ``val/``, ``test/`` subfolders when present and
  otherwise a deterministic stratified split;
- a CSV manifest of ``path,label[,split]`` rows (``pipeline.manifest_csv``);
- ``digits``: scikit-learn's 1,797 8x8 digit images, rendered once as PNG files under
  ``data/datasets/digits`` with a fixed stratified train/val/test split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.settings import DATA_ROOT, DatasetSettings, SettingsError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
EMBEDDED_DATASETS = ("digits",)


@dataclass(frozen=True)
class Sample:
    """One image: its path relative to the dataset root, its class index and its split."""

    path: str
    label: int
    split: str


@dataclass
class Dataset:
    """The samples of one dataset, in the order stage one stores them."""

    name: str
    root: Path
    class_names: list[str]
    samples: list[Sample]
    split_source: str  # "folders" or "csv" when the split came from the source, else "seeded"
    warnings: list[str] = field(default_factory=list)

    def count(self, split: str) -> int:
        return sum(1 for sample in self.samples if sample.split == split)


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Return the image files below ``folder``, sorted, skipping hidden files and folders."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(path)
    return sorted(found)


def class_folders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not is_hidden(path))


def seeded_split(count: int, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Assign ``count`` items of one class to splits, reproducibly for a seed."""
    order = np.random.default_rng(seed).permutation(count)
    n_test = int(round(count * test_fraction))
    n_val = int(round(count * val_fraction))
    if count - n_test - n_val < 1 and count > 0:
        n_val = max(0, count - n_test - 1)
    splits = ["train"] * count
    for position, item in enumerate(order):
        if position < n_test:
            splits[item] = "test"
        elif position < n_test + n_val:
            splits[item] = "val"
    return splits


def sorted_samples(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda sample: (SPLITS.index(sample.split), sample.path))


def scan_folder(root: Path, settings: DatasetSettings) -> Dataset:
    """Index a class-per-folder directory, using split folders when it has them."""
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder {root} not found: pass a class-per-folder directory or 'digits'.")
    warnings: list[str] = []
    split_dirs = {split: root / split for split in SPLITS if (root / split).is_dir()}

    if "train" in split_dirs:
        class_names = [folder.name for folder in class_folders(split_dirs["train"])]
        if not class_names:
            raise ValueError(f"{split_dirs['train']} contains no class folders: put each class's images in its own folder.")
        index = {name: position for position, name in enumerate(class_names)}
        samples = []
        for split, split_dir in split_dirs.items():
            for folder in class_folders(split_dir):
                if folder.name not in index:
                    raise ValueError(
                        f"Class {folder.name!r} appears in {split_dir} but not in {split_dirs['train']}: "
                        "every class needs training images."
                    )
                images = list_images(folder)
                if not images:
                    warnings.append(f"class folder {folder} contains no images")
                samples += [Sample(path.relative_to(root).as_posix(), index[folder.name], split) for path in images]
        source = "folders"
        loose: list[str] = []
    else:
        folders = class_folders(root)
        if not folders:
            raise ValueError(f"{root} contains no class folders: put each class's images in its own folder.")
        loose = [path.name for path in sorted(root.iterdir()) if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS]
        if loose:
            warnings.append(f"{len(loose)} images lie directly in {root}, outside the class folders, such as "
                            f"{loose[0]!r}: they are skipped")
        class_names = [folder.name for folder in folders]
        samples = []
        for label, folder in enumerate(folders):
            images = list_images(folder)
            if not images:
                warnings.append(f"class folder {folder} contains no images")
            seed = settings.split_seed * 1_000_003 + label
            splits = seeded_split(len(images), settings.val_fraction, settings.test_fraction, seed)
            samples += [Sample(path.relative_to(root).as_posix(), label, split) for path, split in zip(images, splits)]
        source = "seeded"

    for message in warnings:
        logger.warning("%s", message)
    if not samples:
        if loose:
            raise ValueError(
                f"No images found in the class folders of {root}, but {len(loose)} lie directly in it, such as "
                f"{loose[0]!r}: move each image into the folder of its class."
            )
        raise ValueError(f"No images found below {root}: expected files ending in {sorted(IMAGE_EXTENSIONS)}.")
    return Dataset(root.name, root, class_names, sorted_samples(samples), source, warnings)


def render_digits(root: Path) -> Path:
    """Write scikit-learn's digits as 8x8 greyscale PNG files under ``root``, once.

    The split is fixed (seed 0, stratified, 60/20/20), so every machine renders the same folders.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    done = root / ".complete"
    if done.exists():
        return root
    digits = load_digits()
    labels = digits.target
    for label in range(10):
        members = np.flatnonzero(labels == label)
        splits = seeded_split(len(members), 0.2, 0.2, seed=label)
        for item, split in zip(members, splits):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(digits.images[item] * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
            Image.fromarray(pixels, mode="L").save(folder / f"{item:04d}.png")
    done.touch()
    logger.info("Rendered %d digits images under %s", len(labels), root)
    return root


def load_dataset(settings: DatasetSettings, data_root: Path = DATA_ROOT) -> Dataset:
    """Resolve a dataset source (an embedded name or a folder) into its ordered samples."""
    if settings.source in EMBEDDED_DATASETS:
        root = render_digits(data_root / "datasets" / settings.source)
        dataset = scan_folder(root, settings)
        dataset.name = settings.source
        return dataset
    path = Path(settings.source)
    if path.suffix.lower() == ".csv" and path.is_file():
        from pipeline.manifest_csv import read_csv_manifest

        return read_csv_manifest(path, settings)
    if not path.exists():
        raise SettingsError(
            f"Dataset {settings.source!r} not found: pass a class-per-folder directory, a CSV manifest "
            f"(path,label[,split]) or one of {list(EMBEDDED_DATASETS)}."
        )
    return scan_folder(path, settings)
