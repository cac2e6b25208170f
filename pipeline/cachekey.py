"""Cache keys: one SHA-256 over everything that changes the contents of a feature store.

This module imports no torch, so a cache hit is detected without loading a backbone.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.policies import augmentation_key
from pipeline.datasets import Dataset
from pipeline.settings import MAX_ASPECT_RATIO, ExtractSettings
from pipeline.store import file_sha256

# Bump when the stored bytes change for the same inputs, so that old stores are not reused.
# Version 2: batches never cross shard boundaries, and very elongated images are padded before resizing.
# Version 3: batches are normalized after the workers (from uint8), and the forward pass settings are keyed.
KEY_VERSION = 3


def dataset_fingerprint(dataset: Dataset, content_hash: bool = False) -> str:
    """Hash the file list with labels and splits, plus each file's size and modification time or its bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dataset.class_names).encode())
    for sample in dataset.samples:
        path = dataset.root / sample.path
        if content_hash:
            identity = file_sha256(path)
        else:
            stat = path.stat()
            identity = f"{stat.st_size}\0{stat.st_mtime_ns}"
        digest.update(f"{sample.path}\0{identity}\0{sample.label}\0{sample.split}\n".encode())
    return digest.hexdigest()


def key_fields(settings: ExtractSettings, dataset: Dataset, provenance: dict[str, Any]) -> dict[str, Any]:
    """Return the inputs the key is computed from, stored in the manifest for inspection.

    ``provenance`` is the backbone's provenance (``Backbone.provenance()`` or its cached copy).
    """
    content_hash = settings.dataset.content_hash
    return {
        "key_version": KEY_VERSION,
        "dataset": {
            "name": dataset.name,
            "files_sha256": dataset_fingerprint(dataset, content_hash),
            "fingerprint": "content" if content_hash else "size-mtime",
            "count": len(dataset.samples),
        },
        "backbone": provenance["backbone"],
        "weights_sha256": provenance["weights_sha256"],
        "preprocessing": {**provenance["preprocessing"], "max_aspect_ratio": MAX_ASPECT_RATIO},
        "taps": list(settings.taps),
        "pooling": settings.pooling,
        "dtype": settings.dtype,
        "max_image_pixels": settings.max_image_pixels,
        "augmentation": augmentation_key(settings.views, settings.augment, settings.view_seed),
        "amp": settings.amp,
        "channels_last": settings.channels_last,
        "fold_batchnorm": settings.fold_batchnorm,
        "draft": settings.draft,
    }


def compute_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
