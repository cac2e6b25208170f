"""Write small feature stores from synthetic Gaussian features, for stage-two tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.store import ShardData, StoreWriter


def write_store(
    folder: Path,
    *,
    taps: dict[str, int] | None = None,
    counts: dict[str, int] | None = None,
    class_names: tuple[str, ...] = ("a", "b", "c"),
    separation: float = 2.0,
    shard_size: int = 64,
    seed: int = 0,
    image_root: Path | None = None,
    class_sizes: tuple[float, ...] | None = None,
    image_size: tuple[int, int] = (8, 8),
    image_format: str = "png",
) -> Path:
    """Write a complete store whose classes are Gaussian blobs in every tap; return its folder.

    ``counts`` gives the samples per split; ``class_sizes`` the share of each class (equal by default).
    With ``image_root``, one image per sample (``image_size`` as width x height, an 8 x 8 PNG by
    default) is written there, coloured by class, and recorded as the store's dataset_root, so that
    the pixels control can read it.
    """
    taps = taps or {"early": 6, "late": 12}
    counts = counts or {"train": 90, "val": 45, "test": 45}
    rng = np.random.default_rng(seed)
    shares = np.asarray(class_sizes or [1.0] * len(class_names), dtype=float)
    shares = shares / shares.sum()

    splits, labels = [], []
    for split, count in counts.items():
        split_labels = rng.choice(len(class_names), size=count, p=shares)
        split_labels[: len(class_names)] = np.arange(len(class_names))[: count]
        labels.append(split_labels)
        splits += [split] * count
    labels = np.concatenate(labels).astype(np.int64)
    means = {tap: rng.normal(0, separation, size=(len(class_names), dim)) for tap, dim in taps.items()}
    features = {tap: (means[tap][labels] + rng.normal(0, 1, size=(len(labels), dim))).astype(np.float32)
                for tap, dim in taps.items()}
    paths = [f"{class_names[label]}/{row:05d}.{image_format}" for row, label in enumerate(labels)]
    if image_root is not None:
        colours = rng.integers(0, 256, size=(len(class_names), 3))
        for path, label in zip(paths, labels):
            pixels = np.clip(colours[label] + rng.normal(0, 30, (image_size[1], image_size[0], 3)), 0, 255).astype(np.uint8)
            (image_root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(image_root / path)

    header = {
        "key": f"synthetic-{seed}-{'-'.join(f'{tap}{dim}' for tap, dim in taps.items())}",
        "class_names": list(class_names),
        "shard_size": shard_size,
        "dtype": "float32",
        "dataset_root": str(image_root or folder),
        "provenance": {"backbone": "synthetic", "weights": "default", "taps": list(taps)},
    }
    writer = StoreWriter.create_or_resume(folder, header, {"backbone": "synthetic"})
    for shard, start in enumerate(range(0, len(labels), shard_size)):
        rows = slice(start, start + shard_size)
        writer.write_shard(
            shard,
            ShardData(
                features={tap: values[rows] for tap, values in features.items()},
                labels=labels[rows],
                paths=paths[rows],
                splits=splits[rows],
                indices=np.arange(len(labels))[rows],
            ),
            [],
            "float32",
        )
    writer.finish({"taps": dict(taps)})
    return folder
