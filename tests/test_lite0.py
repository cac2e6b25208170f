"""The embedded EfficientNet-Lite0: explicit key mapping and sensible ImageNet predictions."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipeline import lite0
from pipeline.images import build_transform


@pytest.fixture(scope="module")
def source_state_dict() -> dict:
    return torch.load(lite0.weights_file(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def timm_model():
    import timm

    return timm.create_model(lite0.TIMM_ARCHITECTURE, pretrained=False)


def test_mapping_covers_every_parameter(source_state_dict, timm_model):
    converted = lite0.convert_state_dict(source_state_dict, timm_model)
    assert set(converted) == set(timm_model.state_dict())
    assert len(converted) == len(source_state_dict)


@pytest.mark.parametrize(
    ("source_key", "timm_key"),
    [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_bn0.running_var", "bn1.running_var"),
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
        ("_blocks.1._bn1.bias", "blocks.1.0.bn2.bias"),
        ("_blocks.2._project_conv.weight", "blocks.1.1.conv_pwl.weight"),
        ("_blocks.15._bn2.weight", "blocks.6.0.bn3.weight"),
        ("_bn1.weight", "bn2.weight"),
        ("_fc.bias", "classifier.bias"),
    ],
)
def test_mapping_of_known_keys(source_state_dict, timm_model, source_key, timm_key):
    positions = lite0.block_positions(timm_model)
    expanding = {int(key.split(".")[1]) for key in source_state_dict if "_expand_conv" in key}
    assert lite0.map_key(source_key, positions, expanding) == timm_key


def test_mapping_rejects_wrong_shape(source_state_dict, timm_model):
    broken = dict(source_state_dict)
    broken["_fc.weight"] = torch.zeros(10, 1280)
    with pytest.raises(lite0.WeightsMappingError, match="shape"):
        lite0.convert_state_dict(broken, timm_model)


def test_mapping_rejects_missing_parameter(source_state_dict, timm_model):
    partial = {key: value for key, value in source_state_dict.items() if key != "_conv_head.weight"}
    with pytest.raises(lite0.WeightsMappingError, match="no weights"):
        lite0.convert_state_dict(partial, timm_model)


def test_mapping_rejects_unknown_key(source_state_dict, timm_model):
    extra = {**source_state_dict, "_unknown.weight": torch.zeros(1)}
    with pytest.raises(lite0.WeightsMappingError, match="no counterpart"):
        lite0.convert_state_dict(extra, timm_model)


def top5_names(backbone, image: Image.Image) -> list[str]:
    batch = build_transform(backbone.preprocessing)(image)[None]
    with torch.inference_mode():
        probabilities = backbone.model(batch).softmax(dim=1)[0]
    return [backbone.categories[index] for index in probabilities.topk(5).indices.tolist()]


def test_lite0_recognizes_sample_photos(lite0):
    """scikit-learn ships two real photos: a flower and a Chinese temple."""
    from sklearn.datasets import load_sample_image

    flower = top5_names(lite0, Image.fromarray(load_sample_image("flower.jpg")))
    temple = top5_names(lite0, Image.fromarray(load_sample_image("china.jpg")))
    buildings = {"monastery", "palace", "castle", "bell cote", "church", "dome", "boathouse", "pagoda", "stupa"}
    assert "daisy" in flower, flower
    assert buildings & set(temple), temple


def test_lite0_preprocessing_matches_its_weights(lite0):
    assert lite0.preprocessing.mean == (0.5, 0.5, 0.5)
    assert lite0.preprocessing.std == (0.5, 0.5, 0.5)
    assert lite0.preprocessing.crop_size == 224
    assert lite0.preprocessing.interpolation == "bicubic"
