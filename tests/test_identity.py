"""The backbone identity cache: reused while nothing changes, dropped when a weights file changes."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.identity import IDENTITY_CACHE, cached_identity, remember_identity, request_digest
from pipeline.settings import ExtractSettings

PROVENANCE = {"backbone": "x", "weights_sha256": "c" * 64, "preprocessing": {}}


def test_random_weights_cached(tmp_path: Path) -> None:
    settings = ExtractSettings(backbone="test_resnet", weights="random", output_root=str(tmp_path))
    assert cached_identity(settings) is None
    remember_identity(settings, PROVENANCE)
    assert cached_identity(settings) == PROVENANCE
    assert (tmp_path / IDENTITY_CACHE).is_file()


def test_changed_checkpoint_drops_entry(tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"0" * 10)
    settings = ExtractSettings(backbone="test_resnet", checkpoint=str(checkpoint), output_root=str(tmp_path))
    remember_identity(settings, PROVENANCE)
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000))
    assert cached_identity(settings) is None


def test_missing_checkpoint_not_cached(tmp_path: Path) -> None:
    settings = ExtractSettings(backbone="test_resnet", checkpoint=str(tmp_path / "absent.pt"), output_root=str(tmp_path))
    assert request_digest(settings) is None


def test_hub_weights_not_cached(tmp_path: Path) -> None:
    settings = ExtractSettings(backbone="resnet18", weights="default", output_root=str(tmp_path))
    remember_identity(settings, PROVENANCE)
    assert cached_identity(settings) is None


def test_embedded_weights_cached(tmp_path: Path) -> None:
    settings = ExtractSettings(output_root=str(tmp_path))
    remember_identity(settings, PROVENANCE)
    assert cached_identity(settings) == PROVENANCE


def test_corrupt_cache_file_ignored(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_CACHE).write_text("{not json")
    settings = ExtractSettings(backbone="test_resnet", weights="random", output_root=str(tmp_path))
    assert cached_identity(settings) is None
    remember_identity(settings, PROVENANCE)
    assert cached_identity(settings) == PROVENANCE
