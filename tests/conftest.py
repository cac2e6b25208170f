"""Shared fixtures: small real image folders, the embedded backbone, and the shared datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_colour_image(path: Path, colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (40, 32)) -> None:
    """Write a noisy image of one dominant colour, so that classes are separable but not identical."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def colour_folder(tmp_path: Path) -> Path:
    """A class-per-folder dataset with train/ and val/ folders: 3 classes, 6 + 3 images each."""
    root = tmp_path / "colours"
    seed = 0
    for split, count in (("train", 6), ("val", 3)):
        for name, colour in COLOURS.items():
            for item in range(count):
                seed += 1
                suffix = ".png" if item % 2 else ".jpg"
                write_colour_image(root / split / name / f"{name}_{item}{suffix}", colour, seed)
    return root


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside tmp_path, so that the default data/ folder is private to it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def lite0():
    from pipeline.backbones import build_backbone

    return build_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


def free_loopback_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def gloo_group_of_one(monkeypatch: pytest.MonkeyPatch):
    """This process as rank 0 of a one-rank gloo process group on loopback, as torchrun would start it."""
    from pipeline.distributed import start_distributed

    for name, value in {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_loopback_port()),
    }.items():
        monkeypatch.setenv(name, value)
    context = start_distributed("cpu")
    yield context
    context.close()
