"""Backbone checkpoints are read with weights_only=True, so pickled objects are rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.backbones import build_backbone, load_checkpoint_into


class Payload:
    """A plain Python object: unpickling it would import and run code from this module."""


def test_checkpoint_with_object_rejected(tmp_path: Path) -> None:
    backbone = build_backbone("test_resnet", "random")
    path = tmp_path / "pickled.pt"
    state = {"model": backbone.model.state_dict(), "extra": Payload()}
    torch.save(state, path)
    with pytest.raises(ValueError, match="was rejected: it contains pickled objects"):
        load_checkpoint_into(backbone, str(path))


def test_plain_state_dict_checkpoint_loads(tmp_path: Path) -> None:
    source = build_backbone("test_resnet", "random")
    path = tmp_path / "weights.pt"
    state = {key: value + 1 for key, value in source.model.state_dict().items() if value.is_floating_point()}
    state.update({key: value for key, value in source.model.state_dict().items() if not value.is_floating_point()})
    torch.save(state, path)
    loaded = build_backbone("test_resnet", checkpoint=str(path))
    assert loaded.weights == str(path)
    assert loaded.weights_sha256 != source.weights_sha256
