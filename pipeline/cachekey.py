"""Cache keys: one SHA-256 over everything that changes the contents of a feature store."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.augment import augmentation_key
from pipeline.backbones import Backbone
from pipeline.datasets import Dataset
from pipeline.settings import ExtractSettings

# Bump when the stored bytes change for the same inputs, so that old stores are not reused.
KEY_VERSION = 1


def dataset_fingerprint(dataset: Dataset) -> str:
    """Hash the file list: relative path, size and modification time of every sample, with labels and splits."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dataset.class_names).encode())
    for sample in dataset.samples:
        stat = (dataset.root / sample.path).stat()
        digest.update(f"{sample.path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{sample.label}\0{sample.split}\n".encode())
    return digest.hexdigest()


def key_fields(settings: ExtractSettings, dataset: Dataset, backbone: Backbone) -> dict[str, Any]:
    """Return the inputs the key is computed from, stored in the manifest for inspection."""
    return {
        "key_version": KEY_VERSION,
        "dataset": {"name": dataset.name, "files_sha256": dataset_fingerprint(dataset), "count": len(dataset.samples)},
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "preprocessing": backbone.preprocessing.to_dict(),
        "taps": list(settings.taps),
        "pooling": settings.pooling,
        "dtype": settings.dtype,
        "augmentation": augmentation_key(settings.views, settings.augment, settings.view_seed),
    }


def compute_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
